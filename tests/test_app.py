"""The Textual app: every flow through Pilot against a fake engine replaying recorded events, one flow against
the real engine on a tiny model, and snapshots of the main screens at 80x24."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest
from fake_backend import FakeBackend, recorded_events
from textual.containers import VerticalScroll
from textual.widgets import DataTable, Input, ProgressBar, Static

from engine.control import Control
from engine.errors import AdapruneError
from tui.app import AdapruneApp
from tui.backend import Backend, NewSession
from tui.screens.bench import BenchForm, BenchScreen
from tui.screens.dialogs import Ask, Confirm, Help
from tui.screens.export import ExportScreen
from tui.screens.layers import LayersScreen
from tui.screens.new_session import NewSessionScreen
from tui.screens.search import SearchScreen
from tui.screens.sessions import SessionsScreen

SIZE = (80, 24)
N_TRIALS = len({e["number"] for e in recorded_events() if e["kind"] == "trial_started"})


def run(coro):
    return asyncio.run(coro)


def text_of(app, selector: str) -> str:
    return str(app.screen.query_one(selector, Static).content)


async def until(pilot, condition, timeout: float = 10.0) -> None:
    """Wait for a condition instead of a fixed time (a loaded CI machine is slower; a fast one waits less)."""
    for _ in range(int(timeout / 0.02)):
        if condition():
            return
        await pilot.pause(0.02)
    assert condition(), "the app did not get there in time"


async def tab_stops(app, pilot, presses: int = 24) -> list:
    """What Tab focuses, press after press: a container there would be a stop with no visible mark (no-color)."""
    seen = []
    for _ in range(presses):
        await pilot.press("tab")
        seen.append(app.focused)
    return seen


def refusing(message: str, tmp_path):
    """A backend method that fails as a damaged session file does: `message` with {tmp_path} and {name}."""
    def method(name, *_args, **_kwargs):
        raise AdapruneError(message.format(tmp_path=tmp_path, name=name))
    return method


def said(app) -> list[str]:
    """The notifications the app has shown, oldest first."""
    return [n.message for n in app._notifications]


def best_rows(table) -> list[str]:
    """The trial numbers of the rows the search table marks best."""
    return [str(table.get_row_at(i)[0]) for i in range(table.row_count) if str(table.get_row_at(i)[3]) == "best"]


def last_best() -> str:
    return str([e for e in recorded_events() if e["kind"] == "best_changed"][-1]["number"])


async def settle(app, pilot) -> None:
    await app.workers.wait_for_complete()
    await pilot.pause()
    await pilot.pause()


def test_sessions_table_rename_and_delete(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            assert isinstance(app.screen, SessionsScreen)
            assert app.screen.query_one(DataTable).row_count == 2
            await pilot.press("e")
            assert isinstance(app.screen, Ask)
            app.screen.query_one(Input).value = "bad name"
            await pilot.pause()
            assert "letters, digits" in text_of(app, "#problem")  # flagged as typed
            app.screen.query_one(Input).value = "beta"  # taken: the error shows in the dialog, which stays open
            await pilot.press("enter")
            await pilot.pause()
            assert set(backend.store) == {"alpha", "beta"}
            assert isinstance(app.screen, Ask) and "exists already" in text_of(app, "#problem")
            await pilot.press("d")  # typed into the dialog, not a delete on the list behind it
            assert isinstance(app.screen, Ask) and "d" in app.screen.query_one(Input).value
            app.screen.query_one(Input).value = "gamma"
            await pilot.press("enter")
            await pilot.pause()
            assert set(backend.store) == {"beta", "gamma"}
            assert app.screen.selected() == "gamma"  # the cursor follows the renamed session, not its old row
            await pilot.press("d")
            assert isinstance(app.screen, Confirm) and "gamma" in str(app.screen.question)
            await pilot.press("n")
            assert set(backend.store) == {"beta", "gamma"}
            await pilot.press("d", "y")
            await pilot.pause()
            assert len(backend.store) == 1 and app.screen.query_one(DataTable).row_count == 1
            backend.store[next(iter(backend.store))]["status"] = "done (study unreadable: OperationalError)"
            await pilot.press("f5")
            table = app.screen.query_one(DataTable)
            assert len(str(table.get_row_at(0)[5])) <= 19  # cut: "last change" stays on screen
            assert "OperationalError" in text_of(app, "#hint")  # in full below the table

    run(go())


def test_the_sessions_list_says_starting_until_a_started_process_takes_its_session(tmp_path):
    """A process the app started loads torch for seconds before it holds the session: not "stopped" meanwhile."""
    import threading

    from fake_backend import FakeProcess

    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            gate = threading.Event()
            proc = FakeProcess()
            proc.thread = threading.Thread(target=gate.wait)
            proc.thread.start()
            app.background["search", "alpha"] = app.background["recover", "beta"] = proc
            await pilot.press("f5")
            table = app.screen.query_one(DataTable)
            states = str(table.get_cell("alpha", "status")), str(table.get_cell("beta", "status"))
            gate.set()
            proc.thread.join()
            proc.code = 1
            await pilot.press("f5")
            after = str(table.get_cell("alpha", "status")), str(table.get_cell("beta", "status"))
            return states, after

    states, after = run(go())
    assert states == ("starting", "done, LoRA starting")
    assert after == ("stopped", "done")  # it ended without taking the session: what the session says


def test_the_sessions_list_tells_a_running_recovery_from_a_stopped_one(tmp_path):
    from dataclasses import replace

    async def go():
        backend = FakeBackend(tmp_path)
        rows = backend.sessions()
        said = {"alpha": "running 3/12", "beta": "stopped 3/12"}
        backend.sessions = lambda: [replace(r, recovery=said.get(r.name, r.recovery)) for r in rows]
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f5")
            table = app.screen.query_one(DataTable)
            return str(table.get_cell("alpha", "status")), str(table.get_cell("beta", "status"))

    alpha, beta = run(go())
    assert alpha.endswith("LoRA 3/12") and beta.endswith("LoRA stopped"), (alpha, beta)


def test_new_session_form_flags_problems_in_place_then_starts(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("n")
            screen = app.screen
            assert isinstance(screen, NewSessionScreen)
            assert screen.query_one("#model", Input).value == "smollm2-135m"  # the embedded default
            for field in ("name", "model", "prune", "layers", "sources", "trials", "objective", "device"):
                box = screen.query_one(f"#{field}", Input)  # every field's value is on screen at 80x24
                assert box.region.height >= 1 and app.screen.region.contains_region(box.region), field
            assert app.focused is screen.query_one("#name", Input)  # at the top, not on Start
            assert "memory, about: peak" in text_of(app, "#memory")  # the plan before anything runs
            stops = await tab_stops(app, pilot)
            assert not any(type(w) is VerticalScroll for w in stops)
            assert screen.query_one("#metrics").highlighted is not None  # focused, it shows where its cursor is
            screen.query_one("#name", Input).focus()
            await pilot.press("enter")
            assert not backend.calls  # a stray Enter starts nothing
            for field, value, problem in (("model", "../nope/model", "does not exist"),
                                          ("model", "./models/missing", "does not exist"),
                                          ("sources", "nosuchsource", "neither a file nor a known name"),
                                          ("sources", f"{tmp_path}/missing.txt", "neither a file"),
                                          ("objective", "stdlib-docs/nosplit", "has splits")):
                screen.query_one(f"#{field}", Input).value = value
                await pilot.pause()
                assert problem in text_of(app, f"#{field}-problem"), (field, value)
                assert screen.query_one(f"#{field}-problem", Static).region.height >= 1  # visible beside it
                screen.query_one(f"#{field}", Input).value = {"model": "smollm2-135m", "sources": "stdlib-docs",
                                                               "objective": "stdlib-docs/valid"}[field]
            folder = tmp_path / "four"  # a local model's depth is read as the user types: a range past it is flagged
            folder.mkdir()
            (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
            screen.query_one("#model", Input).value = str(folder)
            for value, problem in (("1-9", "the model has layers 0..3"), ("", "'search' (the search picks them)"),
                                   ("1-3", "")):
                screen.query_one("#layers", Input).value = value
                await pilot.pause()
                assert text_of(app, "#layers-problem") == problem or problem and problem in text_of(
                    app, "#layers-problem"), value
            screen.query_one("#model", Input).value = "smollm2-135m"
            screen.query_one("#layers", Input).value = "search"
            screen.query_one("#name", Input).value = str(tmp_path)  # a path that exists: named as a bad name
            await pilot.pause()
            assert "letters, digits" in text_of(app, "#name-problem")
            screen.query_one("#prune", Input).value = "2"
            screen.query_one("#name", Input).value = "bad name"
            await pilot.pause()
            assert "(0, 0.9]" in text_of(app, "#prune-problem") and "letters, digits" in text_of(app, "#name-problem")
            assert screen.query_one("#prune", Input).has_class("invalid")
            await pilot.press("ctrl+s")
            assert not any(c[0] == "create" for c in backend.calls)  # nothing starts with problems flagged
            screen.query_one("#prune", Input).value = "0.25"
            screen.query_one("#name", Input).value = "fresh"
            await pilot.pause()
            assert text_of(app, "#prune-problem") == ""
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert ("create", backend.calls[0][1]) == backend.calls[0] and backend.calls[0][1].prune == "0.25"
            assert isinstance(app.screen, SearchScreen) and ("start", "fresh") in backend.calls
            table = app.screen.query_one(DataTable)
            await until(pilot, lambda: table.row_count == N_TRIALS and app.screen.control is None)
            assert str(table.get_row_at(0)[0]) == "0 base"
            assert best_rows(table) == [last_best()]  # the old best lost its mark when the best moved

    run(go())


def test_resuming_a_finished_search_starts_nothing(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            app.screen.query_one(DataTable).move_cursor(row=1)  # beta: all 6 trials done
            await pilot.press("r")
            await pilot.pause()
            assert not [c for c in backend.calls if c[0] == "start"] and not app.searches()
            assert isinstance(app.screen, SearchScreen)  # its trials, to look at

    run(go())


def test_a_saved_search_says_how_its_last_run_ended_and_shows_only_its_own_events(tmp_path):
    events = recorded_events()
    cut = next(i for i, e in enumerate(events) if e["kind"] == "trial_started" and e["number"] == 3)
    cancelled = [{"kind": "log", "t": 0.0, "message": "search stopping at a safe point: the app asked to cancel",
                  "level": "warning"},
                 {"kind": "search_finished", "t": 0.0, "status": "cancelled", "completed": 3, "total": 6,
                  "best_number": 1, "best_value": 382.8}]
    bench = [{"kind": "stage_started", "t": 0.0, "stage": "PPL stdlib-docs@128 (best)", "total": 4, "unit": "",
              "job": "bench"}]

    async def go(log: list[dict]) -> tuple[str, str, str]:
        backend = FakeBackend(tmp_path)
        backend.store["beta"]["log"] = log
        backend.store["beta"]["done"] = sum(e["kind"] == "trial_finished" for e in log)  # as its study says
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            app.screen.query_one(DataTable).move_cursor(row=1)
            await pilot.press("enter")
            await pilot.pause()
            assert isinstance(app.screen, SearchScreen)
            table = app.screen.query_one(DataTable)  # the replayed rows, rendered once after the replay
            started = {e["number"] for e in log if e["kind"] == "trial_started"}
            assert table.row_count == len(started) and str(table.get_row_at(0)[0]) == "0 base"
            marked = [e["number"] for e in log if e["kind"] == "best_changed"]
            assert best_rows(table) == [str(marked[-1])]
            assert all(str(table.get_row_at(i)[2]).endswith("%") for i in range(1, table.row_count)
                       if str(table.get_row_at(i)[3]) in ("complete", "best"))  # read against the baseline
            return text_of(app, "#title"), text_of(app, "#log"), text_of(app, "#stage")

    title, log, _ = run(go(events[:cut] + cancelled))
    assert "cancelled, 3/6 trials" in title and "(r resumes)" in title
    assert "search cancelled: 3/6 trials, best trial 1 (382.800) (r resumes)" in log  # how it ended, not its last log
    # resumed later to the end, then benchmarked: the cancel is old news and the bench's stages are not the search's
    title, log, stage = run(go(events[:cut] + cancelled + events[cut:] + bench))
    assert "done, 6/6 trials" in title and "cancel" not in log and "PPL" not in stage
    title, _, _ = run(go(events[:cut]))  # killed: no end in its log
    assert "stopped" in title and "resumes" in title


def test_keys_on_a_stopped_search_say_what_they_can_and_r_resumes_it(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)  # alpha: stopped with trials to go
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("a")  # attach, with nothing running: it says so, and shows the saved trials
            await pilot.pause()
            assert isinstance(app.screen, SearchScreen) and any("no process runs the search" in m for m in said(app))
            footer = {b.binding.action for b in app.screen.active_bindings.values() if b.enabled and b.binding.show}
            await pilot.press("p", "c")
            assert sum("no search of alpha is running: r resumes it" in m for m in said(app)) == 2
            await pilot.press("r")
            await settle(app, pilot)
            assert ("start", "alpha") in backend.calls and isinstance(app.screen, SearchScreen)
            assert app.screen.view_mode == "attach" and len(app.screen_stack) == 3  # replaced, not stacked
            return footer

    footer = run(go())
    assert "resume_search" in footer and "pause" not in footer


def test_help_opens_at_the_screen_it_is_asked_from_and_lists_what_each_key_does(tmp_path):
    async def go():
        app = AdapruneApp(FakeBackend(tmp_path))
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("enter", "f1")
            await settle(app, pilot)
            assert isinstance(app.screen, Help)
            title = next(w for w in app.screen.query(".help-title") if str(w.render()) == "Search")
            view = app.screen.query_one("#help-text")
            assert view.scroll_y > 0 and view.region.contains_region(title.region)  # its section, on screen
            rows = {str(w.render()) for w in app.screen.query(".help-title")}
            assert {"Anywhere", "Sessions", "Search", "Recover", "Export"} <= rows

    run(go())


def test_keys_that_can_do_nothing_now_say_so(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            app.screen.query_one(DataTable).move_cursor(row=1)  # beta: all its trials done
            await pilot.press("enter", "r")
            assert any("nothing to resume" in m for m in said(app)) and not any(c[0] == "start" for c in backend.calls)
            await pilot.press("escape", "b", "p", "c")
            assert sum("no benchmark is running: r runs one" in m for m in said(app)) == 2
            await pilot.press("escape", "l", "c")
            assert any("nothing is being re-evaluated" in m for m in said(app))
            palette = [c.title for c in app.get_system_commands(app.screen)]
            assert "" not in palette  # the hidden fallbacks are not commands

    run(go())


def test_the_recover_form_for_a_stopped_run_shows_its_start_button(tmp_path):
    """Continuing a stopped recovery uses its own settings: the new-run fields hide, so Start is on screen."""
    import json

    from fake_backend import DATA

    from tui.screens.recover import RecoverForm

    async def go():
        backend = FakeBackend(tmp_path)
        state = json.loads((DATA / "recovery_state.json").read_text())
        backend.store["alpha"]["recovery"] = {**state, "status": "stopped", "step": 3}
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f", "r")
            await pilot.pause()
            form = app.screen
            assert isinstance(form, RecoverForm) and not form.query_one("#fresh").display
            assert app.screen.region.contains_region(form.query_one("#run").region)
            form.query_one("#resume").value = False  # train again: the fields come back
            await pilot.pause()
            assert form.query_one("#fresh").display and form.query_one("#steps").region.height == 1
            assert "discards the 3 steps done" in str(form.query_one("#discards").content)
            assert form.query_one("#steps", Input).value == "8"  # the stopped run's settings, not the defaults
            form.query_one("#run").focus()  # taller than 24 rows now: it scrolls to what has focus
            await pilot.pause()
            assert app.screen.region.contains_region(form.query_one("#run").region)
            form.query_one("#lr", Input).value = "fast"
            await pilot.pause()
            assert "LR 'fast': a number" in text_of(app, "#problem")  # names the field, as typed
            await pilot.press("ctrl+s")
            assert "LR 'fast': a number" in text_of(app, "#problem")
            form.query_one("#lr", Input).value = "0.001"
            await pilot.pause()
            assert text_of(app, "#problem") == ""  # fixed: the error goes
            backend.requests["recover:alpha"] = "pause"  # the fake process holds before its first event
            await pilot.press("ctrl+s")
            await until(pilot, lambda: backend.calls and backend.calls[-1][0] == "recover")
            cfg = backend.calls[-1][2]
            assert (cfg.steps, cfg.lr, cfg.warmup, cfg.valid_windows) == (8, 0.001, 2, 2)  # hidden ones kept too
            screen = app.screen
            assert screen.query_one(DataTable).row_count == 0  # the discarded run's rows are gone
            assert "preparing a new recovery" in text_of(app, "#summary")
            backend.requests["recover:alpha"] = "cancel"

    run(go())


def test_pause_resume_and_cancel_a_running_search(tmp_path):
    """The app runs a search in a process of its own and controls it through the session's requests."""
    async def go():
        backend = FakeBackend(tmp_path)
        backend.delay = 0.05
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("r")
            screen = app.screen
            assert isinstance(screen, SearchScreen) and "alpha" in app.searches()
            await until(pilot, lambda: screen.control is not None)
            assert "running in process 4242" in text_of(app, "#title")
            await pilot.press("p")
            assert backend.requests["alpha"] == "pause" and "pause requested" in text_of(app, "#title")
            # the footer's p now says Resume, not Pause
            assert screen.check_action("resume", ()) and not screen.check_action("pause", ())
            await pilot.pause(0.2)
            rows = screen.query_one(DataTable).row_count
            await pilot.pause(0.3)
            assert screen.query_one(DataTable).row_count == rows  # paused means paused
            await pilot.press("p")
            assert backend.requests["alpha"] == "resume"
            await pilot.press("c")
            assert backend.requests["alpha"] == "cancel"
            await until(pilot, lambda: screen.control is None and not app.searches())
            assert backend.store["alpha"]["status"] == "cancelled"

    run(go())


def test_leaving_and_reopening_a_running_search_keeps_control_of_it(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        backend.delay = 0.1
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("r")
            await until(pilot, lambda: app.screen.control is not None)
            await pilot.press("escape")
            assert isinstance(app.screen, SessionsScreen) and app.searches()  # still running behind
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, SearchScreen) and screen.view_mode == "attach"
            assert "running in process" in text_of(app, "#title")
            await until(pilot, lambda: screen.control is not None)
            await pilot.press("p")
            assert backend.requests["alpha"] == "pause"
            await pilot.press("c")
            await until(pilot, lambda: not app.searches() and screen.control is None)
            assert [c for c in backend.calls if c[0] == "start"] == [("start", "alpha")]  # one process only

    run(go())


def test_attach_follows_a_headless_run_without_taking_it_over(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        backend.store["beta"]["log"] = []
        backend.running.add("beta")
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("down", "r")  # resume a session another process drives: the app attaches
            screen = app.screen
            assert isinstance(screen, SearchScreen) and screen.view_mode == "attach" and not app.jobs
            assert screen.query_one(DataTable).row_count == 0
            backend.store["beta"]["log"].extend(recorded_events())  # the headless process writes its log
            await until(pilot, lambda: screen.query_one(DataTable).row_count == N_TRIALS)
            from engine.search.trial_rows import TrialRow
            params = screen.board.rows[0].params  # a row updated in place to a wider state is not cut
            for state in ("running", "duplicate"):
                screen.show_row(TrialRow(99, params, state=state))
                await pilot.pause()
            table = screen.query_one(DataTable)
            assert table.columns["state"].content_width >= len("duplicate")
            await pilot.press("ctrl+q")  # quitting while following another's search asks, as for our own
            from tui.screens.dialogs import Choose
            assert isinstance(app.screen, Choose) and "search of beta" in str(app.screen.question)
            assert "paused" not in str(app.screen.question)
            await pilot.press("escape")
            assert app.screen is screen and "beta" not in backend.requests
            backend.requests["beta"] = "pause"  # paused: the question says so, and that it stays paused
            await pilot.press("ctrl+q")
            question = str(app.screen.question)
            assert "search of beta (paused)" in question and "adaprune resume beta" in question
            await pilot.press("escape")
            del backend.requests["beta"]
            await pilot.press("c")  # nothing of ours to cancel
            assert not any(c[0] == "search" for c in backend.calls)

    run(go())


def test_layers_without_a_readable_plan_say_so_and_every_key_is_harmless(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        backend.best_plan = refusing("unknown key(s) foo in {tmp_path}/{name}/plan.json: the file was edited",
                                     tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("l")
            await pilot.pause()
            assert isinstance(app.screen, LayersScreen) and "unknown key(s) foo" in text_of(app, "#summary")
            for key in ("r", "v", "k", "h", "m"):  # r (restore) crashed the app here
                await pilot.press(key)
                await pilot.pause()
            while not isinstance(app.screen, LayersScreen):  # a key that opened a dialog: closed again
                await pilot.press("escape")
            assert "unknown key(s) foo" in text_of(app, "#summary")

    run(go())


def test_layers_review_override_and_reevaluate(tmp_path):
    from engine.prune.plan import Plan
    from engine.review import layer_rows

    async def go():
        backend = FakeBackend(tmp_path)
        plan = Plan.from_dict(backend.store["alpha"]["plan"]["plan"])
        pruned = next(r.index for r in layer_rows(plan) if r.removed)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("l")
            screen = app.screen
            assert isinstance(screen, LayersScreen)
            assert screen.query_one(DataTable).row_count == len(plan.layers)
            assert "on target" in text_of(app, "#summary")
            for _ in range(pruned):
                await pilot.press("down")
            await pilot.press("k")  # lock: the layer keeps everything, the total moves off target at once
            assert "from the target" in text_of(app, "#summary")
            assert str(screen.query_one(DataTable).get_row_at(pruned)[-1]) == "lock"
            assert "100%" in str(screen.query_one(DataTable).get_row_at(pruned)[4])  # the bar: all of it kept
            await pilot.press("escape")  # unsaved edits: it asks before dropping them
            assert isinstance(app.screen, Confirm)
            await pilot.press("n")
            assert app.screen is screen
            await pilot.press("m")
            app.screen.query_one(Input).value = "100000"
            await pilot.pause()
            assert "not 100000" in text_of(app, "#problem")  # flagged as typed, before Enter
            app.screen.query_one(Input).value = "12"
            await pilot.pause()
            assert text_of(app, "#problem") == ""
            app.screen.query_one(Input).value = "100000"
            await pilot.press("enter")
            await pilot.pause()
            assert "keep 1..64 MLP channels, not 100000" in text_of(app, "#problem")  # the question's vocabulary
            await pilot.press("escape")
            await pilot.press("h")
            ask = app.screen
            r = plan.shapes[pruned]["n_heads"] // plan.shapes[pruned]["n_kv_heads"]
            ask.query_one(Input).value = "0"  # no query head left in a KV group: GQA forbids it
            await pilot.press("enter")
            await pilot.pause()
            assert "keep 1..3 query heads per KV group (GQA" in text_of(app, "#problem")
            ask.query_one(Input).value = str(r - 1)  # keep all but one per group
            await pilot.press("enter")
            await pilot.pause()
            assert str(screen.query_one(DataTable).get_row_at(pruned)[-1]) == f"keep {r - 1} h, 64 ch"
            await pilot.press("v")  # says what it will record, and asks
            assert isinstance(app.screen, Confirm) and "plan:overrides" in str(app.screen.question)
            backend.requests["reevaluate:alpha"] = "pause"  # held mid-measurement
            await pilot.press("y")
            await pilot.pause()
            offered = {b.binding.action for b in screen.active_bindings.values() if b.enabled and b.binding.show}
            assert "cancel" in offered and not offered & {"lock", "heads", "channels", "reevaluate"}
            await pilot.press("k")  # no edit while the edits are being measured
            assert str(screen.query_one(DataTable).get_row_at(pruned)[-1]) == f"keep {r - 1} h, 64 ch"
            del backend.requests["reevaluate:alpha"]
            await settle(app, pilot)
            assert backend.calls[-1] == ("reevaluate", "alpha", {pruned: (1, 0)})
            assert "objective 41.250" in text_of(app, "#status")
            assert "your re-evaluated edits" in text_of(app, "#summary")  # the rows are the plan just measured
            await pilot.press("r")
            assert "on target" in text_of(app, "#summary")
            await pilot.press("v", "y")  # no edits: clears the overrides
            await settle(app, pilot)
            await pilot.press("escape")  # re-evaluated: leaves without asking
            assert isinstance(app.screen, SessionsScreen)

    run(go())


def test_bench_table_and_run(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("b")
            assert isinstance(app.screen, BenchScreen)
            table = app.screen.query_one(DataTable)
            assert table.row_count == len(backend.store["alpha"]["bench"]["rows"])
            assert "row" in [str(c.label) for c in table.columns.values()]
            await pilot.press("r")
            assert isinstance(app.screen, BenchForm)
            app.screen.query_one("#ppl", Input).value = "no-such-file.txt"
            await pilot.pause()
            await pilot.press("ctrl+s")
            assert "no-such-file" in text_of(app, "#problem")  # refused in the form, before any work
            app.screen.query_one("#ppl", Input).value = "stdlib-docs"
            app.screen.query_one("#rows", Input).value = "dense, nope"
            await pilot.pause()
            assert "no row 'nope'" in text_of(app, "#problem")  # flagged as typed
            app.screen.query_one("#windows", Input).value = "many"
            await pilot.pause()
            assert "Windows 'many': a whole number" in text_of(app, "#problem")
            await pilot.press("ctrl+s")
            assert isinstance(app.screen, BenchForm) and not any(c[0] == "bench" for c in backend.calls)
            app.screen.query_one("#rows", Input).value = "dense, best"
            app.screen.query_one("#windows", Input).value = "2"
            assert app.screen.region.contains_region(app.screen.query_one("#run").region)  # at 80x24
            backend.requests["bench:alpha"] = "cancel"  # left by an earlier, cancelled run: not this one's
            await pilot.press("ctrl+s")
            screen = app.screen
            # its own process: followed through the events log, the table refreshed as numbers land
            await until(pilot, lambda: ("alpha", "bench") in {(n, j) for j, n in app.background})
            assert backend.calls[-1][0] == "bench" and backend.calls[-1][2].ppl == ["stdlib-docs"]
            assert backend.calls[-1][2].rows == ["dense", "best"] and backend.calls[-1][2].ppl_windows == 2
            await until(pilot, lambda: "benchmark done" in text_of(app, "#status"))
            assert "not measured: zero-shot (no tasks given), speed" in text_of(app, "#status")  # not silently
            assert screen.control is None and not app.searches("bench")

    run(go())


def test_a_bench_process_pauses_cancels_and_quitting_asks(tmp_path):
    from tui.screens.dialogs import Choose

    async def go(answer: str):
        backend = FakeBackend(tmp_path)
        backend.delay = 0.2
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("b", "r")
            await pilot.press("ctrl+s")
            screen = app.screen
            await until(pilot, lambda: screen.control is not None)
            await pilot.press("p")
            assert backend.requests["bench:alpha"] == "pause" and "pausing" in text_of(app, "#status")
            await pilot.press("p")
            assert backend.requests["bench:alpha"] == "resume"
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, Choose) and "benchmark of alpha" in str(app.screen.question)
            await pilot.press(answer)
        return backend

    assert run(go("l")).requests["bench:alpha"] == "resume"  # left running
    assert run(go("s")).requests["bench:alpha"] == "cancel"  # stopped at its next safe point


def test_export_with_an_unreadable_recovery_says_so_in_its_lora_box(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        backend.recovery_state = refusing("unknown key(s) foo in {tmp_path}/{name}/recovery/state.json", tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("x")
            await pilot.pause()
            lora = app.screen.query_one("#lora")
            return lora.disabled, lora.value, str(lora.label)

    disabled, value, label = run(go())
    assert disabled and not value and "cannot be read" in label


def test_export_writes_the_chosen_folder(tmp_path):
    async def go():
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("x")
            assert isinstance(app.screen, ExportScreen)
            assert "widths" in text_of(app, "#format") and "parameters removed" in text_of(app, "#format")
            assert not any(type(w) is VerticalScroll for w in await tab_stops(app, pilot, 12))
            assert app.screen.query_one("#plans").query(".-selected")  # a keyboard cursor (seen in no-color)
            app.screen.query_one("#out", Input).focus()
            app.screen.query_one("#out", Input).value = str(tmp_path / "out")
            await pilot.press("enter")  # moves on: only ctrl+s or the button writes
            assert not [c for c in backend.calls if c[0] == "export"]
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert backend.calls[-1] == ("export", "alpha", str(tmp_path / "out"), False, "plan", False, "best")
            status = app.screen.query_one("#status", Static)
            assert "saved best to" in str(status.content) and "trust_remote_code" in str(status.content)
            assert app.screen.region.contains_region(status.region)  # the outcome is on screen at 80x24
            assert app.screen.query_one("#lora").disabled  # no recovery yet
            app.screen.query_one("#widths-uniform").value = True
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert backend.calls[-1][4] == "uniform" and "plain transformers" in text_of(app, "#status")
            backend.fail_export = "folder exists: pass --force"
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert "error: folder exists" in text_of(app, "#status")  # a refused export is not silent
            backend.fail_export = None
            await pilot.press("escape")
            # edits re-evaluated on the Layers screen are what Export writes by default, and it says so
            await pilot.press("l", "v", "y")
            await settle(app, pilot)
            await pilot.press("escape", "x")
            await pilot.pause()
            assert "edited plan" in str(app.screen.query_one("#choice-1").label)
            assert app.screen.query_one("#choice-1").value and app.screen.query_one("#widths-uniform").disabled
            for chosen, other in ((0, 1), (1, 0)):  # one plan chosen at a time, and chosen again
                app.screen.query_one(f"#choice-{chosen}").value = True
                await pilot.pause()
                assert not app.screen.query_one(f"#choice-{other}").value and app.screen.index == chosen
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert backend.calls[-1][-1] == "plan:overrides" and "saved plan:overrides" in text_of(app, "#status")

    run(go())


def test_recovery_runs_live_pauses_and_then_exports_merged(tmp_path):
    from tui.screens.recover import RecoverForm, RecoverScreen

    async def go():
        backend = FakeBackend(tmp_path)
        backend.delay = 0.05
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("f")
            assert isinstance(app.screen, RecoverScreen) and "no recovery yet" in text_of(app, "#summary")
            await pilot.press("r")
            assert isinstance(app.screen, RecoverForm)
            app.screen.query_one("#steps", Input).value = "0"
            await pilot.press("ctrl+s")
            assert "--steps 0" in text_of(app, "#problem")  # refused in the form, before any work
            app.screen.query_one("#steps", Input).value = "8"
            app.screen.query_one("#shape", Input).value = "2x32"
            await pilot.press("ctrl+s")  # it runs in its own process, as a search does
            screen = app.screen
            await until(pilot, lambda: screen.control is not None and "alpha" in app.searches("recover"))
            await pilot.press("p")
            assert backend.requests["recover:alpha"] == "pause" and "pausing" in text_of(app, "#status")
            await pilot.press("p")
            assert backend.requests["recover:alpha"] == "resume"
            await until(pilot, lambda: screen.control is None and not app.searches("recover"))
            _, name, cfg, resume, restart = [c for c in backend.calls if c[0] == "recover"][-1]
            assert (name, cfg.steps, cfg.batch_size, cfg.seq_len, resume, restart) == ("alpha", 8, 2, 32, False, False)
            assert "done" in text_of(app, "#summary") and "->" in text_of(app, "#summary")
            assert app.screen.query_one(DataTable).row_count == 2  # the validation steps (4 and 8)
            assert len(app.screen.query_one("#loss").data) == 8
            await pilot.press("x")
            lora = app.screen.query_one("#lora")
            assert not lora.disabled and lora.value
            app.screen.query_one("#out", Input).value = str(tmp_path / "out")
            await pilot.press("ctrl+s")
            await settle(app, pilot)
            assert backend.calls[-1] == ("export", "alpha", str(tmp_path / "out"), False, "plan", True, "best")
            assert "LoRA recovery merged in" in text_of(app, "#status")  # the outcome says what was written
            await pilot.press("escape", "escape")
            assert isinstance(app.screen, SessionsScreen)
            assert "stopped, LoRA" in str(app.screen.query_one(DataTable).get_cell("alpha", "status"))
            # edits re-evaluated after the recovery: the edited plan is the default, and LoRA (trained on best)
            # is not offered for it; choosing best offers it again
            await pilot.press("l", "v", "y")
            await settle(app, pilot)
            await pilot.press("escape", "x")
            await pilot.pause()
            lora = app.screen.query_one("#lora")
            assert app.screen.query_one("#choice-1").value and lora.disabled and not lora.value
            assert "trained on best" in str(lora.label)
            app.screen.query_one("#choice-0").value = True
            await pilot.pause()
            assert not lora.disabled and lora.value and "merge the LoRA recovery" in str(lora.label)
            lora.value = False  # cleared by the user: switching plans and back keeps it cleared
            await pilot.pause()
            for i in (1, 0):
                app.screen.query_one(f"#choice-{i}").value = True
                await pilot.pause()
            assert not lora.disabled and not lora.value

    run(go())


def test_quit_asks_while_work_runs_and_engine_errors_do_not_crash(tmp_path):
    from tui.screens.dialogs import Choose

    async def go(answer: str):
        backend = FakeBackend(tmp_path)
        backend.delay = 0.2
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("r")
            await until(pilot, lambda: app.screen.control is not None)
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, Choose) and "own process" in str(app.screen.question)
            await pilot.press("escape")  # stay
            assert app.is_running and "alpha" not in backend.requests
            await pilot.press("f1")
            assert isinstance(app.screen, Help)
            ids = {ident for _, rows in app.screen.sections for _, _, ident in rows}
            assert {"sessions.delete", "search.pause"} <= ids  # keymap ids, shown beside each key
            await pilot.press("escape", "ctrl+q")
            assert isinstance(app.screen, Choose)
            await pilot.press(answer)
        return backend

    assert "alpha" not in run(go("l")).requests  # left running: the process goes on without the app
    assert run(go("s")).requests["alpha"] == "cancel"  # stopped at its next safe point

    async def threads():  # work in the app's own threads (a benchmark) asks yes/no before quitting
        backend = FakeBackend(tmp_path)
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            control = Control()
            app.jobs["bench"] = control
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, Confirm)
            await pilot.press("y")
        return control

    assert run(threads()).cancelled

    async def broken():  # a search process that dies with an error: its line reaches the screen
        backend = FakeBackend(tmp_path)
        backend.exit_code = 2
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("r")
            await until(pilot, lambda: "model folder vanished" in text_of(app, "#log"))
            assert app.is_running
            await pilot.press("ctrl+p")
            await pilot.pause()
            assert type(app.screen).__name__ == "CommandPalette"

    run(broken())


def test_real_engine_from_the_form_to_a_finished_search(tmp_path, tokenizer):
    from conftest import make_model

    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    backend = Backend(tmp_path / "sessions")

    async def go():
        defaults = NewSession(name="real", model=str(folder), trials="2", sources="stdlib-docs",
                              objective="stdlib-docs/valid", device="cpu", metrics=["taylor1", "vector"])
        app = AdapruneApp(backend, new=True, defaults=defaults)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            assert isinstance(app.screen, NewSessionScreen)
            await pilot.press("ctrl+s")  # one key from the pre-filled form to a running search (its own process)
            await until(pilot, lambda: isinstance(app.screen, SearchScreen) and app.screen.control is None
                        and not app.searches() and app.screen.query_one(DataTable).row_count == 2, timeout=600)
            table = app.screen.query_one(DataTable)
            assert table.row_count == 2 and str(table.get_row_at(0)[0]) == "0 base"
            assert (tmp_path / "sessions" / "real" / "plan.json").exists()

    run(go())
    assert backend.sessions()[0].done == 2


def test_a_search_started_in_the_app_outlives_it_and_a_new_app_controls_it(tmp_path, tokenizer):
    """The search runs in its own process: the app quits (as a dropped SSH connection would end it) and the
    search goes on; a second app attaches to it and pauses, resumes and cancels it."""
    import os

    from conftest import make_model

    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    backend = Backend(tmp_path / "sessions")
    defaults = NewSession(name="long", model=str(folder), trials="5000", sources="stdlib-docs",
                          objective="stdlib-docs/valid", device="cpu", metrics=["vector"])

    async def first():
        from tui.screens.dialogs import Choose

        app = AdapruneApp(backend, new=True, defaults=defaults)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.pause()
            await pilot.press("ctrl+s")
            # created by a worker thread, then started in its own process: wait for both (a loaded CI is slow)
            await until(pilot, lambda: any(r.name == "long" for r in backend.sessions())
                        and backend.holder("long") is not None, timeout=120)
            await pilot.press("ctrl+q")
            assert isinstance(app.screen, Choose)
            await pilot.press("l")  # leave it running
        return app.return_code

    run(first())
    holder = backend.holder("long")
    assert holder is not None and os.kill(holder["pid"], 0) is None  # still running without any app

    async def second():
        app = AdapruneApp(backend)
        async with app.run_test(size=SIZE) as pilot:
            await pilot.press("enter")
            screen = app.screen
            assert isinstance(screen, SearchScreen) and screen.view_mode == "attach"
            await until(pilot, lambda: screen.control is not None)
            await pilot.press("p")
            await until(pilot, lambda: "paused at a safe point: the app" in text_of(app, "#log"), timeout=60)
            await pilot.press("p")
            await until(pilot, lambda: "resumed" in text_of(app, "#log"), timeout=60)
            await pilot.press("c")
            await until(pilot, lambda: screen.control is None and backend.holder("long") is None, timeout=60)

    run(second())
    row = backend.sessions()[0]
    assert row.status == "cancelled" and row.done < 5000, row  # stopped at a safe point, resumable


SCREENS = {"sessions": [], "search": ["enter"], "layers": ["l"], "bench": ["b"], "recover": ["f"], "export": ["x"],
           "new-session": ["n"], "help": ["question_mark"], "help-end": ["question_mark", "end"],
           "rename": ["e"], "delete": ["d"], "bench-form": ["b", "r"], "recover-form": ["f", "r"],
           "layer-channels": ["l", "m"]}


@pytest.mark.parametrize("keys", list(SCREENS.values()), ids=list(SCREENS))
def test_snapshots_of_the_main_screens(snap_compare, tmp_path, keys):
    """Every screen, form and dialog at 80x24 (the SVGs in __snapshots__ are what a user sees)."""
    app = AdapruneApp(FakeBackend(tmp_path))
    assert snap_compare(app, press=keys, terminal_size=SIZE)


@contextlib.asynccontextmanager
async def beta_search(tmp_path, log: list[dict]):
    """The app on session beta's Search screen, with `log` as beta's events log."""
    backend = FakeBackend(tmp_path)
    backend.store["beta"]["log"] = log
    app = AdapruneApp(backend)
    async with app.run_test(size=SIZE) as pilot:
        app.screen.query_one(DataTable).move_cursor(row=1)
        await pilot.press("enter")
        await pilot.pause()
        assert isinstance(app.screen, SearchScreen)
        yield app


def test_two_workers_stages_are_told_apart_not_mixed_in_one_bar(tmp_path):
    """Two processes of one search write the same log: the stage bar follows one of them, its label names it,
    the other's stage is on a line of its own, and the other's progress does not move the bar."""
    a, b = "111@far", "222@far"  # another host: nothing here can say they are gone
    log = [{"kind": "stage_started", "t": 1.0, "stage": "sample self text", "total": 64, "by": a},
           {"kind": "stage_started", "t": 2.0, "stage": "per-sample statistics stdlib-docs x64", "total": 64,
            "by": b},
           {"kind": "stage_progress", "t": 3.0, "stage": "sample self text", "done": 40, "total": 64, "by": a},
           {"kind": "stage_progress", "t": 3.0, "stage": "per-sample statistics stdlib-docs x64", "done": 8,
            "total": 64, "by": b}]

    async def go() -> None:
        async with beta_search(tmp_path, log) as app:
            assert text_of(app, "#stage") == "pid 222: per-sample statistics stdlib-docs x64"
            assert app.screen.query_one("#stage-bar", ProgressBar).progress == 8  # not a's 40
            assert text_of(app, "#others") == "also: process 111 on far: sample self text 40/64"
            assert app.screen.query_one("#others").display
            # b's stage ends: the bar goes over to what a is still doing, and the second line goes away
            app.screen.apply({"kind": "stage_finished", "t": 4.0, "stage": "per-sample statistics stdlib-docs x64",
                              "seconds": 2.0, "by": b})
            app.screen.show_others()
            assert text_of(app, "#stage") == "sample self text"  # the only one at work: no name needed
            assert app.screen.query_one("#stage-bar", ProgressBar).progress == 40
            assert not app.screen.query_one("#others").display

    run(go())


def test_a_search_run_by_workers_alone_reads_running_and_can_be_steered(tmp_path):
    """`adaprune worker` processes hold no lock: the screen knows them from the log (live pids of this host)."""
    from engine.api import Activity
    from engine.session.activity import me as this_process

    me = this_process()  # alive, on this host: a worker of the search
    log = [{"kind": "stage_started", "t": 1.0, "stage": "obs scores", "by": me}]
    assert Activity().feed(log).live() == [me]

    async def go() -> None:
        async with beta_search(tmp_path, log) as app:
            assert text_of(app, "#title") == f"session beta: running in worker process {os.getpid()}"
            app.screen.poll()
            assert app.screen.control is not None  # pause and cancel go to it through the requests file

    run(go())


def test_when_a_stage_ends_inside_another_the_bar_goes_back_to_the_outer_one(tmp_path):
    me = "7@far"
    log = [{"kind": "stage_started", "t": 1.0, "stage": "calibration pool self", "by": me},
           {"kind": "stage_started", "t": 2.0, "stage": "reconstruction statistics 48x128", "total": 30, "by": me},
           {"kind": "stage_finished", "t": 3.0, "stage": "reconstruction statistics 48x128", "seconds": 1.0,
            "by": me}]

    async def go() -> None:
        async with beta_search(tmp_path, log) as app:
            assert text_of(app, "#stage") == "calibration pool self"  # still at work in it, not the inner one

    run(go())


def test_a_paused_job_holds_its_bars_still():
    """While paused, no ETA counts the pause and a bar without a total stops pulsing; on resume both come back."""
    from textual.app import App

    from tui.widgets import hold_eta

    class Bars(App):
        def compose(self):
            yield ProgressBar(total=None, id="unknown")
            yield ProgressBar(total=10, id="known")

    async def go():
        app, control = Bars(), Control()
        async with app.run_test(size=SIZE) as pilot:
            bar = app.screen.query_one("#unknown").query_one("Bar")
            moving = bar.auto_refresh
            control.pause()
            hold_eta(app.screen, control)
            await pilot.pause()
            held = bar.auto_refresh, [eta.display for eta in app.screen.query("ETAStatus")]
            control.resume()
            hold_eta(app.screen, control)
            return moving, held, bar.auto_refresh, [eta.display for eta in app.screen.query("ETAStatus")]

    moving, (frozen, hidden), again, shown = run(go())
    assert moving and frozen is None and not any(hidden)
    assert again == moving and all(shown)
