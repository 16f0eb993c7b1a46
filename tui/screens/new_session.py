"""New session: a form with the embedded defaults filled in; problems are flagged beside each field."""

from __future__ import annotations

from dataclasses import fields

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Footer, Header, Input, Label, SelectionList, Static

from engine.config import SEARCH_METRICS
from tui.backend import NewSession
from tui.jobs import EngineEvent, JobDone, start_job

LABELS = {
    "name": "Session name",
    "model": "Model (smollm2-135m, hub id, folder or .gguf)",
    "prune": "Target: fraction of all parameters to remove",
    "layers": "Layers to prune ('search', or A-B)",
    "sources": "Calibration sources (comma-separated)",
    "trials": "Trial budget",
    "objective": "Objective texts (comma-separated)",
    "device": "Device (auto, cpu, cuda, cuda:N)",
}


class NewSessionScreen(Screen):
    BINDINGS = [Binding("ctrl+s", "start", "Start", priority=True), Binding("escape", "back", "Back")]

    def __init__(self, defaults: NewSession | None = None) -> None:
        super().__init__()
        self.defaults = defaults or NewSession()
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="form"):
            for f in fields(NewSession):
                if f.name == "metrics":
                    yield Label("Metrics to search", classes="field")
                    yield SelectionList[str](*[(m, m, m in self.defaults.metrics) for m in SEARCH_METRICS],
                                             id="metrics")
                    yield Static("", markup=False, id="metrics-problem", classes="error")
                    continue
                yield Label(LABELS[f.name], classes="field")
                yield Input(str(getattr(self.defaults, f.name)), id=f.name)
                yield Static("", markup=False, id=f"{f.name}-problem", classes="error")
            yield Static("", markup=False, id="form-problem", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="start")
        yield Static("", markup=False, id="status", classes="dim")
        yield Footer()

    def on_mount(self) -> None:
        self.query_one("#start", Button).focus()  # one key away from starting with the defaults
        self.check()

    def form(self) -> NewSession:
        values = {f.name: self.query_one(f"#{f.name}", Input).value for f in fields(NewSession) if f.name != "metrics"}
        return NewSession(**values, metrics=list(self.query_one("#metrics", SelectionList).selected))

    def check(self) -> dict[str, str]:
        problems = self.app.backend.check_new(self.form())
        for name in [*(f.name for f in fields(NewSession)), "form"]:
            self.query_one(f"#{name}-problem", Static).update(problems.get(name, ""))
        for f in fields(NewSession):
            if f.name != "metrics":
                self.query_one(f"#{f.name}", Input).set_class(f.name in problems, "invalid")
        return problems

    def on_input_changed(self, event: Input.Changed) -> None:
        self.check()

    def on_selection_list_selected_changed(self, event: SelectionList.SelectedChanged) -> None:
        self.check()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "start":
            self.action_start()

    def action_back(self) -> None:
        if not self.busy:
            self.app.pop_screen()

    def action_start(self) -> None:
        if self.busy:
            return
        problems = self.check()
        if problems:
            self.notify("fix the flagged fields first", severity="error")
            return
        self.busy = True
        form = self.form()
        self.query_one("#status", Static).update("creating the session (reading the model's config)…")
        start_job(self, "create", lambda sink, control: self.app.backend.create(form, sink))

    def on_engine_event(self, message: EngineEvent) -> None:
        text = getattr(message.event, "message", None) or getattr(message.event, "stage", "")
        if text:
            self.query_one("#status", Static).update(str(text))

    def on_job_done(self, message: JobDone) -> None:
        self.busy = False
        if message.error:
            self.query_one("#form-problem", Static).update(message.error)
            self.query_one("#status", Static).update("")
            return
        self.app.pop_screen()
        self.app.open_search(message.result, mode="drive")
