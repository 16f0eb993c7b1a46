"""Export: choose the plan (the best trial's, your edited one, or another saved plan) and write it as a Hugging
Face folder, with progress; the status line under the form says what is written and what went wrong."""

from __future__ import annotations

from pathlib import Path

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import Screen
from textual.widgets import Button, Checkbox, Footer, Header, Input, Label, RadioButton, RadioSet, Static

from engine import api
from engine.errors import AdapruneError
from tui.jobs import EngineEvent, JobDone, start_job
from tui.widgets import Check, Radio


class ExportScreen(Screen):
    BINDINGS = [Binding("ctrl+s", "export", "Export", priority=True, id="export.write", tooltip="write the folder"),
                Binding("escape", "back", "Back", id="export.back", tooltip="back")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self.running = False
        self.control = None  # the running export's, while it runs
        self.choices: list = []  # api.PlanChoice, in the order of the radio buttons
        self.trained: str | None = None  # the plan a finished recovery was trained on
        self.lora_state: api.RecoveryState | None = None
        self.index = 0  # the chosen plan
        self.problem = ""  # the plans could not be read
        self.writing = ""  # what the running or last export writes, in words ("best, the LoRA recovery merged in")
        self.lora_wanted = True  # the LoRA box as the user left it (ticked until they clear it)

    def compose(self) -> ComposeResult:
        yield Header()
        with VerticalScroll(id="export", can_focus=False):  # Tab goes field to field; focus scrolls
            yield Static(f"export session {self.session_name}", markup=False, id="title")
            yield Label("Plan to write", classes="field")
            # the buttons are composed in the set (mounted later, the set would not know which one is on)
            yield RadioSet(*self.plan_buttons(), id="plans", compact=True)
            yield Static("", markup=False, id="format", classes="dim")
            yield Label("Widths", classes="field")
            with RadioSet(id="widths", compact=True):
                yield Radio("as planned (per-layer widths load with trust_remote_code)", value=True, id="widths-plan")
                yield Radio("uniform widths, re-planned from the best trial (plain transformers)", id="widths-uniform")
            with Horizontal(classes="row"):
                yield Label("Folder", classes="rowlabel")
                yield Input(f"out/{self.session_name}", id="out", compact=True)
            yield Check("replace the folder if it exists", id="force", compact=True)
            yield Check("with the LoRA recovery merged in (f on the sessions screen trains it)", id="lora",
                           disabled=True, compact=True)
            with Horizontal(classes="buttons"):
                yield Button("Export (ctrl+s)", variant="primary", id="go", compact=True)
        yield Static("", markup=False, id="status")
        yield Footer(compact=True)

    def plan_buttons(self) -> list[Radio]:
        try:
            self.choices = self.app.backend.plans(self.session_name)
        except AdapruneError as e:
            self.problem = f"error: {e}"
            return []
        # your edits, once re-evaluated, are what you meant to export: chosen by default (and said so)
        self.index = next((i for i, c in enumerate(self.choices) if c.name == f"plan:{api.OVERRIDES_PLAN}"), 0)
        return [Radio(f"{c.label}{f', objective {c.value:.3f}' if c.value is not None else ''}: "
                      f"{c.plan.params_after:,} parameters", value=i == self.index, id=f"choice-{i}", compact=True)
                for i, c in enumerate(self.choices)]

    def on_mount(self) -> None:
        if self.problem or not self.choices:
            self.query_one("#status", Static).update(self.problem or "no completed trial yet: nothing to export")
            self.query_one("#go", Button).disabled = True
            return
        self.show_lora()
        self.show_choice()
        out = self.query_one("#out", Input)
        out.focus()
        out.cursor_position = len(out.value)

    def chosen(self):
        return self.choices[self.index]

    def show_choice(self) -> None:
        c = self.chosen()
        fmt = ("Its widths are uniform: a standard config, plain transformers loads it" if c.plan.uniform else
               "Its widths differ per layer: it loads with trust_remote_code=True (modeling_adaprune.py in the "
               "folder) or with adaprune")
        self.query_one("#format", Static).update(f"{api.plan_summary(c.plan)}. {fmt}")
        uniform = self.query_one("#widths-uniform", RadioButton)
        uniform.disabled = c.name != "best"  # uniform widths re-plan the best trial's configuration
        if uniform.disabled and uniform.value:
            self.query_one("#widths-plan", RadioButton).value = True
        self.sync_lora()
        out = self.query_one("#out", Input)
        if out.value.startswith(f"out/{self.session_name}"):  # still the suggestion: name it after the plan
            out.value = f"out/{self.session_name}-{c.name.removeprefix('plan:')}"

    def show_lora(self) -> None:
        try:
            self.lora_state = self.app.backend.recovery_state(self.session_name)
        except AdapruneError:  # a damaged state file: the box says so (the sessions list says why)
            self.lora_state = None
            lora = self.query_one("#lora", Checkbox)
            lora.disabled, lora.value = True, False
            lora.label = "LoRA recovery: recovery/state.json cannot be read (the sessions list says why)"
            return
        if self.lora_state is not None and self.lora_state.status == "done":
            self.trained = self.lora_state.plan
        self.sync_lora()

    def sync_lora(self) -> None:
        """The LoRA box: offered (and ticked) only for the plan the finished recovery was trained on."""
        lora, state = self.query_one("#lora", Checkbox), self.lora_state
        if state is None:
            return
        if state.status != "done":
            lora.disabled, lora.value = True, False
            lora.label = f"LoRA recovery {state.status} at step {state.step}: merge it once it is done"
        elif self.choices and self.chosen().name == self.trained:
            lora.disabled, lora.value = False, self.lora_wanted
            lora.label = (f"merge the LoRA recovery ({state.step} steps, validation PPL "
                          f"{state.valid_ppl_before:.1f} -> {state.valid_ppl_after:.1f})")
        else:
            lora.disabled, lora.value = True, False
            lora.label = f"LoRA recovery: trained on {self.trained}, not on this plan"

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        if event.checkbox.id == "lora" and not event.checkbox.disabled:
            self.lora_wanted = event.value  # the user's; switching plans and back keeps it

    def on_radio_set_changed(self, event: RadioSet.Changed) -> None:
        if event.radio_set.id == "plans":
            self.index = event.index
            self.show_choice()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        if event.button.id == "go":
            self.action_export()

    def say(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def action_export(self) -> None:
        if self.running or not self.choices:
            return
        out = self.query_one("#out", Input).value.strip()
        if not out:
            self.say("give a folder to write")
            return
        force, name = self.query_one("#force", Checkbox).value, self.session_name
        widths = "uniform" if self.query_one("#widths-uniform", RadioButton).value else "plan"
        lora = self.query_one("#lora", Checkbox)
        recovered = lora.value and not lora.disabled
        plan = self.chosen().name
        if recovered and plan != self.trained:
            self.say(f"the LoRA recovery was trained on {self.trained}: choose that plan, or clear the LoRA box")
            return
        if Path(out).expanduser().exists() and not force:  # before any work, in the words of this form
            self.say(f"{out} exists: tick 'replace the folder if it exists', or give another folder")
            return
        self.running, self.writing = True, plan + (", the LoRA recovery merged in" if recovered else "")
        self.say(f"writing {self.writing} to {out}…")
        self.control = start_job(self, "export", lambda sink, control: self.app.backend.export(
            name, out, force, widths, sink, control, recovered, plan))


    def on_engine_event(self, message: EngineEvent) -> None:
        e = message.event
        stage = getattr(e, "stage", None)
        if stage:
            done, total = getattr(e, "done", None), getattr(e, "total", None)
            step = f" {done}/{total}" if done is not None and total else ""
            self.say(f"{stage}{step}… (Escape stops)")

    def on_job_done(self, message: JobDone) -> None:
        if message.job != "export":
            return
        self.running, self.control = False, None
        if message.cancelled:
            self.say("stopped: nothing was written")
            return
        if message.error:
            self.say(f"error: {message.error}")
            return
        out = Path(self.query_one("#out", Input).value.strip()).expanduser().resolve()  # relative to the app's start
        how = "plain transformers" if message.result == "uniform" else "trust_remote_code=True"
        self.say(f"saved {self.writing} to {out} ({message.result} widths; loads with {how})")
        self.notify(f"exported to {out}")

    def action_back(self) -> None:
        if self.running:  # stop first: the folder is written in the background, so leaving would hide its end
            if self.control is not None:
                self.control.cancel()
            self.say("stopping at the next safe point (nothing half-written is left); Escape goes back once it has stopped")
            return
        self.app.pop_screen()
