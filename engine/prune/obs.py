"""Reconstruction-aware importance (`obs`): a group's score is the output error its removal leaves once the
kept inputs of `o_proj` / `down_proj` compensate for it by least squares, found greedily as in Optimal Brain
Surgeon (SlimGPT and ZipLM prune structures this way).

For a projection with weights W (out x d) and damped input covariance H = C + damp * mean(diag C) * I, removing
the input columns G while the others absorb them by least squares raises the output error by
tr(W_G [H^-1]_GG^-1 W_G^T); W and H^-1 are then updated as if G were gone, and the next cheapest group goes.
The greedy order is computed once per layer for every group, so any count of removals reads its first N. The
mean of the inputs is left to the repair's output bias, so H is the covariance, not the second moment. These
scores assume that the kept weights are repaired afterwards (`engine.prune.reconstruct`): without a repair,
the first-order metrics are the better guide.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

from engine.control import Control
from engine.model.structure import decoder_layers, layer_shape
from engine.prune.importance import LayerScores
from engine.prune.reconstruct import Moments

DAMP = 0.01  # relative to the mean input variance: SlimGPT's and SparseGPT's 1%
KEEP_SOLVED = 0.1  # the last 10% of a layer's groups are ranked by their scores at that point, not greedily


def removal_scores(w: Tensor, cov: Tensor, unit: int = 1, block: int = 8, damp: float = DAMP) -> Tensor:
    """One score per group of `unit` consecutive input columns of `w`, increasing along the greedy removal
    order (so the N lowest are the first N removed), valued at the output error each removal adds (made
    non-decreasing so that the order and the values agree)."""
    w = w.detach().double().cpu().clone()  # updated below: never the caller's tensor
    cov = cov.double().cpu()
    d = cov.shape[0]
    groups = d // unit
    h = cov + damp * float(cov.diagonal().mean().clamp_min(1e-12)) * torch.eye(d, dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    alive = torch.ones(groups, dtype=torch.bool)
    order: list[int] = []
    errors: list[float] = []
    cols = torch.arange(d).view(groups, unit)

    def costs() -> Tensor:
        if unit == 1:
            c = w.pow(2).sum(0) / hinv.diagonal().clamp_min(1e-30)
        else:
            c = torch.empty(groups, dtype=torch.float64)
            for g in range(groups):
                if alive[g]:
                    idx = cols[g]
                    c[g] = torch.trace(w[:, idx] @ torch.linalg.solve(hinv[idx][:, idx], w[:, idx].T))
        c[~alive] = float("inf")
        return c

    stop = max(0, groups - max(1, int(KEEP_SOLVED * groups))) if unit == 1 else groups - 1
    while len(order) < stop:
        c = costs()
        pick = torch.argsort(c, stable=True)[: min(block, stop - len(order))]
        idx = cols[pick].flatten()
        errors.extend(c[pick].tolist())
        order.extend(pick.tolist())
        t = torch.linalg.inv(hinv[idx][:, idx]) @ hinv[idx, :]
        # in place: a fresh d x d matrix per step costs four times the update itself on a CPU
        w.addmm_(w[:, idx], t, alpha=-1)
        hinv.addmm_(hinv[:, idx], t, alpha=-1)
        alive[pick] = False
        if unit == 1:  # numerically exact zeros for the removed columns (they are dropped, not kept)
            hinv.index_fill_(0, idx, 0).index_fill_(1, idx, 0)
            w.index_fill_(1, idx, 0)
    c = costs()
    rest = torch.argsort(c, stable=True)[: int(alive.sum())]
    order.extend(rest.tolist())
    errors.extend(c[rest].tolist())
    values = torch.tensor(errors, dtype=torch.float64).clamp_min(0).cummax(0).values
    # strictly increasing along the order, whatever the ties: the lowest N are exactly the first N removed
    ranked = values * (1 + 1e-9 * torch.arange(groups, dtype=torch.float64)) + 1e-300 * torch.arange(groups)
    scores = torch.empty(groups, dtype=torch.float64)
    scores[torch.tensor(order)] = ranked
    return scores


def obs_scores(model: nn.Module, layer_ids: Sequence[int], moments: Mapping[str, Tensor],
               control: Control | None = None, damp: float = DAMP) -> dict[int, LayerScores]:
    """Heads, KV groups and MLP channels of `layer_ids`, scored from the dense model's input moments of
    `o_proj` and `down_proj` (`engine.prune.reconstruct.dense_moments`)."""
    control = control or Control()
    layers = decoder_layers(model)
    out = {}
    for i in layer_ids:
        control.checkpoint()
        layer = layers[i]
        shape = layer_shape(layer)
        cov_o = Moments.from_tensors(moments, f"{i}.o").cov
        cov_d = Moments.from_tensors(moments, f"{i}.down").cov
        w_o = layer.self_attn.o_proj.weight
        heads = removal_scores(w_o, cov_o, shape.head_dim, 1, damp)
        kv = removal_scores(w_o, cov_o, shape.head_dim * shape.heads_per_group, 1, damp)
        channels = removal_scores(layer.mlp.down_proj.weight, cov_d, 1, 8, damp)
        out[i] = LayerScores(heads, kv, channels)
    return out
