"""The adaprune app: sessions, a new search, the live search, layers, benchmarks, recovery, export.

It talks to the engine only through `tui.backend.Backend` (the engine's public API) and the engine's event
stream; engine work runs in worker threads (`tui.jobs`), so the app answers keys while the engine works.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen

from engine import api
from engine.control import Control
from tui.backend import Backend, NewSession
from tui.screens.bench import BenchScreen
from tui.screens.dialogs import Confirm, Help
from tui.screens.export import ExportScreen
from tui.screens.layers import LayersScreen
from tui.screens.new_session import NewSessionScreen
from tui.screens.recover import RecoverScreen
from tui.screens.search import SearchScreen
from tui.screens.sessions import SessionsScreen


class AdapruneApp(App):
    CSS_PATH = "app.tcss"
    TITLE = "adaprune"
    SUB_TITLE = "structured pruning with searched calibration and metrics"
    BINDINGS = [
        Binding("ctrl+q", "quit_app", "Quit", priority=True),
        Binding("f1,question_mark", "help", "Help"),
    ]

    def __init__(self, backend: Backend | None = None, sessions_dir: Path | None = None, new: bool = False,
                 defaults: NewSession | None = None) -> None:
        super().__init__()
        self.backend = backend or Backend(sessions_dir or api.default_dir())
        self.jobs: dict[str, Control] = {}  # engine work in flight, by job name
        self.searching: str | None = None  # the session whose search this app runs, if any
        self.start_new, self.defaults = new, defaults

    def on_mount(self) -> None:
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
        taken = {r["name"] for r in self.backend.sessions()}
        return next(n for n in [base, *(f"{base}-{i}" for i in range(2, 1000))] if n not in taken)

    def open_search(self, name: str, mode: str = "view") -> None:
        control = None
        if "search" in self.jobs and self.searching == name:
            mode, control = "attach", self.jobs["search"]  # ours, started from a screen since left
        elif mode == "drive" and "search" in self.jobs:
            self.notify(f"a search is already running in this app ({self.searching}): one at a time, they share "
                        f"the CPU/GPU", severity="warning")
            mode = "view"
        elif mode in ("drive", "view") and self.backend.is_running(name):
            if mode == "drive":
                self.notify(f"{name} is driven by another process: following it", severity="warning")
            mode = "attach"
        self.push_screen(SearchScreen(name, mode, control))

    def open_layers(self, name: str) -> None:
        self.push_screen(LayersScreen(name))

    def open_bench(self, name: str) -> None:
        self.push_screen(BenchScreen(name))

    def open_export(self, name: str) -> None:
        self.push_screen(ExportScreen(name))

    def open_recover(self, name: str) -> None:
        self.push_screen(RecoverScreen(name))

    def get_system_commands(self, screen: Screen) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("New session", "Open the new-session form", self.open_new_session)
        yield SystemCommand("Help", "Keys and screens", self.action_help)
        for action, title in (("open", "Open session"), ("resume", "Resume session"),
                              ("attach", "Attach to session"), ("layers", "Review layers"),
                              ("bench", "Benchmarks"), ("recover", "Recover with LoRA"), ("export", "Export"),
                              ("rename", "Rename session"),
                              ("delete", "Delete session"), ("pause", "Pause / resume search"),
                              ("cancel", "Cancel search"), ("reevaluate", "Re-evaluate overrides"),
                              ("restore", "Restore proposed plan"), ("run", "Run benchmark"),
                              ("train", "Start or continue recovery")):
            if hasattr(screen, f"action_{action}"):
                yield SystemCommand(title, f"{title} ({type(screen).__name__.removesuffix('Screen')})",
                                    getattr(screen, f"action_{action}"))

    # --- app-wide actions -----------------------------------------------------------------------------------

    def action_help(self) -> None:
        if not isinstance(self.screen, Help):
            self.push_screen(Help())

    def action_quit_app(self) -> None:
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
