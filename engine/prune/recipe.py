"""One pruning recipe applied to a model: score on calibration windows, plan for the target, slice."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import Tensor, nn

from engine.config import ALLOCATIONS, REPAIR_METRICS
from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Log, Sink, Stage, null_sink
from engine.model.structure import count_params, layer_shapes
from engine.prune.importance import LayerScores, collect_stats, score_layers
from engine.prune.obs import obs_scores
from engine.prune.plan import (
    Plan,
    global_channels,
    params_after,
    ramp_channels,
    removal_of,
    select,
    solve_uniform,
)
from engine.prune.reconstruct import Repair, add_biases, bias_layout, bias_params, dense_moments
from engine.prune.slicing import apply_plan


def layer_importance(scores: dict[int, LayerScores], n_layers: int) -> list[float]:
    """A layer's mean MLP-channel score relative to the largest layer's (0 where a layer was not scored)."""
    means = [float(scores[i].channels.double().abs().mean()) if i in scores else 0.0 for i in range(n_layers)]
    top = max(means) or 1.0
    return [m / top for m in means]


@dataclass(frozen=True)
class Recipe:
    """How a model is pruned: the target, the metric and how its scores combine, how the cut is shared between
    attention and MLP and over the layers, and the repair. `notes` go into the plan's provenance as they are."""

    fraction: float  # of all parameters
    metric: str = "taylor1"
    aggregate: str = "sum"
    head_mode: str = "query"
    attn_share: float | str = "auto"
    round_to: int = 1
    seed: int = 0
    ramp: float = 0.0  # with uniform: > 0 prunes deeper layers more, at the same total
    allocation: str = "uniform"  # or global: one ranking of normalised channel scores across the range
    repair: Repair | None = None
    calib_batch: int = 4
    notes: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.allocation not in ALLOCATIONS:
            raise AdapruneError(f"allocation {self.allocation!r}: choose {' or '.join(ALLOCATIONS)}")
        if self.allocation == "global" and self.ramp:
            raise AdapruneError("a depth ramp and a global ranking both decide per-layer widths: give one of them")


def prune_with(
    model: nn.Module,
    recipe: Recipe,
    layer_ids: Sequence[int],
    windows: Tensor | None = None,
    scores: dict[int, LayerScores] | None = None,
    overrides: dict[int, tuple[int, int]] | None = None,
    control: Control | None = None,
    sink: Sink = null_sink,
) -> Plan:
    """Prune `model` in place to remove `recipe.fraction` of its parameters; returns the plan it applied.

    Group scores come from `windows` with the recipe's metric, or ready-made in `scores` (a search's cached
    statistics). `overrides` are the user's per-layer (heads, channels) removals; the range's uniform amounts
    fill the rest. The allocation spreads the MLP cut over the range: "uniform" (along a depth ramp; 0 is
    LLM-Pruner's equal cut) or "global"; both land on the same parameter count. With a repair, the output
    biases reconstruction adds are counted against the target and put in place (zero until
    `engine.prune.reconstruct` fills them).
    """
    r = recipe
    fraction, metric, aggregate, head_mode, attn_share = r.fraction, r.metric, r.aggregate, r.head_mode, r.attn_share
    round_to, seed, ramp, allocation, repair = r.round_to, r.seed, r.ramp, r.allocation, r.repair
    control = control or Control()
    shapes = layer_shapes(model)
    total = count_params(model)
    overrides = overrides or {}
    layer_ids = [i for i in layer_ids if i not in overrides]
    # an unreachable target is refused before any scoring time is spent
    solve_uniform(shapes, layer_ids, total, fraction, head_mode, attn_share, round_to,
                  removal_of(shapes, overrides, head_mode))
    scored = sorted(set(layer_ids) | {i for i, kc in overrides.items() if kc != (0, 0)})
    if scores is None and metric in REPAIR_METRICS:  # the calibration windows' input moments, then OBS
        moments = dense_moments(model, scored, windows, r.calib_batch, control, sink)
        with Stage(sink, f"obs scores of {len(scored)} layers"):
            scores = obs_scores(model, scored, moments, control)
        del moments
    elif scores is None:
        stats = collect_stats(model, windows, scored, metric, r.calib_batch, control, sink)
        scores = score_layers(model, scored, metric, aggregate, stats, seed)
        del stats
    width = shapes[layer_ids[0]].intermediate
    model_type = getattr(model.config, "adaprune_base_model_type", model.config.model_type)
    reserve, layout = 0, {}
    for _ in range(4):  # the biases a repair adds depend on the widths they are solved for: settle both
        budget = solve_uniform(shapes, layer_ids, total, fraction, head_mode, attn_share, round_to,
                               removal_of(shapes, overrides, head_mode) - reserve)
        per_layer = (global_channels(scores, layer_ids, budget.channels, width, round_to) if allocation == "global"
                     else ramp_channels(layer_ids, budget.channels, width, ramp, round_to))
        counts = {**{i: (budget.heads, per_layer[i]) for i in layer_ids}, **overrides}
        plan_layers = select(shapes, scores, {i: kc for i, kc in counts.items() if kc != (0, 0)}, head_mode)
        if repair is None:
            break
        layout = bias_layout(model_type, shapes, plan_layers)
        if bias_params(shapes, plan_layers, layout) == reserve:
            break
        reserve = bias_params(shapes, plan_layers, layout)
    unit = "KV groups" if head_mode == "kv" else "query heads per KV group"
    sink(Log(f"target {fraction:.1%} of {total:,} parameters: per layer in {layer_ids[0]}..{layer_ids[-1]} remove "
             f"{budget.heads} {unit} and {budget.channels} MLP channels -> {budget.removed:,} removed "
             f"({budget.removed / total:.2%})" + (f", {reserve:,} bias parameters added for the repair"
                                                  if reserve else "")))
    after = params_after(shapes, plan_layers, total) + bias_params(shapes, plan_layers, layout)
    full_recipe = {"metric": metric, "aggregate": aggregate, "seed": seed,
                   "layers": f"{layer_ids[0]}-{layer_ids[-1]}", "head_mode": head_mode, "attn_share": attn_share,
                   "heads_removed_per_layer": budget.heads, "channels_removed_per_layer": budget.channels,
                   "round_to": round_to, "ramp": ramp, "allocation": allocation,
                   "overrides": {str(i): list(kc) for i, kc in overrides.items()},
                   **r.notes}
    plan = Plan(head_mode, plan_layers, total, after, round(fraction * total), full_recipe,
                [s.to_dict() for s in shapes], layer_importance(scores, len(shapes)),
                repair.to_dict() if repair else None)
    control.checkpoint()
    with Stage(sink, "prune"):
        apply_plan(model, plan_layers)
        add_biases(model, layout)
    actual = count_params(model)
    if actual != after:  # the arithmetic and the tensors must agree, or every reported number is suspect
        raise AssertionError(f"pruned model has {actual:,} parameters, the plan predicted {after:,}")
    return plan
