"""Importance of prunable groups: the LLM-Pruner family of Taylor metrics and common baselines.

For a weight w with gradient g of the calibration loss (fp32, averaged over samples) and the Fisher diagonal
H_ii ~ (1/N) sum_s g_{s,i}^2 of per-sample gradients, the element-wise importance is
  taylor1: |w g|      taylor2: 1/2 w^2 H      taylor-mix: |w g - 1/2 w^2 H|
  l1: |w|             l2: w^2 (sqrt of the group sum)       wanda: |w| * ||x|| (input feature norm)
and `obs` (engine.prune.obs) the output error a group's removal leaves once the kept weights are repaired.
and `vector` is |sum_i w_i g_i| over the group's slice of a matrix. A group's score in each of its matrices is
the sum over its slice; matrices are combined by the aggregation (sum, mean, max, prod or last).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from engine.config import (  # the rules live in config (torch-free): checked before anything loads
    ACT_METRICS,
    AGGREGATES,
    FISHER_METRICS,
    GRAD_METRICS,
    METRICS,
    PROJ,
    SAMPLE_METRICS,
)
from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Sink, Stage, null_sink
from engine.measure.nll import next_token_nll
from engine.model.structure import ATTN, decoder_layers, layer_shape


@dataclass
class CalibStats:
    """Per-weight statistics of the calibration data, keyed 'LAYER.PROJ' (e.g. '5.q_proj')."""

    grad: dict[str, Tensor] = field(default_factory=dict)  # mean gradient
    fisher: dict[str, Tensor] = field(default_factory=dict)  # mean squared per-sample gradient
    act: dict[str, Tensor] = field(default_factory=dict)  # mean squared input activation per input feature
    n_samples: int = 0
    n_tokens: int = 0


@dataclass
class LayerScores:
    heads: Tensor  # one score per query head
    kv_groups: Tensor  # one score per KV group (its KV head with all its query heads)
    channels: Tensor  # one score per MLP channel


def check_metric(metric: str, aggregate: str) -> None:
    if metric not in METRICS:
        raise AdapruneError(f"unknown metric {metric!r}: choose one of {', '.join(METRICS)}")
    if aggregate not in AGGREGATES:
        raise AdapruneError(f"unknown aggregation {aggregate!r}: choose one of {', '.join(AGGREGATES)}")


def _proj(layer: nn.Module, name: str) -> nn.Linear:
    return getattr(layer.self_attn if name in ATTN else layer.mlp, name)


def _parse_key(key: str) -> tuple[int, str]:
    """'LAYER.PROJ' -> (layer, projection name)."""
    i, p = key.split(".")
    return int(i), p


@contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout: importance of the model as it will be used) and no parameter asking for a
    gradient (passes that need gradients take them from the activations); everything restored afterwards, no
    gradient left behind."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved[name])
            p.grad = None
        model.train(was_training)


@contextmanager
def _removed_after(hooks: list) -> Iterator[None]:
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


class GradientTotals:
    """fp32 sums per weight key ('LAYER.PROJ') of gradients and, for each window's own gradient, of its square
    (the Fisher diagonal), kept on `to` (None: where each gradient is)."""

    def __init__(self, to: str | torch.device | None = None) -> None:
        self.to = to
        self.grad: dict[str, Tensor] = {}
        self.sq: dict[str, Tensor] = {}

    def add(self, key: str, g: Tensor, squares: bool = True) -> None:
        g = g.detach().float()
        g = g if self.to is None else g.to(self.to)
        if key in self.grad:
            self.grad[key].add_(g)
        else:
            self.grad[key] = g.clone()
        if squares:
            if key in self.sq:
                self.sq[key].addcmul_(g, g)
            else:
                self.sq[key] = g * g


def gradient_sums(
    model: nn.Module,
    windows: Tensor,
    keys: Sequence[str],
    squares: bool = False,
    batch_size: int = 4,
    control: Control | None = None,
    on_batch=None,
    to: str | torch.device | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Sums over `windows` of every window's loss gradient for the weights `keys` ('LAYER.PROJ'), in fp32,
    and with `squares` the sums of the squared per-window gradients (the Fisher diagonal). A weight's gradient
    is formed from its inputs and output gradients in the hook of a backward through the activations, one
    weight at a time: no weight gradient of the whole model is ever held. The sums are kept on `to` (None: each
    weight's device; "cpu" keeps an accelerator free of them) and do not depend on the batch size.
    """
    totals = GradientTotals(to)

    def each(key: str, x: Tensor, dy: Tensor) -> None:
        if not squares:  # the batch's gradient at once: the sum of its windows'
            totals.add(key, _window_grad(x.flatten(0, 1), dy.flatten(0, 1)), squares=False)
            return
        for s in range(x.shape[0]):  # the squares need each window's own gradient
            totals.add(key, _window_grad(x[s], dy[s]))

    _window_backward(model, windows, keys, each, batch_size, control, on_batch)
    return totals.grad, totals.sq


def collect_stats(
    model: nn.Module,
    windows: Tensor,
    layer_ids: Sequence[int],
    metric: str,
    batch_size: int = 1,
    control: Control | None = None,
    sink: Sink = null_sink,
) -> CalibStats:
    """One pass over the calibration windows gathering what `metric` needs (nothing for l1/l2/random)."""
    need_grad, need_fisher, need_act = metric in GRAD_METRICS, metric in FISHER_METRICS, metric in ACT_METRICS
    if not (need_grad or need_act):
        return CalibStats()  # l1, l2 and random read no data
    n = windows.shape[0]
    stats = CalibStats(n_samples=n, n_tokens=windows.numel())
    control = control or Control()
    if need_grad:
        keys = [f"{i}.{p}" for i in layer_ids for p in PROJ]
        with Stage(sink, "calibration statistics", n, "windows") as stage:
            grad, sq = gradient_sums(model, windows, keys, need_fisher, batch_size, control, stage.advance, "cpu")
        stats.grad = {k: v / n for k, v in grad.items()}
        stats.fisher = {k: v / n for k, v in sq.items()}
        return stats
    device = next(model.parameters()).device
    bs = max(1, batch_size)
    with (_frozen_eval(model), hooked_norms(model, [windows.shape[1]], layer_ids) as norms,
          torch.no_grad(), Stage(sink, "calibration statistics", n, "windows") as stage):
        for b in range(0, n, bs):
            control.checkpoint()
            model(input_ids=windows[b : b + bs].to(device))
            stage.advance(min(b + bs, n))
    stats.act = {k.removesuffix(".act"): v.sum(0) / stats.n_tokens for k, v in norms.tensors(windows.shape[1]).items()}
    return stats


def _elementwise(metric: str, w: Tensor, key: str, stats: CalibStats) -> Tensor:
    w = w.detach().float()
    if metric == "l1":
        return w.abs()
    if metric == "l2":
        return w.pow(2)
    if metric == "wanda":
        act_key = key.replace("k_proj", "q_proj").replace("v_proj", "q_proj").replace("up_proj", "gate_proj")
        return w.abs() * stats.act[act_key].to(w.device).sqrt()[None, :]
    g = stats.grad[key].to(w.device)
    if metric == "taylor1":
        return (w * g).abs()
    if metric == "vector":
        return w * g
    h = stats.fisher[key].to(w.device)
    if metric == "taylor2":
        return 0.5 * w.pow(2) * h
    return (w * g - 0.5 * w.pow(2) * h).abs()  # taylor-mix


def _blocks(e: Tensor, dim: int, block: int) -> Tensor:
    """Sum element scores over the other axis, then over contiguous blocks of `block` rows/columns."""
    return e.sum(dim=1 - dim).view(-1, block).sum(dim=1)


def _finish(metric: str, v: Tensor) -> Tensor:
    if metric == "vector":
        return v.abs()
    if metric == "l2":
        return v.sqrt()
    return v


def _aggregate(parts: list[Tensor], aggregate: str) -> Tensor:
    stacked = torch.stack(parts)
    if aggregate == "sum":
        return stacked.sum(0)
    if aggregate == "mean":
        return stacked.mean(0)
    if aggregate == "max":
        return stacked.max(0).values
    if aggregate == "prod":
        return stacked.prod(0)
    return stacked[-1]  # last: the group's output matrix (o_proj / down_proj), as LLM-Pruner defines it


def layer_scores(
    model: nn.Module, layer_id: int, metric: str, aggregate: str, stats: CalibStats, seed: int = 0
) -> LayerScores:
    layer = decoder_layers(model)[layer_id]
    shape = layer_shape(layer)
    hd, r = shape.head_dim, shape.heads_per_group
    if metric == "random":
        g = torch.Generator().manual_seed(seed * 100_003 + layer_id)
        return LayerScores(
            torch.rand(shape.n_heads, generator=g),
            torch.rand(shape.n_kv_heads, generator=g),
            torch.rand(shape.intermediate, generator=g),
        )
    e = {p: _elementwise(metric, _proj(layer, p).weight, f"{layer_id}.{p}", stats) for p in PROJ}
    with torch.no_grad():
        parts = _parts(layer, e, hd, r)
        heads, kv, channels = (_aggregate([_finish(metric, v) for v in parts[kind]], aggregate)
                               for kind in ("heads", "kv", "channels"))
    return LayerScores(heads.cpu(), kv.cpu(), channels.cpu())


def score_layers(
    model: nn.Module, layer_ids: Sequence[int], metric: str, aggregate: str, stats: CalibStats, seed: int = 0
) -> dict[int, LayerScores]:
    check_metric(metric, aggregate)
    return {i: layer_scores(model, i, metric, aggregate, stats, seed) for i in layer_ids}


# --- input norms per window (wanda): a forward pass, no backward ------------------------------------------

NORM_PROJ = ("q_proj", "o_proj", "gate_proj", "down_proj")  # wanda's inputs (q/k/v share one, gate/up too)


class WindowNorms:
    """Per window, each projection input's squares summed over the window's first L tokens, for every L in
    `lengths`: a causal model reads a window's first L tokens the same in a longer window, so one pass over
    the longest windows serves every length. Keys 'LAYER.PROJ.act' -> [windows, in_features]."""

    def __init__(self, lengths: Sequence[int]) -> None:
        self.lengths = sorted(set(lengths))
        self._rows: dict[tuple[int, str], list[Tensor]] = {}

    def add(self, key: str, x: Tensor) -> None:
        """A batch's inputs `x` [windows, tokens, in_features] of projection `key` ('LAYER.PROJ')."""
        sq = x.detach()[:, : self.lengths[-1]].float().pow(2)
        for n in self.lengths:
            self._rows.setdefault((n, key), []).append(sq[:, :n].sum(1).cpu())

    def tensors(self, length: int) -> dict[str, Tensor]:
        return {f"{k}.act": torch.cat(v) for (n, k), v in self._rows.items() if n == length}


@contextmanager
def hooked_norms(model: nn.Module, lengths: Sequence[int],
                 layer_ids: Sequence[int] | None = None) -> Iterator[WindowNorms]:
    """WindowNorms of whatever passes through `model` (every layer, or `layer_ids`) while the block runs."""
    layers = decoder_layers(model)
    norms = WindowNorms(lengths)

    def hook(key: str):
        return lambda _mod, args: norms.add(key, args[0])

    hooks = [_proj(layers[i], p).register_forward_pre_hook(hook(f"{i}.{p}"))
             for i in (range(len(layers)) if layer_ids is None else layer_ids) for p in NORM_PROJ]
    with _removed_after(hooks):
        yield norms


# --- per-sample statistics: computed once for a pool, reused by every subset a search trial picks ----------


def _parts(layer: nn.Module, e: dict[str, Tensor], hd: int, r: int) -> dict[str, list[Tensor]]:
    """Each group kind's per-matrix group sums of an element-wise quantity (before _finish)."""
    return {
        "heads": [_blocks(e["q_proj"], 0, hd), _blocks(e["o_proj"], 1, hd)],
        "kv": [_blocks(e["q_proj"], 0, hd * r), _blocks(e["k_proj"], 0, hd), _blocks(e["v_proj"], 0, hd),
               _blocks(e["o_proj"], 1, hd * r)],
        "channels": [_blocks(e["gate_proj"], 0, 1), _blocks(e["up_proj"], 0, 1), _blocks(e["down_proj"], 1, 1)],
    }


def _window_grad(x: Tensor, dy: Tensor) -> Tensor:
    """One window's fp32 weight gradient of a linear layer: its output gradients [tokens, out] times its inputs."""
    return dy.float().T @ x.float()


def _window_backward(model: nn.Module, windows: Tensor, keys: Sequence[str],
                     each: Callable[[str, Tensor, Tensor], None], batch_size: int, control: Control | None,
                     on_batch: Callable[[int], None] | None = None) -> None:
    """A forward and backward per batch of windows, through the activations only (no weight gradient is formed):
    `each(key, x, dy)` gets the inputs [windows, tokens, in] and output gradients [windows, tokens, out] of
    every weight `key` ('LAYER.PROJ'), so that window s's gradient is dy[s]^T x[s]. Each window's loss is its own
    mean next-token loss: the batch's loss is their sum."""
    control = control or Control()
    layers = decoder_layers(model)
    device = next(model.parameters()).device
    calls: dict[str, int] = {}

    def hook(key: str):
        def fn(_mod: nn.Module, args: tuple, out: Tensor) -> None:
            calls[key] = calls.get(key, 0) + 1
            if calls[key] > 1:  # a second call's gradient would be summed with the first's before squaring
                raise AdapruneError(f"the model calls {key} more than once in a forward pass: per-window "
                                    f"gradients are not supported for it")
            held = [args[0].detach()]  # freed once its gradient is formed, not kept by the graph until the next batch
            out.register_hook(lambda dy: each(key, held.pop(), dy))
        return fn

    def start(_mod: nn.Module, args: tuple, kwargs: dict):
        """The graph starts at the first keyed layer's input: layers below it need no backward."""
        if args:
            return (args[0].detach().requires_grad_(), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": kwargs["hidden_states"].detach().requires_grad_()}

    where = {k: _parse_key(k) for k in keys}
    first = min(i for i, _ in where.values())
    hooks = [_proj(layers[i], p).register_forward_hook(hook(k)) for k, (i, p) in where.items()]
    hooks.append(layers[first].register_forward_pre_hook(start, with_kwargs=True))
    n, bs = windows.shape[0], max(1, batch_size)
    with _frozen_eval(model), _removed_after(hooks), torch.enable_grad():
        for b in range(0, n, bs):
            control.checkpoint()
            calls.clear()
            x = windows[b : b + bs].to(device)
            loss = next_token_nll(model(input_ids=x).logits, x, differentiable=True).mean(1).sum()
            if not torch.isfinite(loss):
                raise AdapruneError("the calibration loss is not finite: the model or data is broken")
            loss.backward()
            del loss  # the graph goes now, not after the next batch's forward
            if on_batch is not None:
                on_batch(min(b + bs, n))


def collect_sample_stats(
    model: nn.Module, windows: Tensor, control: Control | None = None, sink: Sink = null_sink,
    on_grad: Callable[[str, Tensor], None] | None = None, batch_size: int = 4,
) -> dict[str, Tensor]:
    """Per calibration window, every layer's per-group sums of w*g and 1/2 w^2 g^2, and input sq-norms.

    Keys: 'L.KIND.vector' and 'L.KIND.taylor2' -> [samples, matrices, groups] (KIND: heads, kv, channels);
    'L.PROJ.act' -> [samples, in_features] (sum over the window's tokens of x^2).
    One forward and backward per batch of windows, through the activations only: each window's weight
    gradient g = dy^T x is formed from its own inputs x and output gradients dy, one window and one weight at a
    time. `on_grad(key, g)` sees each window's fp32 gradient of weight 'L.PROJ' (e.g. to sum them at no extra
    pass), the windows of a weight in order.
    """
    layers = decoder_layers(model)
    n, length = windows.shape
    # per (layer, projection, metric): each batch's [windows, rows or columns] sums of the element scores
    sums: dict[tuple[int, str, str], list[Tensor]] = {}

    def each(key: str, x: Tensor, dy: Tensor) -> None:
        i, p = _parse_key(key)
        w = _proj(layers[i], p).weight.detach().float()
        axis = 0 if p in ("o_proj", "down_proj") else 1  # their groups are input columns; the others' rows
        vec, sq = [], []
        for s in range(x.shape[0]):
            g = _window_grad(x[s], dy[s])
            if on_grad is not None:
                on_grad(key, g)
            e = w * g
            vec.append(e.sum(axis))
            sq.append(0.5 * e.pow_(2).sum(axis))
        sums.setdefault((i, p, "vector"), []).append(torch.stack(vec).cpu())
        sums.setdefault((i, p, "taylor2"), []).append(torch.stack(sq).cpu())

    keys = [f"{i}.{p}" for i in range(len(layers)) for p in PROJ]
    with hooked_norms(model, [length]) as norms, Stage(sink, "per-sample statistics", n, "samples") as stage:
        _window_backward(model, windows, keys, each, batch_size, control, stage.advance)
    out = norms.tensors(length)
    for i, layer in enumerate(layers):
        shape = layer_shape(layer)
        e = {p: torch.cat(sums[(i, p, "vector")]) for p in PROJ}
        f = {p: torch.cat(sums[(i, p, "taylor2")]) for p in PROJ}
        for name, parts in (("vector", _row_parts(e, shape.head_dim, shape.heads_per_group)),
                            ("taylor2", _row_parts(f, shape.head_dim, shape.heads_per_group))):
            for kind, per_matrix in parts.items():
                out[f"{i}.{kind}.{name}"] = torch.stack(per_matrix, dim=1)  # [samples, matrices, groups]
    return out


def _row_parts(v: dict[str, Tensor], hd: int, r: int) -> dict[str, list[Tensor]]:
    """`_parts` from each window's sums over a matrix's other axis ([windows, rows or columns] per projection)."""
    def blocks(t: Tensor, block: int) -> Tensor:
        return t.view(t.shape[0], -1, block).sum(-1)

    return {
        "heads": [blocks(v["q_proj"], hd), blocks(v["o_proj"], hd)],
        "kv": [blocks(v["q_proj"], hd * r), blocks(v["k_proj"], hd), blocks(v["v_proj"], hd),
               blocks(v["o_proj"], hd * r)],
        "channels": [blocks(v["gate_proj"], 1), blocks(v["up_proj"], 1), blocks(v["down_proj"], 1)],
    }


def scores_from_samples(
    model: nn.Module, cache: dict[str, Tensor], subset: Tensor, layer_ids: Sequence[int], metric: str,
    aggregate: str, seq_len: int, seed: int = 0,
) -> dict[int, LayerScores]:
    """Group scores for the windows `subset` of a pool, from its per-sample statistics alone.

    Equal to collect_stats (batch size 1) + score_layers on those windows, without a backward pass.
    """
    check_metric(metric, aggregate)
    if metric not in SAMPLE_METRICS:
        raise ValueError(f"{metric} does not decompose over samples")
    if metric in ("l1", "l2", "random"):
        return score_layers(model, layer_ids, metric, aggregate, CalibStats(), seed)
    if metric == "wanda":
        n_tokens = subset.numel() * seq_len
        stats = CalibStats(act={k.removesuffix(".act"): cache[k][subset].sum(0) / n_tokens
                                for k in cache if k.endswith(".act")})
        return score_layers(model, layer_ids, metric, aggregate, stats, seed)
    out = {}
    for i in layer_ids:
        kinds = {}
        for kind in ("heads", "kv", "channels"):
            per_matrix = cache[f"{i}.{kind}.{metric}"][subset].mean(0)  # [matrices, groups]
            per_matrix = per_matrix.abs() if metric == "vector" else per_matrix
            kinds[kind] = _aggregate(list(per_matrix), aggregate)
        out[i] = LayerScores(kinds["heads"], kinds["kv"], kinds["channels"])
    return out


def _normalised(v: Tensor) -> Tensor:
    """Scale a layer's scores to mean 1, so metrics of different magnitudes can be mixed."""
    m = v.abs().mean()
    return v / m if m > 0 else v


def mix_scores(a: dict[int, LayerScores], b: dict[int, LayerScores], weight: float) -> dict[int, LayerScores]:
    """(1 - weight) * a + weight * b, each normalised per layer and group kind."""
    out = {}
    for i in a:
        parts = [(1 - weight) * _normalised(x) + weight * _normalised(y)
                 for x, y in ((a[i].heads, b[i].heads), (a[i].kv_groups, b[i].kv_groups),
                              (a[i].channels, b[i].channels))]
        out[i] = LayerScores(*parts)
    return out
