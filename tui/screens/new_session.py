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
from tui.widgets import Checklist

# (short label, what to give: shown below the form for the focused field)
FIELDS = {
    "name": ("Session", "the session's name: letters, digits, '-', '_' and '.' (a folder under the sessions dir)"),
    "model": ("Model", "smollm2-135m (embedded), a hub id org/name, a local model folder or a .gguf file"),
    "prune": ("Prune", "the fraction of ALL parameters to remove, e.g. 0.20"),
    "layers": ("Layers", "'search' (the search picks the first and last kept layers) or a range A-B"),
    "sources": ("Calibration", "texts to calibrate on, comma-separated: stdlib-docs, self, files (.txt .jsonl .parquet)"),
    "metrics": ("Metrics", "importance metrics the search may choose (space toggles)"),
    "trials": ("Trials", "the trial budget: 20 takes about 10 minutes for the embedded model on 2 CPU cores"),
    "objective": ("Objective", "texts the objective measures PPL on, comma-separated (held-out splits)"),
    "device": ("Device", "auto, cpu, cuda or cuda:N"),
}


class NewSessionScreen(Screen):
    BINDINGS = [Binding("ctrl+s", "start", "Start", priority=True, id="new.start", tooltip="create the session and start its search"),
                Binding("escape", "back", "Back", id="new.back", tooltip="back, nothing created")]

    def __init__(self, defaults: NewSession | None = None) -> None:
        super().__init__()
        self.defaults = defaults or NewSession()
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="form", can_focus=False):  # Tab goes field to field; focus scrolls
            yield Static("New search session: fields are checked as you type; ctrl+s starts it.", markup=False,
                         classes="dim")
            for f in fields(NewSession):
                label, _ = FIELDS[f.name]
                with Horizontal(classes="row"):
                    yield Label(label, classes="rowlabel")
                    if f.name == "metrics":
                        yield Checklist(*[(m, m, m in self.defaults.metrics) for m in SEARCH_METRICS],
                                                 id="metrics", compact=True)
                    else:
                        yield Input(str(getattr(self.defaults, f.name)), id=f.name, compact=True)
                yield Static("", markup=False, id=f"{f.name}-problem", classes="error problem")
            yield Static("", markup=False, id="form-problem", classes="error problem")
            yield Static("", markup=False, id="memory", classes="dim")
            with Horizontal(classes="buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="start", compact=True)
        yield Static("", markup=False, id="hint", classes="dim")
        yield Static("", markup=False, id="status")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        # the first field, at the top: a search runs for minutes, so nothing starts on a stray Enter
        self.query_one("#name", Input).focus()
        self.check()

    def on_descendant_focus(self, event) -> None:
        name = getattr(event.widget, "id", None)
        self.query_one("#hint", Static).update(FIELDS[name][1] if name in FIELDS else "")

    def form(self) -> NewSession:
        values = {f.name: self.query_one(f"#{f.name}", Input).value for f in fields(NewSession) if f.name != "metrics"}
        return NewSession(**values, metrics=list(self.query_one("#metrics", SelectionList).selected))

    def check(self) -> dict[str, str]:
        problems = self.app.backend.check_new(self.form())
        for name in [*(f.name for f in fields(NewSession)), "form"]:
            line = self.query_one(f"#{name}-problem", Static)
            line.update(problems.get(name, ""))
            line.display = name in problems  # no blank line under a good field: the form fits 80x24
        for f in fields(NewSession):
            if f.name != "metrics":
                self.query_one(f"#{f.name}", Input).set_class(f.name in problems, "invalid")
        memory = "" if {"model", "device"} & set(problems) else self.app.backend.memory_line(self.form())
        self.query_one("#memory", Static).update(memory)
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
        if message.error:  # beside its field when it names one (a layer range past the model's depth)
            field = "layers" if "the model has layers" in message.error else "form"
            self.query_one(f"#{field}-problem", Static).update(message.error)
            self.query_one(f"#{field}-problem", Static).display = True
            self.query_one("#status", Static).update("")
            return
        self.app.pop_screen()
        self.app.open_search(message.result, mode="drive")
