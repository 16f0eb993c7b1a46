"""Gradient sums over subsets of a calibration pool, shared between a search's trials.

First-order Taylor importance |w * mean gradient| does not split over windows once the absolute value is
taken, so it cannot come from per-window group statistics the way the decomposable metrics do. The gradient
itself does split: its sum over a subset of windows is a cached sum over another subset, plus the windows
that one lacks, minus the windows it has in excess. A search's trials draw their windows from one pool per
source, so much of a new subset's gradient is usually summed already: an earlier trial's, or that of the
windows a per-sample statistics pass computed (gathered for free during it). A sum is the size of the model's weights in
fp32, so sums stay in memory under a byte budget instead of going into the session folder.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from engine.config import PROJ
from engine.control import Control
from engine.events import Sink, Stage, null_sink
from engine.model.structure import ATTN, decoder_layers
from engine.prune.importance import CalibStats, GradientTotals, gradient_sums


@dataclass
class GradSum:
    pool: Hashable  # which pool (e.g. source and window length) the window indices refer to
    windows: frozenset[int]
    grad: dict[str, Tensor]  # 'LAYER.PROJ' -> sum over the windows of each window's gradient (fp32, CPU)
    sq: dict[str, Tensor] | None  # sums of squared per-window gradients; None where batches were summed
    whole: bool = False  # the sum over the whole pool

    @property
    def nbytes(self) -> int:
        parts = [self.grad, *([self.sq] if self.sq is not None else [])]
        return sum(t.numel() * t.element_size() for d in parts for t in d.values())


def weight_keys(model: nn.Module) -> list[str]:
    """Every decoder layer's projection weights: sums over all layers serve any layer range a trial picks."""
    return [f"{i}.{p}" for i in range(len(decoder_layers(model))) for p in PROJ]


def sum_bytes(model: nn.Module, squares: bool) -> int:
    layers = decoder_layers(model)
    n = sum(getattr(layer.self_attn if p in ATTN else layer.mlp, p).weight.numel() for layer in layers for p in PROJ)
    return n * 4 * (2 if squares else 1)


class SumBuilder(GradientTotals):
    """Sums each window's gradient (and its square) per weight in host memory as a pass hands them over, one
    weight at a time; `close` puts the entry in its cache. A pass stopped midway never closes it: nothing
    partial is kept."""

    def __init__(self, cache: GradientCache, pool: Hashable, windows: frozenset[int], whole: bool) -> None:
        super().__init__("cpu")
        self.cache, self.pool, self.windows, self.whole = cache, pool, windows, whole

    def close(self) -> None:
        self.cache.put(GradSum(self.pool, self.windows, self.grad, self.sq, whole=self.whole))


class GradientCache:
    """Gradient sums under a byte budget, least recently used out first but whole pools last (0: keep none,
    every subset is summed afresh)."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget = budget_bytes
        self.entries: list[GradSum] = []  # oldest use first

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.budget

    def put(self, entry: GradSum) -> None:
        if not self.fits(entry.nbytes):
            return
        same = next((e for e in self.entries if (e.pool, e.windows) == (entry.pool, entry.windows)), None)
        if same is not None:
            self.entries.remove(same)
            if same.sq is not None or entry.sq is None:
                entry = same  # what is kept already serves every request the new sum could
        # a whole pool's sum serves every subset of it: trials' sums go first, and never push one out
        while sum(e.nbytes for e in self.entries) + entry.nbytes > self.budget:
            victims = [e for e in self.entries if not e.whole] or (list(self.entries) if entry.whole else [])
            if not victims:
                return
            self.entries.remove(victims[0])
        self.entries.append(entry)

    def sum_accumulator(self, pool: Hashable, windows: Sequence[int], model: nn.Module,
                        whole: bool = False) -> SumBuilder | None:
        """A builder for a pass that computes the gradient of each of a pool's `windows` anyway (the per-sample
        statistics): it sums them into an entry for those windows (`whole`: the entire pool, kept before any
        trial's sum), put in the cache when the pass closes it. None when that entry would not fit the budget."""
        if not self.fits(sum_bytes(model, squares=True)):
            return None
        return SumBuilder(self, pool, frozenset(int(w) for w in windows), whole)

    def nearest(self, pool: Hashable, target: frozenset[int], squares: bool) -> GradSum | None:
        """The cached sum that the fewest window passes turn into the target's (None: start from zero)."""
        usable = [e for e in self.entries if e.pool == pool and (e.sq is not None or not squares)]
        best = min(usable, key=lambda e: len(e.windows ^ target), default=None)
        if best is None or len(best.windows ^ target) >= len(target):
            return None
        return best

    def stats(
        self,
        model: nn.Module,
        pool: Hashable,
        windows: Tensor,
        subset: Sequence[int],
        layer_ids: Sequence[int],
        squares: bool,
        batch_size: int = 4,
        control: Control | None = None,
        sink: Sink = null_sink,
    ) -> CalibStats:
        """Mean gradient (and with `squares` the Fisher diagonal) of the windows `subset` of a pool, for
        `layer_ids`; `windows` is the whole pool at the trial's length. Equal to collect_stats on
        windows[subset], computed from the nearest cached sum."""
        target = frozenset(int(i) for i in subset)
        wanted = [f"{i}.{p}" for i in layer_ids for p in PROJ]
        caching = self.fits(sum_bytes(model, squares))
        base = self.nearest(pool, target, squares) if caching else None
        add = sorted(target - base.windows) if base else sorted(target)
        sub = sorted(base.windows - target) if base else []
        # a sum worth keeping covers every layer; one that cannot be kept covers only what is scored now
        keys = weight_keys(model) if caching else wanted
        grad = {k: v.clone() for k, v in base.grad.items()} if base else {}
        sq = None
        if squares:
            sq = {k: v.clone() for k, v in base.sq.items()} if base else {}
        if base is not None:  # used: the least recently used sums are the first to go
            self.entries.remove(base)
            self.entries.append(base)
        with Stage(sink, "calibration statistics", len(add) + len(sub), "windows") as stage:
            for sign, part, done in ((1.0, add, 0), (-1.0, sub, len(add))):
                if not part:
                    continue
                # summed in host memory: fp32 sums (and squares) of an 8B model's weights are 26 (52) GB
                g, s = gradient_sums(model, windows[part], keys, squares, batch_size, control,
                                     lambda k, done=done: stage.advance(done + k), to="cpu")
                for k in keys:
                    _accumulate(grad, k, g[k], sign, caching)
                    if sq is not None:
                        _accumulate(sq, k, s[k], sign, caching)
                del g, s
        if caching:
            self.put(GradSum(pool, target, grad, sq))
        n = len(target)
        return CalibStats(grad={k: v / n for k, v in grad.items() if k in wanted},
                          fisher={k: v / n for k, v in (sq or {}).items() if k in wanted},
                          n_samples=n, n_tokens=n * windows.shape[1])


def _accumulate(into: dict[str, Tensor], key: str, value: Tensor, sign: float, to_cpu: bool) -> None:
    value = value.cpu() if to_cpu else value
    if key in into:
        into[key].add_(value, alpha=sign)
    else:
        into[key] = value * sign if sign != 1.0 else value

