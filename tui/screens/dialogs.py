"""Small modal dialogs: confirm, ask for a value, help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Input, Label, Static


class Confirm(ModalScreen[bool]):
    """Yes/no; y and n answer at once, escape is no."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class Ask(ModalScreen[str | None]):
    """One value, checked by `check` (returns a problem or None) before the dialog closes."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "", check=None) -> None:
        super().__init__()
        self.question, self.value, self.check = question, value, check

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Label(self.question, classes="question")
            yield Input(self.value, id="answer")
            yield Static("", markup=False, id="problem", classes="error")

    def on_input_submitted(self, event: Input.Submitted) -> None:
        problem = self.check(event.value) if self.check else None
        if problem:
            self.query_one("#problem", Static).update(problem)
            return
        self.dismiss(event.value)

    def action_cancel(self) -> None:
        self.dismiss(None)


HELP = """\
adaprune prunes whole attention heads and MLP channels, choosing calibration data and importance metrics by
Bayesian optimisation (TPE). Keyboard first: every action has a key, shown in the footer for the screen
you are on; ctrl+p opens the command palette with all of them.

Sessions   enter open · n new · r resume · a attach (follow a headless run) · e rename · d delete
           l layers · b benchmarks · f recover (LoRA) · x export · F5 refresh
New        tab between fields (problems are flagged in place) · ctrl+s start · escape back
Search     p pause/resume · c cancel (the session stays resumable) · l layers · b benchmarks · escape back
Layers     k lock/unlock layer · h heads · c channels · r restore proposed plan · v re-evaluate
Benchmarks r run or extend the table
Recover    r start or continue · p pause/resume · c cancel (finished steps are kept) · x export
Export     enter write the folder (with the LoRA recovery merged in, once it has finished)
Anywhere   ctrl+p command palette · F1 or ? help · ctrl+q quit (asks first while work is running)
"""


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1,question_mark", "close", "Close")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            yield Static(HELP, markup=False)
            yield Label("escape closes", classes="dim")

    def action_close(self) -> None:
        self.dismiss(None)
