"""Textual's toggles with a mark that says their state without colour: its radio buttons, checkboxes and
selection lists draw the same glyph on and off and tell them apart by colour alone, which a `--no-color`
terminal (or a colour-blind user) cannot see."""

from __future__ import annotations

from rich.segment import Segment
from rich.style import Style
from textual.binding import Binding
from textual.strip import Strip
from textual.widgets import Checkbox, DataTable, RadioButton, SelectionList
from textual.widgets.option_list import OptionDoesNotExist


class Radio(RadioButton):
    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802 (Textual's name)
        return "●" if self.value else " "


class Check(Checkbox):
    @property
    def BUTTON_INNER(self) -> str:  # noqa: N802
        return "X" if self.value else " "


class Checklist(SelectionList[str]):
    def on_focus(self) -> None:
        """Focused with nothing highlighted, the list shows no cursor at all (invisible in no-color)."""
        if self.highlighted is None and self.option_count:
            self.highlighted = 0

    def render_line(self, y: int) -> Strip:
        strip = super().render_line(y)
        index = self.scroll_offset[1] + y
        try:
            selection = self.get_option_at_index(index)
        except OptionDoesNotExist:
            return strip
        segments = list(strip)
        if selection.value not in self._selected and len(segments) > 1:
            segments[1] = Segment(" " * len(segments[1].text), segments[1].style)
        if self.app.no_color and self.has_focus and index == self.highlighted:
            # without colour the cursor line is told by reverse video, on the option's name
            segments[3:] = [Segment(seg.text, (seg.style or Style()) + Style(reverse=True)) for seg in segments[3:]]
        return Strip(segments, strip.cell_length)


class RowTable(DataTable):
    """A table of rows: Home and End go to the first and the last row (Textual's scroll sideways, which left
    and right already do)."""

    BINDINGS = [Binding("home", "scroll_top", "First row", show=False),
                Binding("end", "scroll_bottom", "Last row", show=False)]


INDETERMINATE_FPS = 15  # Textual's Bar animates a bar without a total at this rate


def hold_eta(screen, control) -> None:
    """Hide every progress bar's ETA while the work the screen follows is paused (it would count the pause) or
    when nothing runs (it would count down to nothing); while paused, a bar without a total stops pulsing too
    (its animation would say that work goes on)."""
    try:
        paused = control is not None and control.paused
    except Exception:  # an unreadable requests file asks nothing
        paused = False
    for eta in screen.query("ETAStatus"):
        eta.display = not (paused or control is None)
    for bar in screen.query("Bar"):
        if bar.percentage is None:
            bar.auto_refresh = None if paused else 1 / INDETERMINATE_FPS
