"""Layers: review the proposed plan one layer per row and override it, in one vocabulary: what each layer keeps.

Each row is a picture of the layer: a bar of the share of its prunable weights kept (the depth profile shows
at a glance) and the importance score that decided it. Edits are arithmetic on the plan, so the parameter
count shows at once against the target; re-evaluate (after a confirmation that says what it records) prunes
with the best configuration under the edits (the other layers re-share the target), measures the objective,
and saves the edits as the session's overrides and as plan:overrides, which Export offers first.
"""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import Screen
from textual.widgets import DataTable, Footer, Header, ProgressBar, Static

from engine.api import OVERRIDES_PLAN, check_edit, counts_of, layer_rows, overrides_to_edits, params_with
from engine.errors import AdapruneError
from engine.events import Log, StageProgress, StageStarted
from tui.jobs import EngineEvent, JobDone, start_job
from tui.screens.dialogs import Ask, Confirm
from tui.widgets import RowTable

COLUMNS = ("layer", "heads/group", "KV", "channels", "weights kept", "importance", "edit")
BAR = 10
EIGHTHS = " ▏▎▍▌▋▊▉█"


def bar(share: float, width: int = BAR) -> str:
    """A share in [0, 1] as a bar in eighths of a cell, then the percentage."""
    cells = max(0.0, min(1.0, share)) * width
    full, part = int(cells), int((cells - int(cells)) * 8)
    text = "█" * full + (EIGHTHS[part] if full < width and part else "")
    return f"{text:·<{width}} {share:4.0%}"


class LayersScreen(Screen):
    BINDINGS = [
        Binding("k", "lock", "Lock", id="layers.lock", tooltip="keep the layer whole, or unlock it"),
        Binding("h", "heads", "Heads", id="layers.heads", tooltip="how many heads the layer keeps"),
        Binding("m", "channels", "MLP", id="layers.channels", tooltip="how many MLP channels the layer keeps"),
        Binding("r", "restore", "Restore", id="layers.restore", tooltip="drop the edits: the proposed plan"),
        Binding("v", "reevaluate", "Evaluate", id="layers.reevaluate", tooltip="prune with the edits, measure, save them as a plan"),
        Binding("c", "cancel", "Cancel", id="layers.cancel", tooltip="stop a re-evaluation (nothing is saved)"),
        Binding("c", "idle", show=False, id="layers.idle-cancel"),
        Binding("k,h,m,r,v", "busy", show=False, id="layers.busy"),
        Binding("x", "export", "Export", show=False, id="layers.export", tooltip="export a plan (the re-evaluated edits first)"),
        Binding("escape", "back", "Back", id="layers.back", tooltip="back (asks when edits are not re-evaluated)"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self.plan = None
        self.best = None
        self.edits: dict[int, tuple[int, int]] = {}
        self.busy = False
        self.control = None  # the running re-evaluation's
        self.saved: dict[int, tuple[int, int]] = {}  # the edits the session holds (re-evaluated)
        self.pending: dict[int, tuple[int, int]] = {}  # the edits being re-evaluated
        self.showing = ""  # what the rows show, when not the best plan (the re-evaluated edits)

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static("", markup=False, id="summary")
        yield RowTable(id="layers", cursor_type="row", zebra_stripes=True)
        with Horizontal(classes="bars", id="stage-row"):
            yield Static("", markup=False, id="stage", classes="barlabel")
            yield ProgressBar(id="stage-bar", show_eta=True)
        yield Static("", markup=False, id="status", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        table = self.query_one(DataTable)
        for col in COLUMNS:
            table.add_column(col, key=col)
        self.query_one("#stage-row").display = False  # shown while a re-evaluation runs
        try:
            self.plan, self.best = self.app.backend.best_plan(self.session_name)
            if self.plan is None:
                self.query_one("#summary", Static).update(
                    f"session {self.session_name} has no completed trial yet: nothing to review")
                return
            self.edits = overrides_to_edits(self.app.backend.config(self.session_name).get("overrides", {}), self.plan)
            self.saved = dict(self.edits)
        except AdapruneError as e:
            self.query_one("#summary", Static).update(f"error: {e}")
            return
        self.render_rows()

    def render_rows(self) -> None:
        table = self.query_one(DataTable)
        cursor = table.cursor_row
        table.clear()
        for r in layer_rows(self.plan, self.edits):
            edit = ""
            if r.index in self.edits:
                # what the layer keeps, each count named (a bare "1/48" read as "1 of 48")
                edit = "lock" if self.edits[r.index] == (0, 0) else f"keep {r.heads_kept} h, {r.channels_kept} ch"
                if self.plan.head_mode == "kv" and edit != "lock":
                    edit = f"keep {r.kv_kept} kv, {r.channels_kept} ch"
            importance = f"{r.importance:.2f}" if r.importance else "-"  # layers outside the range are not scored
            table.add_row(str(r.index), f"{r.heads_kept}/{r.heads_per_group}", f"{r.kv_kept}/{r.kv_total}",
                          f"{r.channels_kept}/{r.channels}", bar(r.kept_share), importance, edit,
                          key=str(r.index))
        if table.row_count:
            table.move_cursor(row=min(cursor, table.row_count - 1))
        p = self.plan
        after = params_with(p, self.edits)
        target = p.params_before - p.target_removed
        status = "on target" if abs(after - target) <= 0.002 * p.params_before else (
            f"{(target - after) / p.params_before:+.2%} from the target: re-evaluate (v) rebalances the other layers")
        shown = self.showing or f"best trial {self.best.trial} (objective {self.best.value:.3f})"
        if self.showing and self.edits != self.saved:
            shown += ", edited since (v measures the edits)"  # its objective is not of the rows shown now
        self.query_one("#summary", Static).update(
            f"{shown} — parameters {after:,} of "
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
            total, unit = s["n_kv_heads"], "KV groups"
            question = f"Layer {i}: KV groups to keep, 1..{total}"
        elif what == "heads":
            total, unit = s["n_heads"] // s["n_kv_heads"], "query heads per KV group (GQA: every group keeps one)"
            question = (f"Layer {i}: query heads to keep in each of its {s['n_kv_heads']} KV groups, 1..{total} "
                        f"(GQA: every group keeps at least one, and all groups keep the same number)")
        else:
            total, unit = s["intermediate"], "MLP channels"
            question = f"Layer {i}: MLP channels to keep, 1..{total}"
        kept = total - (k if what == "heads" else c)

        def removal(text: str) -> tuple[int, int]:
            gone = total - int(text)
            return (gone, c) if what == "heads" else (k, gone)

        def check(text: str) -> str | None:
            if not text.strip().isdigit():
                return f"a whole number: keep 1..{total} {unit}"
            if not 1 <= int(text) <= total:
                return f"keep 1..{total} {unit}, not {int(text)}"  # said as the question asks it: what is kept
            try:
                check_edit(self.plan, i, *removal(text))
            except AdapruneError as e:
                return str(e)
            return None

        def done(text: str | None) -> None:
            if text is not None:
                self.apply_edit(i, *removal(text))

        self.app.push_screen(Ask(question, str(kept), check, live=check), done)

    def action_heads(self) -> None:
        self._ask("heads")

    def action_channels(self) -> None:
        self._ask("channels")

    def action_restore(self) -> None:
        if self.plan is None:  # no plan could be read: the error is on screen already
            return
        self.edits = {}
        self.render_rows()
        self.notify("the proposed plan is back (re-evaluate to clear the session's overrides)")

    def action_reevaluate(self) -> None:
        if self.plan is None or self.busy:
            return
        edits, name = dict(self.edits), self.session_name
        what = f"your {len(edits)} edited layer(s)" if edits else "no edits (this clears the session's overrides)"
        if edits and edits == self.saved:
            what += ", unchanged since they were last re-evaluated (this measures them again)"

        def go(yes: bool | None) -> None:
            if not yes:
                return
            self.busy, self.pending = True, edits
            self.query_one("#status", Static).update("re-evaluating: loading the model, pruning, measuring… "
                                                     "(c cancels; nothing is saved until it finishes)")
            self.control = start_job(self, "reevaluate",
                                     lambda sink, control: self.app.backend.reevaluate(name, edits, sink, control))
            self.refresh_bindings()

        self.app.push_screen(Confirm(
            f"Re-evaluate with {what}: prune with the best trial's configuration (the other layers re-share the "
            f"target), measure the objective (minutes on a CPU), then save the edits as the session's overrides "
            f"(later trials respect them) and as plan:overrides, which Export offers first. Go on?"), go)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        if action == "cancel":
            return self.busy
        if action == "idle":
            return not self.busy
        if action == "busy":
            return self.busy
        if action in ("lock", "heads", "channels", "restore", "reevaluate"):
            return not self.busy  # the edits being measured stay the edits shown (and the footer fits 80)
        return True

    def action_idle(self) -> None:
        self.notify("nothing is being re-evaluated: v re-evaluates your edits", severity="warning")

    def action_busy(self) -> None:
        self.notify("re-evaluating your edits: c cancels it; edit again when it ends", severity="warning")

    def action_cancel(self) -> None:
        if self.busy and self.control is not None:
            self.control.cancel()
            self.query_one("#status", Static).update("cancelling at the next safe point…")

    def on_engine_event(self, message: EngineEvent) -> None:
        e = message.event
        if isinstance(e, StageStarted):
            self.query_one("#stage-row").display = True
            self.query_one("#stage", Static).update(e.stage)
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=0)
        elif isinstance(e, StageProgress):
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=e.done)
        elif isinstance(e, Log):
            self.query_one("#status", Static).update(e.message[:200])

    def on_job_done(self, message: JobDone) -> None:
        if message.job != "reevaluate":
            return
        self.busy, self.control = False, None
        self.refresh_bindings()
        self.query_one("#stage-row").display = False
        if message.cancelled:
            self.query_one("#status", Static).update("re-evaluation cancelled: nothing was saved")
            return
        if message.error:
            self.query_one("#status", Static).update(f"error: {message.error}")
            self.notify(message.error, severity="error")
            return
        r = message.result
        self.saved = self.pending
        try:  # the rows show the plan just measured: the other layers as the re-evaluation rebalanced them
            fresh = next((c.plan for c in self.app.backend.plans(self.session_name)
                          if c.name == f"plan:{OVERRIDES_PLAN}"), None)
        except AdapruneError:
            fresh = None
        if fresh is not None:
            self.plan, self.showing = fresh, f"your re-evaluated edits (objective {r['value']:.3f})"
            self.render_rows()
        self.query_one("#status", Static).update(
            f"with these overrides: objective {r['value']:.3f} (best trial: {self.best.value:.3f}), "
            f"{r['params_after']:,} parameters; saved as the session's overrides and as plan:overrides (x exports it)")

    def action_export(self) -> None:
        self.app.open_export(self.session_name)

    def action_back(self) -> None:
        if self.busy or self.edits == self.saved:
            self.app.pop_screen()
            return

        def done(yes: bool | None) -> None:
            if yes:
                self.app.pop_screen()

        self.app.push_screen(Confirm("Your edits are not re-evaluated (v), so they are not saved: leave and lose "
                                     "them?"), done)
