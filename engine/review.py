"""Reviewing a plan layer by layer and overriding it: what the app's Layers screen shows and edits.

Everything here is arithmetic on the plan (which records the dense layer shapes), so the parameter count of an
edited plan is known at once, without a model. `reevaluate` then prunes the dense model with the session's
best configuration under the user's overrides (the rest of the range re-shares the target), measures the
objective, and records both in the session.
"""

from __future__ import annotations

from dataclasses import dataclass

from engine.config import SearchConfig
from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Log, Sink, Stage, null_sink
from engine.model.load import load_configured
from engine.model.structure import LayerShape
from engine.prune.plan import LayerPlan, Plan, parse_overrides
from engine.prune.reconstruct import bias_layout, bias_params
from engine.prune.slicing import shared_copy
from engine.search.data import SearchData
from engine.search.objective import progressive_objective
from engine.search.params import TrialParams
from engine.search.trial import prune_trial
from engine.session.layout import OVERRIDES_PLAN, best_record, save_plan
from engine.session.store import Session


@dataclass
class LayerRow:
    index: int
    heads_per_group: int  # query heads per KV group in the dense layer
    heads_kept: int  # query heads kept per KV group (the same in every group)
    kv_total: int
    kv_kept: int
    channels: int
    channels_kept: int
    removed: int  # parameters removed from this layer
    importance: float  # 0..1, the layer's mean channel score against the largest layer's
    override: str = ""  # "lock", "K/C" (removed per group / channels), or ""
    size: int = 0  # the dense layer's attention and MLP parameters

    @property
    def kept_share(self) -> float:
        """The share of the layer's attention and MLP weights kept."""
        return 1 - self.removed / self.size if self.size else 1.0


def shapes_of(plan: Plan) -> list[LayerShape]:
    if not plan.shapes:
        raise AdapruneError("this plan was made by an older adaprune without layer shapes: re-run its search")
    return [LayerShape(**s) for s in plan.shapes]


def removal(shape: LayerShape, heads_removed: int, channels_removed: int, head_mode: str) -> int:
    """Parameters a layer loses: `heads_removed` query heads per KV group (or KV groups), channels."""
    if head_mode == "kv":
        attn = heads_removed * shape.kv_group_params()
    else:
        attn = heads_removed * shape.n_kv_heads * shape.query_head_params
    return attn + channels_removed * shape.channel_params


def counts_of(plan: Plan) -> dict[int, tuple[int, int]]:
    """Each layer's (heads removed per KV group or KV groups removed, channels removed) in the plan."""
    out = {}
    for i, (s, lp) in enumerate(zip(shapes_of(plan), plan.layers, strict=True)):
        nh, nkv, ni = lp.widths()
        k = s.n_kv_heads - nkv if plan.head_mode == "kv" else s.heads_per_group - nh // max(nkv, 1)
        out[i] = (k, s.intermediate - ni)
    return out


def layer_rows(plan: Plan, edits: dict[int, tuple[int, int]] | None = None) -> list[LayerRow]:
    """One row per layer, with `edits` ({layer: (heads, channels) removed}; (0, 0) = locked) applied."""
    edits = edits or {}
    shapes = shapes_of(plan)
    counts = {**counts_of(plan), **edits}
    rows = []
    for i, s in enumerate(shapes):
        k, c = counts[i]
        kv_kept = s.n_kv_heads - k if plan.head_mode == "kv" else s.n_kv_heads
        heads_kept = s.heads_per_group if plan.head_mode == "kv" else s.heads_per_group - k
        mark = ""
        if i in edits:
            mark = "lock" if edits[i] == (0, 0) else f"{k}/{c}"
        rows.append(LayerRow(i, s.heads_per_group, heads_kept, s.n_kv_heads, kv_kept, s.intermediate,
                             s.intermediate - c, removal(s, k, c, plan.head_mode),
                             plan.importance[i] if i < len(plan.importance) else 0.0, mark,
                             s.attn_params + s.mlp_params))
    return rows


def _span(values: list[int]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo}" if lo == hi else f"{lo}-{hi}"


def plan_summary(plan: Plan) -> str:
    """The plan in one line, in what is kept: what a user reads before exporting it."""
    rows = layer_rows(plan)
    cut = [r for r in rows if r.removed]
    head = f"{plan.removed:,} of {plan.params_before:,} parameters removed ({plan.removed / plan.params_before:.1%})"
    if not cut:
        return head
    ids = [r.index for r in cut]
    where = f"layers {ids[0]}..{ids[-1]}" if ids == list(range(ids[0], ids[-1] + 1)) else f"{len(ids)} layers"
    if plan.head_mode == "kv":
        heads = f"{_span([r.kv_kept for r in cut])}/{cut[0].kv_total} KV groups"
    else:
        heads = f"{_span([r.heads_kept for r in cut])}/{cut[0].heads_per_group} query heads per KV group"
    channels = f"{_span([r.channels_kept for r in cut])}/{cut[0].channels} MLP channels"
    return f"{head}; {where} keep {heads} and {channels}" + ("; kept weights repaired" if plan.repair else "")


def params_with(plan: Plan, edits: dict[int, tuple[int, int]]) -> int:
    """The parameter count if the edited layers had their edits and every other layer kept its plan (with the
    output biases a repaired plan adds where its layers are cut)."""
    rows = layer_rows(plan, edits)
    return plan.params_before - sum(r.removed for r in rows) + _repair_biases(plan, rows)


def _repair_biases(plan: Plan, rows: list[LayerRow]) -> int:
    if not plan.repair:
        return 0
    shapes = shapes_of(plan)
    widths = [LayerPlan(list(range(r.heads_kept * r.kv_kept)), list(range(r.kv_kept)), list(range(r.channels_kept)))
              for r in rows]
    # the plan's own count says which layout it has: biases on the cut projections, or Llama's full set
    own = plan.params_after - (plan.params_before - sum(r.removed for r in layer_rows(plan)))
    minimal = bias_params(shapes, plan.layers, bias_layout("", shapes, plan.layers))
    kind = "" if own == minimal else "llama"
    return bias_params(shapes, widths, bias_layout(kind, shapes, widths))


def check_edit(plan: Plan, layer: int, heads_removed: int, channels_removed: int) -> tuple[int, int]:
    """Refuse an edit the structure cannot take, saying why (GQA: every KV group keeps a query head)."""
    shapes = shapes_of(plan)
    parsed = parse_overrides({str(layer): {"heads": heads_removed, "channels": channels_removed}}, len(shapes),
                             shapes, plan.head_mode)
    return parsed[layer]


def edits_to_overrides(edits: dict[int, tuple[int, int]]) -> dict:
    return {str(i): "lock" if kc == (0, 0) else {"heads": kc[0], "channels": kc[1]} for i, kc in edits.items()}


def overrides_to_edits(overrides: dict, plan: Plan) -> dict[int, tuple[int, int]]:
    shapes = shapes_of(plan)
    return parse_overrides(overrides, len(shapes), shapes, plan.head_mode)


def reevaluate(session: Session, edits: dict[int, tuple[int, int]], sink: Sink = null_sink,
               control: Control | None = None, dense=None) -> dict:
    """Prune with the best trial's configuration under `edits`, measure the objective, record both.

    The overrides become the session's (later trials respect them) and the plan is saved as
    plans/overrides.json, a row of `adaprune bench`. Returns {"value", "params_after", "plan"}.
    """
    control = control or Control()
    best = best_record(session)
    if best is None:
        raise AdapruneError(f"session {session.name!r} has no completed trial to start from")
    overrides = edits_to_overrides(edits)
    cfg = SearchConfig.from_dict({**session.config(), "overrides": overrides})
    if dense is None:
        dense = load_configured(cfg, sink, frozen=True)
    data = SearchData(session, cfg, dense, sink, control)
    model = shared_copy(dense.model)
    plan, _ = prune_trial(model, data, cfg, TrialParams.from_dict(best.params), control, sink)
    with Stage(sink, "objective (overrides)"):
        value = progressive_objective(model, data.objective_sets(), control)
    save_plan(session, OVERRIDES_PLAN, plan)
    manifest_cfg = session.config()
    session.update(config={**manifest_cfg, "overrides": overrides}, overrides_value=value)
    sink(Log(f"overrides {overrides or '(none)'}: objective {value:.3f} (best trial {best.trial}: "
             f"{best.value:.3f}); later trials respect them"))
    return {"value": value, "params_after": plan["params_after"], "plan": plan}
