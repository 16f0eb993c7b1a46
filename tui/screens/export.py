"""Export: write the session's best plan as a Hugging Face folder, with progress."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Vertical
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, RadioButton, RadioSet, Static

from engine.errors import AdapruneError
from tui.jobs import EngineEvent, JobDone, start_job


class ExportScreen(Screen):
    BINDINGS = [Binding("escape", "back", "Back")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self.running = False

    def compose(self) -> ComposeResult:
        yield Header()
        with Vertical(id="export"):
            yield Static("", markup=False, id="format")
            yield Label("Folder to write")
            yield Input(f"out/{self.session_name}-best", id="out")
            with RadioSet(id="widths"):
                yield RadioButton("the searched plan (per-layer widths: trust_remote_code)", value=True, id="plan")
                yield RadioButton("uniform widths, re-planned (plain transformers)", id="uniform")
            yield Checkbox("replace the folder if it exists", id="force")
            yield Checkbox("with the LoRA recovery merged in (f on the sessions screen trains it)", id="lora",
                           disabled=True)
            yield Button("Export (enter)", variant="primary", id="go")
            yield Static("", markup=False, id="status")
        yield Footer()

    def on_mount(self) -> None:
        try:
            plan, best = self.app.backend.best_plan(self.session_name)
        except AdapruneError as e:
            self.query_one("#format", Static).update(f"error: {e}")
            return
        if plan is None:
            self.query_one("#format", Static).update("no completed trial yet: nothing to export")
            self.query_one("#go", Button).disabled = True
            return
        fmt = ("its widths are uniform: a standard config, loads in plain transformers" if plan.uniform else
               "its widths differ per layer: it loads with trust_remote_code=True (modeling_adaprune.py in the "
               "folder) or with adaprune; 'uniform' re-plans the same cut in every layer instead")
        self.query_one("#format", Static).update(
            f"best trial {best['trial']} (objective {best['value']:.3f}), {plan.params_after:,} parameters — {fmt}")
        try:
            state = self.app.backend.recovery_state(self.session_name)
        except AdapruneError:
            state = None
        lora = self.query_one("#lora", Checkbox)
        if state is not None and state["status"] == "done":
            lora.disabled, lora.value = False, True
            lora.label = (f"with the LoRA recovery merged in ({state['step']} steps, validation PPL "
                          f"{state['valid_ppl_before']:.2f} -> {state['valid_ppl_after']:.2f})")
        elif state is not None:
            lora.label = f"LoRA recovery stopped at step {state['step']}: finish it first (f on the sessions screen)"
        self.query_one("#out", Input).focus()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.export()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "go":
            self.export()

    def export(self) -> None:
        if self.running:
            return
        out = self.query_one("#out", Input).value.strip()
        if not out:
            self.query_one("#status", Static).update("give a folder")
            return
        self.running = True
        force, name = self.query_one("#force", Checkbox).value, self.session_name
        widths = "uniform" if self.query_one("#uniform", RadioButton).value else "plan"
        lora = self.query_one("#lora", Checkbox)
        recovered = lora.value and not lora.disabled
        if recovered and widths == "uniform":
            self.running = False
            self.query_one("#status", Static).update("the recovery was trained on the searched plan: export that "
                                                     "plan, or clear the LoRA box for uniform widths")
            return
        self.query_one("#status", Static).update(f"writing {out}…")
        start_job(self, "export", lambda sink, control: self.app.backend.export(name, out, force, widths, sink,
                                                                                 control, recovered))

    def on_engine_event(self, message: EngineEvent) -> None:
        stage = getattr(message.event, "stage", None)
        if stage:
            self.query_one("#status", Static).update(f"{stage}…")

    def on_job_done(self, message: JobDone) -> None:
        if message.job != "export":
            return
        self.running = False
        if message.error:
            self.query_one("#status", Static).update(f"error: {message.error}")
            return
        out = self.query_one("#out", Input).value.strip()
        how = "plain transformers" if message.result == "uniform" else "trust_remote_code=True"
        self.query_one("#status", Static).update(f"saved to {out} ({message.result} widths; loads with {how})")
        self.notify(f"exported to {out}")

    def action_back(self) -> None:
        self.app.pop_screen()
