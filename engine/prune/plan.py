"""Turning a parameter target into per-layer prune decisions.

`--prune 0.20` means 20% of the model's TOTAL parameters (embeddings and head included) removed. Inside the
pruned layer range every layer loses the same number of query heads per KV group (or KV groups) and of MLP
channels, as in LLM-Pruner; the split of the budget between attention and MLP is a choice (`attn_share`):
- "auto" (the default): MLP channels only, and attention only for what the channels cannot give. On the
  embedded GQA model this beat LLM-Pruner's same-ratio split by a wide margin (bench/RESULTS.md);
- "same": LLM-Pruner's recipe, the same ratio of heads and of channels in every pruned layer;
- a number in [0, 1]: that share of the removed parameters comes from attention.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch

from engine.config import check_prune, parse_attn_share
from engine.errors import AdapruneError
from engine.model.structure import HeadMode, LayerShape
from engine.prune.importance import LayerScores


@dataclass
class LayerPlan:
    keep_heads: list[int]  # query heads kept, original numbering, ascending
    keep_kv: list[int]  # KV heads kept
    keep_channels: list[int]  # MLP channels kept

    def widths(self) -> tuple[int, int, int]:
        return len(self.keep_heads), len(self.keep_kv), len(self.keep_channels)


@dataclass
class Plan:
    head_mode: str
    layers: list[LayerPlan]
    params_before: int
    params_after: int
    target_removed: int
    recipe: dict = field(default_factory=dict)
    shapes: list[dict] = field(default_factory=list)  # the dense layers' LayerShape, for review without a model
    importance: list[float] = field(default_factory=list)  # per layer, mean channel score / the largest (0..1)
    repair: dict | None = None  # engine.prune.reconstruct.Repair: how the kept weights are repaired (None: sliced only)

    @property
    def removed(self) -> int:
        return self.params_before - self.params_after

    @property
    def uniform(self) -> bool:
        """Every layer has the same widths: a standard config can describe the model."""
        return len({lp.widths() for lp in self.layers}) == 1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        data = dict(data)
        data["layers"] = [LayerPlan(**lp) for lp in data["layers"]]
        return cls(**data)


@dataclass(frozen=True)
class Budget:
    """Per pruned layer: query heads removed from each KV group (or KV groups removed), channels removed."""

    heads: int
    channels: int
    removed: int
    attn_removed: int


def _head_cost(shape: LayerShape, k: int, head_mode: HeadMode) -> int:
    if head_mode == "kv":
        return k * shape.kv_group_params()
    return k * shape.n_kv_heads * shape.query_head_params


def _head_units(shape: LayerShape, head_mode: HeadMode) -> int:
    return shape.n_kv_heads if head_mode == "kv" else shape.heads_per_group


def solve_uniform(
    shapes: Sequence[LayerShape],
    layer_ids: Sequence[int],
    total_params: int,
    fraction: float,
    head_mode: HeadMode = "query",
    attn_share: float | str = "auto",
    round_to: int = 1,
    fixed_removed: int = 0,
) -> Budget:
    """The uniform per-layer amounts closest to removing `fraction` of `total_params`.

    `fixed_removed` parameters are taken already by layers the user set by hand (outside `layer_ids`).
    """
    check_prune(fraction)
    check_attn_share(attn_share)
    if not layer_ids:
        raise AdapruneError("the layer range is empty: choose at least one layer to prune")
    pruned = [shapes[i] for i in layer_ids]
    first = pruned[0]
    if any(s.heads_per_group != first.heads_per_group or s.n_kv_heads != first.n_kv_heads or
           s.intermediate != first.intermediate for s in pruned):
        raise AdapruneError("the layers in the range have different widths: uniform pruning needs equal layers")
    target = round(fraction * total_params)
    goal = target - fixed_removed  # what the layers in the range must give
    if goal < 0:
        raise AdapruneError(f"the per-layer overrides alone remove {fixed_removed / total_params:.1%}, more than "
                            f"the {fraction:.1%} target: lower them or raise --prune")
    units = _head_units(first, head_mode)
    chan_cost = sum(s.channel_params for s in pruned)
    # kept MLP width stays a positive multiple of round_to
    max_keep_steps = first.intermediate // round_to
    chan_options = sorted({first.intermediate - m * round_to for m in range(1, max_keep_steps + 1)} |
                          ({0} if first.intermediate % round_to == 0 else set()))
    chan_options = [c for c in chan_options if 0 <= c < first.intermediate]
    if not chan_options:
        raise AdapruneError(f"--round-to {round_to} is larger than the MLP width {first.intermediate}")

    def best_channels(rest: int) -> int:
        return min(chan_options, key=lambda c: (abs(c * chan_cost - rest), c))

    def attn(k: int) -> int:
        return sum(_head_cost(s, k, head_mode) for s in pruned)

    if attn_share == "same":  # LLM-Pruner: the same ratio of heads and of channels in every pruned layer
        rho = goal / sum(s.attn_params + s.mlp_params for s in pruned)
        k = min(units - 1, max(0, round(rho * units)))
    elif attn_share == "auto":  # the fewest heads that let the channels cover the rest
        k = next((k for k in range(units) if goal - attn(k) <= max(chan_options) * chan_cost + chan_cost * round_to / 2),
                 units - 1)
    else:
        k = min(range(units), key=lambda k: (abs(attn(k) - attn_share * goal), k))
    c = best_channels(goal - attn(k))
    removed = fixed_removed + attn(k) + c * chan_cost
    step = chan_cost * round_to
    most = fixed_removed + attn(units - 1) + max(chan_options) * chan_cost
    if target > most + step / 2:
        raise AdapruneError(
            f"cannot remove {fraction:.1%} of the parameters inside layers {layer_ids[0]}..{layer_ids[-1]}: "
            f"at most {most / total_params:.1%}; widen the layer range, lower --prune, or let attention share the cut "
            f"(--attn-share auto)"
        )
    if removed == 0 or abs(removed - target) > max(step / 2, 0.002 * total_params):
        raise AdapruneError(
            f"cannot reach {fraction:.1%} with these settings: the closest is {removed / total_params:.2%} "
            f"({removed:,} parameters); change --attn-share, --round-to or the layer range"
        )
    return Budget(heads=k, channels=c, removed=removed, attn_removed=attn(k))


def parse_overrides(overrides: Mapping[str, object], n_layers: int, shapes: Sequence[LayerShape],
                    head_mode: HeadMode) -> dict[int, tuple[int, int]]:
    """User per-layer decisions: {"7": "lock"} keeps layer 7 whole; {"7": {"heads": k, "channels": c}} removes
    k query heads per KV group (or k KV groups) and c channels there. The search and the solver respect them."""
    out = {}
    for key, value in overrides.items():
        try:
            i = int(key)
        except ValueError:
            raise AdapruneError(f"override for layer {key!r}: layers are numbered 0..{n_layers - 1}") from None
        if not 0 <= i < n_layers:
            raise AdapruneError(f"override for layer {i}: the model has layers 0..{n_layers - 1}")
        if value == "lock":
            out[i] = (0, 0)
            continue
        if not isinstance(value, Mapping) or set(value) - {"heads", "channels"}:
            raise AdapruneError(f"override for layer {i}: use \"lock\" or {{\"heads\": K, \"channels\": C}}")
        k, c = int(value.get("heads", 0)), int(value.get("channels", 0))
        s = shapes[i]
        k_max = s.n_kv_heads - 1 if head_mode == "kv" else s.heads_per_group - 1
        if not 0 <= k <= k_max:
            unit = "KV groups" if head_mode == "kv" else f"query heads per KV group (of {s.heads_per_group})"
            raise AdapruneError(f"override for layer {i}: remove 0..{k_max} {unit}, not {k}; every KV group "
                                f"must keep at least one query head")
        if not 0 <= c < s.intermediate:
            raise AdapruneError(f"override for layer {i}: remove 0..{s.intermediate - 1} channels, not {c}")
        out[i] = (k, c)
    return out


def removal_of(shapes: Sequence[LayerShape], counts: Mapping[int, tuple[int, int]], head_mode: HeadMode) -> int:
    return sum(_head_cost(shapes[i], k, head_mode) + c * shapes[i].channel_params for i, (k, c) in counts.items())


def check_attn_share(attn_share: float | str) -> None:
    if isinstance(attn_share, str) and attn_share not in ("auto", "same"):
        raise AdapruneError(f"--attn-share {attn_share!r}: give auto, same, or a number in [0, 1]")
    parse_attn_share(attn_share)


def _lowest(scores: torch.Tensor, n: int) -> set[int]:
    if n <= 0:
        return set()
    # stable order: ties broken by index so a plan is reproducible
    order = sorted(range(scores.numel()), key=lambda i: (float(scores[i]), i))
    return set(order[:n])


def select(
    shapes: Sequence[LayerShape],
    scores: Mapping[int, LayerScores],
    counts: Mapping[int, tuple[int, int]],
    head_mode: HeadMode,
) -> list[LayerPlan]:
    """Per-layer kept indices: in each layer of `counts`, drop the lowest-scoring heads and channels."""
    plans = []
    for i, s in enumerate(shapes):
        heads, kv, channels = list(range(s.n_heads)), list(range(s.n_kv_heads)), list(range(s.intermediate))
        if i in counts:
            k, c = counts[i]
            sc = scores[i]
            if head_mode == "kv":
                if not 0 <= k < s.n_kv_heads:
                    raise AdapruneError(f"layer {i}: can remove 0..{s.n_kv_heads - 1} KV groups, not {k}")
                gone = _lowest(sc.kv_groups, k)
                kv = [g for g in kv if g not in gone]
                r = s.heads_per_group
                heads = [h for h in heads if h // r in kv]
            else:
                r = s.heads_per_group
                if not 0 <= k < r:
                    raise AdapruneError(f"layer {i}: can remove 0..{r - 1} query heads per KV group, not {k}")
                gone = set()
                for g in range(s.n_kv_heads):
                    block = sc.heads[g * r : (g + 1) * r]
                    gone |= {g * r + j for j in _lowest(block, k)}
                heads = [h for h in heads if h not in gone]
            if not 0 <= c < s.intermediate:
                raise AdapruneError(f"layer {i}: can remove 0..{s.intermediate - 1} MLP channels, not {c}")
            dropped = _lowest(sc.channels, c)
            channels = [j for j in channels if j not in dropped]
        plans.append(LayerPlan(heads, kv, channels))
    return plans


def params_after(shapes: Sequence[LayerShape], layers: Sequence[LayerPlan], total_before: int) -> int:
    """Parameter count once `layers` is applied, by arithmetic on the widths."""
    after = total_before
    for s, lp in zip(shapes, layers, strict=True):
        nh, nkv, ni = lp.widths()
        after -= (s.n_heads - nh) * s.query_head_params + (s.n_kv_heads - nkv) * s.kv_head_params
        after -= (s.intermediate - ni) * s.channel_params
    return after


def _apportion(ideal: Sequence[float], total: int, cap: int) -> list[int]:
    """Integers summing to `total`, each in [0, cap], as close to `ideal` as largest remainders allow."""
    steps = [min(cap, max(0, int(x))) for x in ideal]
    order = sorted(range(len(ideal)), key=lambda j: ideal[j] - steps[j], reverse=True)
    left = total - sum(steps)
    while left > 0:
        progressed = False
        for j in order:
            if left and steps[j] < cap:
                steps[j] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise AdapruneError("the layers cannot hold this many removed channels: lower the target")
    return steps


def ramp_channels(layer_ids: Sequence[int], channels: int, intermediate: int, ramp: float,
                  round_to: int = 1) -> dict[int, int]:
    """Spread `channels` removed per layer (on average) over the range along a linear depth ramp.

    Layer weight 1 + ramp * (2 * position - 1), position 0 at the first layer of the range and 1 at the last:
    ramp > 0 prunes deeper layers more, ramp < 0 shallower ones. The total removed is unchanged, so the plan
    still lands on the same parameter count.
    """
    n = len(layer_ids)
    if not -1 < ramp < 1:
        raise AdapruneError(f"ramp {ramp} must lie in (-1, 1)")
    if n == 1 or ramp == 0:
        return {i: channels for i in layer_ids}
    steps_total = channels * n // round_to  # work in units of round_to channels
    cap = (intermediate - round_to) // round_to  # keep at least one unit in every layer
    weights = [1 + ramp * (2 * j / (n - 1) - 1) for j in range(n)]
    steps = _apportion([steps_total * w / sum(weights) for w in weights], steps_total, cap)
    return {i: s * round_to for i, s in zip(layer_ids, steps, strict=True)}


GLOBAL_MAX_SHARE = 0.9  # a global ranking may take at most this share of one layer's channels


def global_channels(scores: Mapping[int, LayerScores], layer_ids: Sequence[int], channels: int,
                    intermediate: int, round_to: int = 1) -> dict[int, int]:
    """Spread `channels` removed per layer (on average) by one ranking of every channel in the range.

    Scores are normalised per layer (divided by the layer's mean absolute score) so that layers whose
    gradients or activations run larger do not keep everything; then the lowest channels over the whole
    range go, at most GLOBAL_MAX_SHARE of any one layer. The total is that of the uniform cut, so the plan
    lands on the same parameter count.
    """
    n = len(layer_ids)
    total = channels * n
    cap = min(int(GLOBAL_MAX_SHARE * intermediate), intermediate - round_to) // round_to * round_to
    if total > cap * n:
        raise AdapruneError(f"a global ranking cannot remove {channels} channels per layer on average while "
                            f"keeping {1 - GLOBAL_MAX_SHARE:.0%} of every layer: use the uniform allocation")
    flat = []
    for i in layer_ids:
        s = scores[i].channels.double()
        s = s / (s.abs().mean() + 1e-30)
        # a layer's capped share of channels: everything past the cap ranks as essential
        order = torch.argsort(s, stable=True)
        ranked = torch.full_like(s, float("inf"))
        ranked[order[:cap]] = s[order[:cap]]
        flat.append(ranked)
    values = torch.stack(flat)  # layers x channels (the range's layers have equal widths)
    lowest = torch.argsort(values.flatten(), stable=True)[:total]
    counts = torch.bincount(lowest // intermediate, minlength=n).tolist()
    if round_to == 1:
        return dict(zip(layer_ids, counts, strict=True))
    steps_total = total // round_to
    steps = _apportion([c / round_to for c in counts], steps_total, cap // round_to)
    return {i: s * round_to for i, s in zip(layer_ids, steps, strict=True)}
