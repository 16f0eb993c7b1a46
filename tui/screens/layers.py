"""Layers: review the proposed plan one layer per row and override it.

Edits are arithmetic on the plan, so the new parameter count shows at once against the target; "re-evaluate"
then prunes with the best configuration under the overrides (the other layers re-share the target), measures
the objective, and records the overrides in the session (later trials respect them).
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, Static

from engine.api import check_edit, counts_of, layer_rows, overrides_to_edits, params_with
from engine.errors import AdapruneError
from tui.jobs import EngineEvent, JobDone, start_job
from tui.screens.dialogs import Ask

COLUMNS = ("layer", "heads/group", "KV", "channels", "removed", "importance", "override")
BAR = 10


class LayersScreen(Screen):
    BINDINGS = [
        Binding("k", "lock", "Lock", id="layers.lock", tooltip="keep the layer whole, or unlock it"),
        Binding("h", "heads", "Heads", id="layers.heads", tooltip="how many heads the layer keeps"),
        Binding("c", "channels", "Channels", id="layers.channels", tooltip="how many MLP channels the layer keeps"),
        Binding("r", "restore", "Restore", id="layers.restore", tooltip="drop the edits: the proposed plan"),
        Binding("v", "reevaluate", "Re-evaluate", id="layers.reevaluate", tooltip="prune with the edits, measure, save them as a plan"),
        Binding("escape", "back", "Back", id="layers.back", tooltip="back"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self.plan = None
        self.best = None
        self.edits: dict[int, tuple[int, int]] = {}
        self.busy = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", markup=False, id="summary")
        yield DataTable(id="layers", cursor_type="row", zebra_stripes=True)
        yield Static("", markup=False, id="status", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        try:
            self.plan, self.best = self.app.backend.best_plan(self.session_name)
            if self.plan is None:
                self.query_one("#summary", Static).update(
                    f"session {self.session_name} has no completed trial yet: nothing to review")
                return
            self.edits = overrides_to_edits(self.app.backend.config(self.session_name).get("overrides", {}), self.plan)
        except AdapruneError as e:
            self.query_one("#summary", Static).update(f"error: {e}")
            return
        self.render_rows()

    def render_rows(self) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for r in layer_rows(self.plan, self.edits):
            bar = "█" * round(r.importance * BAR) + "·" * (BAR - round(r.importance * BAR))
            table.add_row(str(r.index), f"{r.heads_kept}/{r.heads_per_group}", f"{r.kv_kept}/{r.kv_total}",
                          f"{r.channels_kept}/{r.channels}", f"{r.removed:,}", bar, r.override, key=str(r.index))
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        p = self.plan
        after = params_with(p, self.edits)
        target = p.params_before - p.target_removed
        status = "on target" if abs(after - target) <= 0.002 * p.params_before else (
            f"{(target - after) / p.params_before:+.2%} from the target: re-evaluate (v) rebalances the other layers")
        self.query_one("#summary", Static).update(
            f"best trial {self.best['trial']} (objective {self.best['value']:.3f}) — parameters {after:,} of "
            f"{p.params_before:,} ({1 - after / p.params_before:.2%} removed; target "
            f"{p.target_removed / p.params_before:.0%}): {status}")

    def cursor_layer(self) -> int | None:
        if self.plan is None:
            return None
        return self.query_one(DataTable).cursor_row

    def counts_for(self, i: int) -> tuple[int, int]:
        return self.edits.get(i, counts_of(self.plan)[i])

    def apply_edit(self, i: int, heads: int, channels: int) -> None:
        try:
            self.edits[i] = check_edit(self.plan, i, heads, channels)
        except AdapruneError as e:
            self.notify(str(e), severity="error", timeout=8)
            return
        self.render_rows()

    def action_lock(self) -> None:
        i = self.cursor_layer()
        if i is None:
            return
        if self.edits.get(i) == (0, 0):
            del self.edits[i]
        else:
            self.edits[i] = (0, 0)
        self.render_rows()

    def _ask(self, what: str) -> None:
        """Ask for the KEPT width (as the table shows it); the plan stores what is removed."""
        i = self.cursor_layer()
        if i is None:
            return
        s = self.plan.shapes[i]
        k, c = self.counts_for(i)
        if what == "heads" and self.plan.head_mode == "kv":
            total = s["n_kv_heads"]
            question = f"Layer {i}: KV groups to keep, 1..{total}"
        elif what == "heads":
            total = s["n_heads"] // s["n_kv_heads"]
            question = (f"Layer {i}: query heads to keep in each of its {s['n_kv_heads']} KV groups, 1..{total} "
                        f"(GQA: every group keeps at least one, and all groups keep the same number)")
        else:
            total = s["intermediate"]
            question = f"Layer {i}: MLP channels to keep, 1..{total}"
        kept = total - (k if what == "heads" else c)

        def removal(text: str) -> tuple[int, int]:
            gone = total - int(text)
            return (gone, c) if what == "heads" else (k, gone)

        def check(text: str) -> str | None:
            if not text.strip().isdigit():
                return "a whole number"
            try:
                check_edit(self.plan, i, *removal(text))
            except AdapruneError as e:
                return str(e)
            return None

        def done(text: str | None) -> None:
            if text is not None:
                self.apply_edit(i, *removal(text))

        self.app.push_screen(Ask(question, str(kept), check), done)

    def action_heads(self) -> None:
        self._ask("heads")

    def action_channels(self) -> None:
        self._ask("channels")

    def action_restore(self) -> None:
        self.edits = {}
        self.render_rows()
        self.notify("the proposed plan is back (re-evaluate to clear the session's overrides)")

    def action_reevaluate(self) -> None:
        if self.plan is None or self.busy:
            return
        self.busy = True
        edits, name = dict(self.edits), self.session_name
        self.query_one("#status", Static).update("re-evaluating: loading the model, pruning, measuring…")
        start_job(self, "reevaluate", lambda sink, control: self.app.backend.reevaluate(name, edits, sink, control))

    def on_engine_event(self, message: EngineEvent) -> None:
        text = getattr(message.event, "message", None) or getattr(message.event, "stage", "")
        if text:
            self.query_one("#status", Static).update(str(text)[:200])

    def on_job_done(self, message: JobDone) -> None:
        if message.job != "reevaluate":
            return
        self.busy = False
        if message.error:
            self.query_one("#status", Static).update(f"error: {message.error}")
            self.notify(message.error, severity="error")
            return
        r = message.result
        self.query_one("#status", Static).update(
            f"with these overrides: objective {r['value']:.3f} (best trial: {self.best['value']:.3f}), "
            f"{r['params_after']:,} parameters; saved as the session's overrides")

    def action_back(self) -> None:
        self.app.pop_screen()
