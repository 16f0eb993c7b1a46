"""Small modal dialogs: confirm, ask for a value, help."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text
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

    def __init__(self, question: str, value: str = "", check=None, live=None) -> None:
        """`live`: a check without side effects, run as the user types (`check` may act, e.g. rename)."""
        super().__init__()
        self.question, self.value, self.check, self.live = question, value, check, live

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static(self.question, markup=False, classes="question")
            yield Input(self.value, id="answer")
            yield Static("", markup=False, id="problem", classes="error")
            yield Label("enter answers; escape cancels", classes="dim")

    def on_input_changed(self, event: Input.Changed) -> None:
        if self.live is not None:
            self.query_one("#problem", Static).update(self.live(event.value) or "")

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
    "command palette with all of them. Arrows, page keys, Home and End scroll this help. "
)


class Help(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,f1,question_mark", "close", "Close")]

    def __init__(self, intro: str, sections: list[tuple[str, list[tuple[str, ...]]]], at: str | None = None) -> None:
        """`sections`: (title, [(key, what, binding id)]); `at`: the section shown first (the screen's own)."""
        super().__init__()
        self.intro, self.sections, self.at = intro, sections, at

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog help"):
            with VerticalScroll(id="help-text"):
                yield Static(self.intro, markup=False)
                ids = max((len(r[2]) for _, rows in self.sections for r in rows), default=0) + 2  # one column
                for i, (title, rows) in enumerate(self.sections):
                    yield Static(title, markup=False, id=f"help-{i}", classes="help-title")
                    grid = Table.grid(padding=(0, 1), expand=True)  # a long line wraps in its column
                    grid.add_column(width=9, no_wrap=True)
                    grid.add_column(ratio=1)
                    grid.add_column(no_wrap=True, style="dim", width=ids)  # aligned across the sections
                    for key, what, ident in rows:
                        if what:  # hidden fallbacks (p when nothing runs) have nothing to say here
                            grid.add_row(Text(key), Text(what), Text(f"[{ident}]" if ident else ""))  # not markup
                    yield Static(grid)
            yield Label("escape closes; arrows scroll", classes="dim")

    def on_mount(self) -> None:
        self.query_one("#help-text").focus()
        titles = [t for t, _ in self.sections]
        if self.at in titles and titles.index(self.at):
            target = self.query_one(f"#help-{titles.index(self.at)}")
            self.call_after_refresh(lambda: self.query_one("#help-text", VerticalScroll).scroll_to_widget(
                target, top=True, animate=False))

    def action_close(self) -> None:
        self.dismiss(None)
