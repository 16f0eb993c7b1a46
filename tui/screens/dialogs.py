"""Small modal dialogs: confirm, ask for a value, help."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widget import Widget
from textual.widgets import Button, Input, Label, Static


def field_row(label: str, widget: Widget) -> Horizontal:
    """A one-line form field: a short label, then the (compact) input; forms fit 80x24 this way."""
    return Horizontal(Label(label, classes="rowlabel"), widget, classes="row")


class Confirm(ModalScreen[bool]):
    """Yes/no; y and n answer at once, escape is no."""

    BINDINGS = [Binding("y", "answer(True)", "Yes"), Binding("n,escape", "answer(False)", "No")]

    def __init__(self, question: str) -> None:
        super().__init__()
        self.question = question

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, markup=False, classes="question")
            with Horizontal(classes="buttons"):
                yield Button("Yes (y)", variant="error", id="yes")
                yield Button("No (n)", variant="primary", id="no")

    def on_mount(self) -> None:
        self.query_one("#no", Button).focus()

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")

    def action_answer(self, value: bool) -> None:
        self.dismiss(value)


class Choose(ModalScreen[str | None]):
    """One of a few answers, each with a key; escape answers None (stay)."""

    BINDINGS = [Binding("escape", "answer(None)", "Stay")]

    def __init__(self, question: str, answers: list[tuple[str, str, str]]) -> None:
        """`answers`: (value, button label, key)."""
        super().__init__()
        self.question, self.answers = question, answers

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, markup=False, classes="question")
            with Horizontal(classes="buttons"):
                for value, label, _ in self.answers:
                    yield Button(label, id=f"answer-{value}", compact=True)
                yield Button("Stay (escape)", variant="primary", id="answer-stay", compact=True)

    def on_mount(self) -> None:
        self.query_one("#answer-stay", Button).focus()

    def on_key(self, event) -> None:
        for value, _, key in self.answers:
            if event.key == key:
                event.stop()
                self.dismiss(value)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        value = (event.button.id or "").removeprefix("answer-")
        self.dismiss(None if value == "stay" else value)

    def action_answer(self, value: str | None) -> None:
        self.dismiss(value)


class Ask(ModalScreen[str | None]):
    """One value, checked (or applied) by `check`, which returns a problem or None: with a problem the dialog
    stays open and shows it in place, so keys typed next still go to the dialog."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, question: str, value: str = "", check=None) -> None:
        super().__init__()
        self.question, self.value, self.check = question, value, check

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, markup=False, classes="question")
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


HELP_INTRO = (
    "adaprune prunes whole attention heads and MLP channels, choosing calibration data and importance metrics "
    "by Bayesian optimisation (TPE). Every action has a key (the footer shows the main ones); ctrl+p opens the "
    "command palette with all of them. Arrows and page keys scroll this help.\n"
)


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1,question_mark", "close", "Close")]

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            with VerticalScroll(id="help-text"):
                yield Static(self.text, markup=False)
            yield Label("escape closes; arrows scroll", classes="dim")

    def on_mount(self) -> None:
        self.query_one("#help-text").focus()

    def action_close(self) -> None:
        self.dismiss(None)
