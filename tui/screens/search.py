"""The search, live: trials streaming into a table, best-so-far, the current stage with its progress.

A search always runs in a process of its own (the app starts one detached from its terminal, or it is a
headless `adaprune search` / `worker`): `attach` follows it from the session's events file and pauses,
resumes and cancels it through the session's requests file, so quitting the app, closing the terminal or
losing the SSH connection leaves it running, and a later app attaches with the same keys. `view` shows a
finished or stopped session's trials.
"""

from __future__ import annotations

import re
import time

from rich.text import Text
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Sparkline, Static

from engine import api
from engine.api import Activity, TrialRow, TrialRows
from engine.errors import AdapruneError
from engine.events import (
    BestChanged,
    Event,
    Log,
    SearchFinished,
    StageFinished,
    StageProgress,
    StageStarted,
    event_from_dict,
)
from tui.report import calib_text, cut, describe, layout_text, metric_text
from tui.screens.follow import JobControls, Remote
from tui.widgets import RowTable, hold_eta

# what matters first on 80 columns; the configuration follows (scroll right for all of it)
COLUMNS = ("trial", "objective", "vs base", "state", "metric", "calibration", "layout")


class SearchScreen(JobControls, Screen):
    BINDINGS = [
        Binding("p", "pause", "Pause", id="search.pause", tooltip="pause or resume at the next safe point"),
        Binding("p", "resume", "Resume", id="search.resume", tooltip="go on from where it paused"),
        Binding("c", "cancel", "Cancel", id="search.cancel", tooltip="stop the search (the session stays resumable)"),
        Binding("r", "resume_search", "Resume", id="search.resume-search",
                tooltip="run the trials still to go (when no process runs the search)"),
        # p, c and r when they can do nothing: say so instead of nothing (hidden: the footer offers what works)
        Binding("p", "idle", show=False, id="search.idle-pause"),
        Binding("c", "idle", show=False, id="search.idle-cancel"),
        Binding("r", "idle", show=False, id="search.idle-resume"),
        Binding("l", "layers", "Layers", id="search.layers", tooltip="the best plan, layer by layer"),
        Binding("b", "bench", "Bench", id="search.bench", tooltip="benchmarks"),
        Binding("x", "export", "Export", id="search.export", tooltip="export a pruned model folder"),
        Binding("f", "recover", "Recover", show=False, id="search.recover", tooltip="recover quality with LoRA"),
        Binding("escape", "back", "Back", id="search.back", tooltip="back (a search keeps running)"),
    ]

    def __init__(self, name: str, mode: str = "view", process=None) -> None:
        """`process`: the search process this app started (its exit code and pid), when it did."""
        super().__init__()
        self.session_name, self.view_mode = name, mode
        self.board = TrialRows()
        self.process = process
        self._control = None
        self.ended_reported = False
        self.log_offset = 0
        self.stage_started = 0.0
        self.trials_total = 0
        self.pause_acked = False  # the engine logged that it has paused (not only that a pause was asked)
        self.finished: SearchFinished | None = None  # how the last run ended, when it has
        self.activity = Activity()  # each process's open stages (workers share the log)
        self.shown_by = ""  # the process whose stage the stage bar shows
        self._resumable = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="search"):
            yield Static("", markup=False, id="title")
            with Horizontal(classes="bars"):
                yield Static("trials", markup=False, classes="barlabel")
                yield ProgressBar(id="trials-bar", show_eta=True)
            with Horizontal(classes="bars"):
                yield Static("", markup=False, id="stage", classes="barlabel")
                yield ProgressBar(id="stage-bar", show_eta=True)
            yield Static("", markup=False, id="others", classes="dim")  # the other workers' stages, when any
            yield RowTable(id="trials", cursor_type="row", zebra_stripes=True)
            yield Static("", markup=False, id="trial", classes="dim")  # the cursor row whole (80 columns cut it)
            with Horizontal(id="best-row"):
                yield Static("best so far", markup=False, id="best", classes="barlabel")
                yield Sparkline([], id="best-line")
            yield Static("", markup=False, id="plan")
            yield Static("", markup=False, id="log", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        try:
            cfg = self.app.backend.config(self.session_name)
        except AdapruneError as e:
            self.notify(str(e), severity="error")
            return
        self.trials_total = int(cfg.get("trials", 0))
        self.query_one("#trials-bar", ProgressBar).update(total=self.trials_total, progress=0)
        self.replay_history()
        self.show_best_plan()
        self.update_title()
        if self.process is not None and self.process.poll() is None:  # until its first event: not the old news
            self.query_one("#log", Static).update(f"starting the search in process {self.process.pid}…")
        if self.view_mode == "attach":
            self.poll()
            self.set_interval(0.5, self.poll)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "idle":  # after the bindings that work: only when none of them does
            return True
        if action == "resume_search":
            return self.control is None and self.resumable()
        return super().check_action(action, parameters)

    def resumable(self) -> bool:
        """Trials are still to go, or the best is not saved yet (read when the title is: not at every key)."""
        return self._resumable

    def _read_resumable(self) -> bool:
        try:
            return self.app.backend.all_trials_done(self.session_name) is None
        except AdapruneError:
            return False

    def update_title(self) -> None:
        holder, workers = self.running(), self.activity.live()  # workers: `adaprune worker` processes, no lock
        self._resumable = holder is None and not workers and self._read_resumable()
        if self.process is not None and self.process.poll() is None:
            what = f"running in process {self.process.pid} (it keeps running if you quit or the connection drops)"
        elif holder:
            what = f"running in process {holder.get('pid')} on {holder.get('host')}"
        elif workers:
            pids = ", ".join(by.partition("@")[0] for by in workers)
            what = f"running in worker process{'es' if len(workers) > 1 else ''} {pids}"
        elif self.finished is not None:  # how its last run ended, in the words of the sessions list
            f = self.finished
            what = f"{f.status}, {f.completed}/{f.total} trials" + (" (r resumes)" if self._resumable else "")
        elif self.board.rows:
            what = f"stopped, {len(self.board.rows)} trials (its process ended; r resumes)"
        else:
            what = "not started (r starts it)"
        paused = ""
        if self.control is not None and self.control.paused:
            paused = " — paused (p resumes)" if self.pause_acked else " — pause requested"
        self.query_one("#title", Static).update(f"session {self.session_name}: {what}{paused}")
        self.refresh_bindings()  # pause and cancel are offered only while this app runs the search

    def show_best_plan(self) -> None:
        """What the search has found so far, in what it keeps (the last trial's log is not the result)."""
        try:
            plan, best = self.app.backend.best_plan(self.session_name)
        except AdapruneError as e:
            self.query_one("#plan", Static).update(f"best plan: unreadable ({e})")
            return
        if plan is not None:
            self.query_one("#plan", Static).update(f"best plan (trial {best.trial}): {api.plan_summary(plan)}")

    # --- sources of events ----------------------------------------------------------------------------------

    def replay_history(self) -> None:
        """What the session's log already holds: trials run before, by this app or another process."""
        events, self.log_offset = self.app.backend.follow(self.session_name, 0, "search")
        for e in events:
            self.apply(e, live=False)
        # the rows once, at the end: re-rendering as each event is folded in froze a 300-trial session for 20 s
        table = self.query_one(DataTable)
        for number in sorted(self.board.rows):
            table.add_row(*self.cells(self.board.rows[number]), key=str(number))
        self.show_others()

    def running(self) -> dict | None:
        try:
            return self.app.backend.holder(self.session_name)
        except AdapruneError:
            return None

    def poll(self) -> None:
        self._poll()
        hold_eta(self, self.control)

    def _poll(self) -> None:
        try:
            events, self.log_offset = self.app.backend.follow(self.session_name, self.log_offset, "search")
        except AdapruneError as e:
            self.notify(str(e), severity="error")
            return
        for e in events:
            self.apply(e)
        if events:
            self.show_others()
        started = self.process is not None and self.process.poll() is None  # ours, maybe not holding yet
        alive = started or self.running() is not None or bool(self.activity.live())
        if alive and self.control is None:
            self.control = Remote(self.app.backend, self.session_name)
            self.update_title()
        elif not alive:
            bar = self.query_one("#stage-bar", ProgressBar)
            if bar.total is None:  # a stage the log began but no process is running now: no endless pulse
                bar.update(total=1, progress=0)
            if self.control is not None:
                self.control = None  # the process this screen followed has ended
                self.update_title()
            if self.process is not None:  # ours: say how it ended, even if it died before a poll saw it run
                self.ended()

    def ended(self) -> None:
        """Say how the search process ended when it did not end well (its log has the line)."""
        code = self.process.poll() if self.process is not None else None
        if code not in (None, 0) and not self.ended_reported:
            self.ended_reported = True
            error = self.app.backend.last_error(self.session_name) or f"the search process exited with {code}"
            self.query_one("#log", Static).update(cut(error, 300))
            self.notify(error, severity="error", timeout=10)

    # --- rendering ------------------------------------------------------------------------------------------

    def apply(self, event: Event | dict, live: bool = True) -> None:
        if isinstance(event, dict):
            event = event_from_dict(event)
        self.activity.apply(event)
        if isinstance(event, SearchFinished):
            self.finished = event
        elif self.finished is not None:  # a later run began: what the last one said is not news
            self.finished = None
            self.query_one("#log", Static).update("")
        best_before = self.board.best
        if self.board.apply(event):
            if live:
                self.show_rows(event, best_before)
            if isinstance(event, BestChanged):
                self.query_one("#best-line", Sparkline).data = [v for _, v in self.board.best_history]
                self.query_one("#best", Static).update(f"best: trial {event.number}, {event.value:.3f}")
                if live:
                    self.show_best_plan()
            done = sum(1 for r in self.board.rows.values() if r.state in ("complete", "pruned"))
            self.query_one("#trials-bar", ProgressBar).update(progress=done)
        elif isinstance(event, StageStarted) and event.stage != "trials":
            self.shown_by = event.by
            self.stage_started = time.monotonic()
            self.query_one("#stage", Static).update(self.who(event.by) + event.stage)
            self.query_one("#stage-bar", ProgressBar).update(total=event.total, progress=0)
        elif isinstance(event, StageProgress) and event.stage != "trials":
            if event.by == self.shown_by:  # another worker's progress does not move this one's bar
                self.query_one("#stage-bar", ProgressBar).update(total=event.total, progress=event.done)
        elif isinstance(event, StageFinished) and event.stage != "trials" and event.by == self.shown_by:
            bar = self.query_one("#stage-bar", ProgressBar)
            if event.outcome != "done":
                self.query_one("#stage", Static).update(f"{self.who(event.by)}{event.stage} ({event.outcome})")
            elif not self.show_open_stage(event.by):
                bar.update(total=bar.total or 1, progress=bar.total or 1)
        elif isinstance(event, Log) and event.level != "info":
            self.query_one("#log", Static).update(cut(event.message, 200))  # the trial's plan line is not shown
            if "paused at a safe point" in event.message or event.message.endswith(" resumed"):
                self.pause_acked = "paused at a safe point" in event.message  # the engine says it has paused
                if live:
                    self.update_title()
        elif isinstance(event, SearchFinished):  # the line the user reads says how it ended, not its last log
            best = f", best trial {event.best_number} ({event.best_value:.3f})" if event.best_value else ""
            more = " (r resumes)" if event.status == "cancelled" else ""
            said = f"search {event.status}: {event.completed}/{event.total} trials{best}{more}"
            self.query_one("#log", Static).update(said)
            if live:
                self.notify(said)

    def who(self, by: str) -> str:
        """'pid 123: ' before a stage while more than one process of the search is at work."""
        return f"pid {by.partition('@')[0]}: " if by and len(self.activity.doing()) > 1 else ""

    def show_open_stage(self, done_by: str) -> bool:
        """When the shown stage ends inside another of the same process (a pool around its statistics), show that
        one; else one another process is inside. False when none is open."""
        doing = [d for d in self.activity.doing() if d.stage is not None]
        other = next((d for d in doing if d.by == done_by), None) or next(iter(doing), None)
        if other is None:
            return False
        assert other.stage is not None
        self.shown_by = other.by
        self.query_one("#stage", Static).update(self.who(other.by) + other.stage.stage)
        self.query_one("#stage-bar", ProgressBar).update(total=other.stage.total, progress=other.stage.done)
        return True

    def show_others(self) -> None:
        """One line for what the other processes of this search are doing (workers beside the shown one)."""
        others = [d.line() for d in self.activity.doing() if d.by != self.shown_by]
        line = self.query_one("#others", Static)
        line.update(cut("also: " + "; ".join(others), 160) if others else "")
        line.display = bool(others)

    def show_rows(self, event: Event, best_before: int | None) -> None:
        """Re-render what one event changed: its row; the old and the new best when the best moves; every row
        when it was the baseline's (every gain is read against it)."""
        number = getattr(event, "number", None)
        if number is not None and self.board.baseline is self.board.rows.get(number):
            numbers = list(self.board.rows)
        else:
            numbers = [n for n in (number, best_before) if n is not None]
        for n in dict.fromkeys(numbers):
            if n in self.board.rows:
                self.show_row(self.board.rows[n])

    def cells(self, r: TrialRow) -> tuple[Text, ...]:
        gain = self.board.gain(r)
        base = self.board.is_baseline(r)
        value = f"{r.value:.3f}" if r.value is not None else ""
        if r.state == "pruned":  # a running value over the first batches: not comparable with a whole objective
            value, state = f"({value})", _stopped(r.message)
        else:
            state = "best" if r.number == self.board.best else r.state
        cells = (f"{r.number}" + (" base" if base else ""), value, f"{-gain:+.1%}" if gain is not None and not base
                 else "", state, metric_text(r.params), calib_text(r.params), layout_text(r.params))
        style = "bold green" if r.number == self.board.best else "dim" if r.state in ("pruned", "duplicate") else ""
        return tuple(Text(c, style=style) for c in cells)

    def show_row(self, r: TrialRow) -> None:
        table = self.query_one(DataTable)
        cells, key = self.cells(r), str(r.number)
        if key in table.rows:
            for col, value in zip(COLUMNS, cells, strict=True):
                table.update_cell(key, col, value, update_width=True)  # "running" -> "stopped at 3"
        else:
            table.add_row(*cells, key=key)

    def on_data_table_row_highlighted(self, event: DataTable.RowHighlighted) -> None:
        self.describe_row(event.row_key.value)

    def describe_row(self, key: str | None) -> None:
        r = self.board.rows.get(int(key)) if key is not None and key.isdigit() else None
        text = "" if r is None else f"trial {r.number}: {describe(r.params)}" + (
            f" ({r.seconds:.0f} s)" if r.seconds else "")
        self.query_one("#trial", Static).update(text)

    # --- actions --------------------------------------------------------------------------------------------

    def action_pause(self) -> None:
        if self.control is None:
            self.notify("no search is running", severity="warning")
            return
        try:
            if self.control.paused:
                self.control.resume()
                self.notify("resuming")
            else:
                self.control.pause()
                self.notify("pausing at the next safe point (between batches or trials)")
        except AdapruneError as e:
            self.notify(str(e), severity="error")
        self.update_title()

    def action_cancel(self) -> None:
        if self.control is None:
            self.notify("no search is running", severity="warning")
            return
        try:
            self.control.cancel()
        except AdapruneError as e:
            self.notify(str(e), severity="error")
            return
        self.notify("cancelling at the next safe point… (the session stays resumable)")

    def action_idle(self) -> None:
        if self.control is not None:  # r while it runs
            self.notify(f"the search of {self.session_name} is running: p pauses it, c stops it", severity="warning")
            return
        more = "r resumes it" if self.resumable() else "it has run all its trials, nothing to resume"
        self.notify(f"no search of {self.session_name} is running: {more}", severity="warning")

    def action_resume_search(self) -> None:
        """Run the trials still to go, in a process of its own, and follow it here (as r on the sessions list)."""
        name = self.session_name
        self.app.pop_screen()
        self.app.open_search(name, mode="drive")

    def action_recover(self) -> None:
        self.app.open_recover(self.session_name)

    def action_back(self) -> None:
        if self.control is not None:
            self.notify("the search keeps running in its own process; enter on the sessions screen follows it")
        self.app.pop_screen()

    def action_layers(self) -> None:
        self.app.open_layers(self.session_name)

    def action_bench(self) -> None:
        self.app.open_bench(self.session_name)

    def action_export(self) -> None:
        self.app.open_export(self.session_name)


def _stopped(message: str) -> str:
    """'stop 2/8' from the engine's "stopped early: objective over 2/8 batches" (older logs: 'stopped')."""
    m = re.search(r"(\d+)/(\d+) batches", message)
    return f"stop {m.group(1)}/{m.group(2)}" if m else "stopped"


