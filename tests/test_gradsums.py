"""Gradient sums shared between trials: exact against direct computation, and fewer window passes."""

import pytest
import torch
from conftest import make_model

from engine.events import StageStarted
from engine.prune.gradsums import GradientCache, sum_bytes
from engine.prune.importance import collect_sample_stats, collect_stats, score_layers

POOL = ("src", 16)


def _pool(n=8, length=16):
    return torch.randint(3, 320, (n, length), generator=torch.Generator().manual_seed(7))


def _passes(events) -> list[int]:
    return [e.total for e in events if isinstance(e, StageStarted) and e.stage == "calibration statistics"]


def _assert_same(model, a, b, metric, layers):
    for i in layers:
        x = score_layers(model, [i], metric, "sum", a)[i]
        y = score_layers(model, [i], metric, "sum", b)[i]
        for u, v in ((x.heads, y.heads), (x.kv_groups, y.kv_groups), (x.channels, y.channels)):
            torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("metric", ["taylor1", "taylor-mix"])
def test_subsets_from_other_subsets_equal_direct_computation(metric):
    model = make_model("qwen2", heads=6, kv_heads=2)
    pool = _pool()
    squares = metric == "taylor-mix"
    cache = GradientCache(1 << 30)
    events = []
    for subset in ([0, 1, 2, 3], [1, 2, 3, 5, 6], [2, 3], [7, 2, 3, 5]):
        got = cache.stats(model, POOL, pool, subset, [0, 2], squares, batch_size=2, sink=events.append)
        direct = collect_stats(model, pool[subset], [0, 2], metric, batch_size=1)
        assert got.n_samples == len(subset) and got.n_tokens == len(subset) * 16
        _assert_same(model, got, direct, metric, [0, 2])
    # from scratch (4); {0,1,2,3} -0 +5 +6 (3); from scratch or -0 -1 (2); {2,3} +5 +7 (2)
    assert _passes(events) == [4, 3, 2, 2]
    assert not any(p.grad is not None for p in model.parameters())


def test_the_pool_sum_from_the_per_sample_pass_serves_a_large_subset_cheaply():
    model = make_model("llama")
    pool = _pool()
    cache = GradientCache(1 << 30)
    sums = cache.sum_accumulator(POOL, range(pool.shape[0]), model, whole=True)
    collect_sample_stats(model, pool, on_grad=sums.add)
    sums.close()
    events = []
    subset = [0, 1, 2, 4, 5, 7]
    got = cache.stats(model, POOL, pool, subset, [1], squares=True, sink=events.append)
    _assert_same(model, got, collect_stats(model, pool[subset], [1], "taylor-mix", batch_size=1), "taylor-mix", [1])
    assert _passes(events) == [2]  # the pool's sum minus windows 3 and 6


def test_the_same_subset_again_costs_no_pass_and_squares_are_not_invented():
    model = make_model("llama")
    pool = _pool()
    cache = GradientCache(1 << 30)
    events = []
    cache.stats(model, POOL, pool, [1, 2, 3], [0], squares=False, sink=events.append)
    cache.stats(model, POOL, pool, [3, 2, 1], [0], squares=False, sink=events.append)
    # a sum gathered in batches has no per-window squares: taylor-mix must compute them
    cache.stats(model, POOL, pool, [1, 2, 3], [0], squares=True, sink=events.append)
    # another pool (e.g. the other window length) never borrows these sums
    cache.stats(model, ("src", 8), pool[:, :8], [1, 2, 3], [0], squares=False, sink=events.append)
    assert _passes(events) == [3, 0, 3, 3]


def test_budget_keeps_the_most_recently_used_sums():
    model = make_model("llama")
    pool = _pool()
    one = sum_bytes(model, squares=False)
    cache = GradientCache(2 * one)
    for subset in ([0], [1], [2]):
        cache.stats(model, POOL, pool, subset, [0], squares=False)
    assert [sorted(e.windows) for e in cache.entries] == [[1], [2]]
    none = GradientCache(0)
    stats = none.stats(model, POOL, pool, [0, 1], [0], squares=False)
    assert none.entries == [] and set(stats.grad) == {f"0.{p}" for p in
                                                      ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                       "up_proj", "down_proj")}
    assert none.sum_accumulator(POOL, range(8), model) is None


def test_a_whole_pool_sum_is_never_pushed_out_by_a_trials_sum():
    model = make_model("llama")
    pool = _pool()
    cache = GradientCache(sum_bytes(model, squares=True))  # room for the pool's sum and nothing else
    sums = cache.sum_accumulator(POOL, range(pool.shape[0]), model, whole=True)
    collect_sample_stats(model, pool, on_grad=sums.add)
    sums.close()
    events = []
    for subset in ([0, 1, 2, 3, 4, 5], [1, 2, 3, 4, 5, 6]):
        cache.stats(model, POOL, pool, subset, [0], squares=False, sink=events.append)
    assert [e.whole for e in cache.entries] == [True]
    assert _passes(events) == [2, 2]  # each from the pool's sum
