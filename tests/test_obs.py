"""Reconstruction-aware (OBS) importance against brute-force least squares."""

import copy

import pytest
import torch
from conftest import make_model
from helpers import hidden_error

from engine.prune.obs import removal_scores


def _error(w: torch.Tensor, h: torch.Tensor, removed: list[int]) -> float:
    """min over the kept columns of tr((W - W') H (W - W')^T) with W' zero on `removed`: the Schur complement."""
    d = h.shape[0]
    kept = [j for j in range(d) if j not in removed]
    if not removed:
        return 0.0
    h_rr = h[removed][:, removed]
    if kept:
        h_rk = h[removed][:, kept]
        h_rr = h_rr - h_rk @ torch.linalg.solve(h[kept][:, kept], h_rk.T)
    w_r = w[:, removed]
    return float(torch.trace(w_r @ h_rr @ w_r.T))


def _problem(out: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    cov = torch.cov(x.T, correction=0)
    return w, cov


def _damped(cov: torch.Tensor, damp: float) -> torch.Tensor:
    return cov + damp * cov.diagonal().mean() * torch.eye(cov.shape[0], dtype=torch.float64)


def test_each_removal_is_the_cheapest_given_the_ones_before():
    for seed in range(3):
        w, cov = _problem(20, 12, seed)
        scores = removal_scores(w, cov, unit=1, block=1, damp=0.01)
        order = torch.argsort(scores).tolist()
        h = _damped(cov, 0.01)
        # the greedy part (all but the last 10%, here the last column) follows brute force step by step
        for k in range(len(order) - 1):
            before = order[:k]
            costs = {j: _error(w, h, [*before, j]) for j in range(12) if j not in before}
            assert order[k] == min(costs, key=costs.get)


def test_groups_of_columns_are_removed_whole_and_cheapest_first():
    w, cov = _problem(20, 12, 7)
    h = _damped(cov, 0.01)
    scores = removal_scores(w, cov, unit=3, block=1, damp=0.01)
    assert scores.shape == (4,)
    first = int(torch.argmin(scores))
    costs = {g: _error(w, h, list(range(3 * g, 3 * g + 3))) for g in range(4)}
    assert first == min(costs, key=costs.get)
    assert torch.unique(scores).numel() == 4  # a strict order: the N lowest are the first N removed


def test_scores_increase_with_the_error_they_leave():
    w, cov = _problem(24, 16, 3)
    h = _damped(cov, 0.01)
    scores = removal_scores(w, cov, unit=1, block=4, damp=0.01)
    order = torch.argsort(scores).tolist()
    errs = [_error(w, h, order[:k]) for k in (4, 8, 12)]
    assert errs[0] <= errs[1] <= errs[2]
    # greedy in blocks beats removing the same number of columns by weight norm alone
    by_norm = torch.argsort(w.pow(2).sum(0)).tolist()
    assert _error(w, h, order[:8]) <= _error(w, h, by_norm[:8]) + 1e-9


def test_the_callers_weights_are_never_changed():
    w, cov = _problem(20, 12, 1)
    before = w.clone()
    removal_scores(w, cov, unit=1, block=2)
    assert torch.equal(w, before)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_obs_selects_what_the_repair_compensates_best(kind):
    """Same widths, same repair: channels chosen by obs leave less output error than those chosen by weight
    norm, the plan reads the greedy order, and the count lands on the plan's."""
    from engine.model.structure import count_params, layer_shapes
    from engine.prune.obs import obs_scores
    from engine.prune.recipe import Recipe, prune_with
    from engine.prune.reconstruct import (
        Repair,
        dense_moments,
        pruned_layer_ids,
        repair_model,
        snapshot_layers,
    )

    dense = make_model(kind, layers=4, intermediate=96)
    windows = torch.randint(3, 320, (16, 32), generator=torch.Generator().manual_seed(0))
    layer_ids = [1, 2]
    errors = {}
    for metric in ("obs", "l2"):
        model = copy.deepcopy(dense)
        repair = Repair("test:16x32", lam=0.01, mode="dense")
        moments = dense_moments(dense, layer_ids, windows)
        dense_layers = snapshot_layers(model, layer_ids)
        plan = prune_with(model, Recipe(0.15, metric, repair=repair), layer_ids, windows)
        assert count_params(model) == plan.params_after
        if metric == "obs":  # the channels dropped are the first the greedy order removes
            scores = obs_scores(dense, layer_ids, moments)
            for i in layer_ids:
                gone = set(range(96)) - set(plan.layers[i].keep_channels)
                assert gone == set(torch.argsort(scores[i].channels)[: len(gone)].tolist())
        cut = pruned_layer_ids(layer_shapes(dense), plan.layers)
        repair_model(model, {i: dense_layers[i] for i in cut}, plan.layers, repair, windows, moments)
        errors[metric] = hidden_error(dense, model, windows)
    assert errors["obs"] < errors["l2"]


def test_prune_refuses_obs_without_a_repair():
    from engine.config import PruneConfig
    from engine.errors import AdapruneError
    from engine.oneshot import validate

    with pytest.raises(AdapruneError, match="--reconstruct"):
        validate(PruneConfig(model="smollm2-135m", metric="obs"))
