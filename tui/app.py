"""The adaprune app: sessions, a new search, the live search, layers, benchmarks, recovery, export.

It talks to the engine only through `tui.backend.Backend` (the engine's public API) and the engine's event
stream; engine work runs in worker threads (`tui.jobs`), so the app answers keys while the engine works.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from functools import partial
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from engine import api
from engine.control import Control
from engine.errors import AdapruneError
from tui import keys
from tui.backend import Backend, NewSession
from tui.screens.bench import BenchScreen
from tui.screens.dialogs import HELP_INTRO, Choose, Confirm, Help
from tui.screens.export import ExportScreen
from tui.screens.follow import Remote
from tui.screens.layers import LayersScreen
from tui.screens.new_session import NewSessionScreen
from tui.screens.recover import RecoverScreen
from tui.screens.search import SearchScreen
from tui.screens.sessions import SessionsScreen


class AdapruneApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "adaprune"
    SUB_TITLE = "structured pruning, searched"
    BINDINGS = [
        Binding("ctrl+q", "quit_app", "Quit", priority=True, id="app.quit", tooltip="quit (asks first while work is running)"),
        Binding("f1,question_mark", "help", "Help", id="app.help", tooltip="this help"),
    ]

    def __init__(self, backend: Backend | None = None, sessions_dir: Path | None = None, new: bool = False,
                 defaults: NewSession | None = None) -> None:
        # NO_COLOR (--no-color): Textual strips every colour only from ANSI-themed output, else it greys them
        super().__init__(ansi_color=True if "NO_COLOR" in os.environ else None)
        self.backend = backend or Backend(sessions_dir or api.default_dir())
        self.jobs: dict[str, Control] = {}  # engine work in flight in this app's threads, by job name
        # the processes this app started (searches, recoveries: they outlive it), by (job, session)
        self.background: dict[tuple[str, str], subprocess.Popen] = {}
        self.start_new, self.defaults = new, defaults
        self.keymap: dict[str, str] = {}

    def on_mount(self) -> None:
        self.keymap, problem = keys.load_keymap()
        self.set_keymap(self.keymap)
        if problem:
            self.notify(problem, severity="warning", timeout=10)
        # torch and the feature modules load in the background: the list shows at once, a plan opens quickly
        self.run_worker(api.warm_up, thread=True, group="warm-up", exit_on_error=False)
        self.push_screen(SessionsScreen())
        if self.start_new:
            self.open_new_session()

    # --- navigation (screens and the command palette call these) -------------------------------------------

    def open_new_session(self) -> None:
        defaults = self.defaults or NewSession(name=self._free_name())
        self.push_screen(NewSessionScreen(defaults))

    def _free_name(self, base: str = "smol20") -> str:
        taken = {r.name for r in self.backend.sessions()}
        return next(n for n in [base, *(f"{base}-{i}" for i in range(2, 1000))] if n not in taken)

    def searches(self, job: str = "search") -> dict[str, subprocess.Popen]:
        """The processes of `job` (search, recover, bench) this app started that still run, by session."""
        return {n: p for (j, n), p in self.background.items() if j == job and p.poll() is None}

    def open_search(self, name: str, mode: str = "view") -> None:
        """`drive` starts the session's search in a detached process unless one already runs it; any search
        that runs is followed (`attach`), with pause and cancel; otherwise the saved trials (`view`)."""
        process = self.searches().get(name)
        try:
            running = process is not None or self.backend.is_running(name)
        except AdapruneError as e:
            self.notify(str(e), severity="error")
            return
        if mode == "drive" and not running:
            try:
                budget = self.backend.all_trials_done(name)
            except AdapruneError as e:
                self.notify(str(e), severity="error")
                return
            if budget is not None:
                self.notify(f"nothing to resume: {name} has run all {budget} trials", severity="information")
                mode = "view"
        recovering = self.backend.holder(name, "recover") if mode == "drive" and not running else None
        if recovering:  # the session's lock is the recovery's: a search process would only be refused
            self.notify(f"{name}'s LoRA recovery runs in process {recovering.get('pid')}: the search can resume "
                        f"when it ends", severity="warning")
            mode = "view"
        if mode == "drive" and not running:
            others = [n for n in self.searches() if n != name]
            if others:
                self.notify(f"a search started here still runs ({others[0]}): one at a time, they share the "
                            f"CPU/GPU", severity="warning")
                mode = "view"
            else:
                try:
                    process = self.backend.start_search(name)
                except (AdapruneError, OSError) as e:
                    self.notify(f"cannot start the search: {e}", severity="error")
                    return
                self.background["search", name] = process
                running = True
        elif mode == "drive":
            self.notify(f"{name} already runs in a process: following it", severity="warning")
        elif mode == "attach" and not running:
            self.notify(f"no process runs the search of {name}: its saved trials (r resumes it)")
        self.push_screen(SearchScreen(name, "attach" if running else "view", process))

    def open_layers(self, name: str) -> None:
        self.push_screen(LayersScreen(name))

    def open_bench(self, name: str) -> None:
        self.push_screen(BenchScreen(name))

    def open_export(self, name: str) -> None:
        self.push_screen(ExportScreen(name))

    def open_recover(self, name: str) -> None:
        self.push_screen(RecoverScreen(name))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        """The palette: Textual's own (theme, screenshot), then every key of this screen and the app,
        from their bindings (so the palette, the help and the footer cannot disagree)."""
        for command in super().get_system_commands(screen):
            # Textual's Quit quits at once (ours asks while work runs); its Keys panel repeats our Help
            if command.title not in ("Quit", "Keys", "Maximize", "Minimize"):  # no pane here to maximize
                yield command
        if not isinstance(screen, SessionsScreen):  # there its own "New" key says it
            yield SystemCommand("New session", "Open the new-session form", self.open_new_session)
        for owner in (screen, self):
            for b in keys.bindings(type(owner)):
                action = b.action.partition("(")[0]
                if not hasattr(owner, f"action_{action}") or owner.check_action(action, ()) is False:
                    continue
                yield SystemCommand(b.description, f"{b.tooltip or b.description} · key "
                                    f"{keys.keys_of(b, self.keymap)}",
                                    partial(self.call_later, owner.run_action, b.action))

    def help_screen(self) -> Help:
        """The keys of every screen, opened at the section of the screen it is asked from."""
        sections = [("Anywhere", AdapruneApp), ("Sessions", SessionsScreen), ("New session", NewSessionScreen),
                    ("Search", SearchScreen), ("Layers", LayersScreen), ("Benchmarks", BenchScreen),
                    ("Recover", RecoverScreen), ("Export", ExportScreen)]
        here = next((title for title, cls in sections if type(self.screen) is cls), None)
        remap = f"Keys are remapped by binding id in {keys.keymap_path()}, e.g. {{\"sessions.delete\": \"D\"}}."
        return Help(f"{HELP_INTRO}{remap}", keys.help_rows(sections, self.keymap), at=here)

    def _paused(self, name: str, job: str) -> bool:
        try:
            return self.backend.paused(name, job)
        except AdapruneError:
            return False

    # --- app-wide actions -----------------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, Help):
            self.push_screen(self.help_screen())

    async def action_quit(self) -> None:
        self.action_quit_app()  # every way out asks while work runs

    def action_quit_app(self) -> None:
        running = [(job, name) for job in ("search", "recover", "bench") for name in self.searches(job)]
        # and those another process runs that a screen here follows (and can pause and cancel)
        for screen in self.screen_stack:
            control = getattr(screen, "control", None)
            if isinstance(control, Remote) and (control.job, control.name) not in running:
                running.append((control.job, control.name))
        if running and not self.jobs:
            noun = {"search": "search", "recover": "recovery", "bench": "benchmark"}
            paused = {(job, name) for job, name in running if self._paused(name, job)}
            what = ", ".join(f"the {noun[job]} of {name}" + (" (paused)" if (job, name) in paused else "")
                             for job, name in running)
            held = (" Left paused, it holds its session until resumed (p when you follow it again, or "
                    f"`adaprune resume {next(iter(paused))[1]}`).") if paused else ""

            def chosen(answer: str | None) -> None:
                if answer == "stop":
                    for job, name in running:
                        try:
                            self.backend.request(name, "cancel", job)  # stops at its next safe point, resumable
                        except AdapruneError as e:
                            self.notify(str(e), severity="error")
                            return
                if answer in ("leave", "stop"):
                    self.exit()

            self.push_screen(Choose(
                f"{what[0].upper()}{what[1:]} runs in its own process. Leave it running (it goes on without the "
                f"app; the session's screen follows it again), or stop it (at its next safe point; finished work "
                f"is kept and it resumes)?{held}", [("leave", "Leave it running (l)", "l"),
                                              ("stop", "Stop it (s)", "s")]), chosen)
            return
        if not self.jobs:
            self.exit()
            return

        def done(yes: bool | None) -> None:
            if yes:
                for control in list(self.jobs.values()):
                    control.cancel()  # the engine stops at its next safe point; sessions stay resumable
                self.exit()

        running = ", ".join(sorted(self.jobs))
        self.push_screen(Confirm(f"Work is running ({running}). Quit? It stops at the next safe point and the "
                                 f"session stays resumable."), done)
