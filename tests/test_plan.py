"""The parameter target: exact arithmetic, the attention/MLP split, rounding, impossible targets."""

import pytest
import torch
from conftest import make_model

from engine.config import default_layer_range
from engine.errors import AdapruneError
from engine.model.structure import count_params, layer_shapes
from engine.prune.importance import LayerScores
from engine.prune.plan import params_after, select, solve_uniform
from engine.prune.slicing import apply_plan


def _scores(shapes, ids):
    g = torch.Generator().manual_seed(0)
    return {i: LayerScores(torch.rand(shapes[i].n_heads, generator=g), torch.rand(shapes[i].n_kv_heads, generator=g),
                           torch.rand(shapes[i].intermediate, generator=g)) for i in ids}


def test_default_layer_range_scales_llm_pruner_recipe():
    assert default_layer_range(32) == (4, 30)  # LLaMA-7B: layers 4..29
    assert default_layer_range(30) == (4, 28)  # SmolLM2-135M: layers 4..27
    assert default_layer_range(4) == (0, 4)


@pytest.mark.parametrize("fraction", [0.1, 0.2, 0.35])
@pytest.mark.parametrize("head_mode", ["query", "kv"])
@pytest.mark.parametrize("attn_share", ["same", "auto", 0.0, 0.3])
def test_reached_count_is_exact_and_close_to_target(fraction, head_mode, attn_share):
    model = make_model("llama", layers=6, heads=6, kv_heads=2, hidden=48, intermediate=128)
    shapes, total = layer_shapes(model), count_params(model)
    ids = list(range(1, 5))
    b = solve_uniform(shapes, ids, total, fraction, head_mode, attn_share)  # every case here is reachable
    plan = select(shapes, _scores(shapes, ids), {i: (b.heads, b.channels) for i in ids}, head_mode)
    assert total - params_after(shapes, plan, total) == b.removed
    apply_plan(model, plan)
    assert total - count_params(model) == b.removed
    step = 4 * shapes[0].channel_params
    assert abs(b.removed - fraction * total) <= max(step / 2, 0.002 * total)
    if attn_share in (0.0, "auto") and fraction < 0.3:
        assert b.heads == 0 and b.attn_removed == 0


def test_rounding_keeps_mlp_width_a_multiple():
    model = make_model("llama", layers=4, intermediate=256)
    shapes, total = layer_shapes(model), count_params(model)
    b = solve_uniform(shapes, [0, 1, 2, 3], total, 0.2, "query", 0.0, round_to=64)
    assert (256 - b.channels) % 64 == 0


def test_impossible_targets_are_refused():
    model = make_model("llama", layers=4)
    shapes, total = layer_shapes(model), count_params(model)
    for bad in (0.0, -0.1, 0.95):
        with pytest.raises(AdapruneError, match=r"outside \(0, 0.9\]"):
            solve_uniform(shapes, [0, 1, 2, 3], total, bad)
    with pytest.raises(AdapruneError, match="at most"):
        solve_uniform(shapes, [2], total, 0.6)  # one layer cannot give 60% of the model
    with pytest.raises(AdapruneError, match="cannot reach"):
        solve_uniform(shapes, [0, 1, 2, 3], total, 0.001)  # below one channel per layer


def test_auto_split_uses_attention_only_when_channels_cannot_reach():
    model = make_model("llama", layers=4, heads=6, kv_heads=2, hidden=48, intermediate=64)
    shapes, total = layer_shapes(model), count_params(model)
    ids = [0, 1, 2, 3]
    low = solve_uniform(shapes, ids, total, 0.15, "query", "auto")
    assert low.heads == 0
    high = solve_uniform(shapes, ids, total, 0.5, "query", "auto")  # more than all MLP channels can give
    assert high.heads > 0
    with pytest.raises(AdapruneError, match="cannot reach|at most"):
        solve_uniform(shapes, ids, total, 0.5, "query", 0.0)
    with pytest.raises(AdapruneError, match="give auto, same"):
        solve_uniform(shapes, ids, total, 0.2, "query", "most")


def test_overrides_are_respected_and_the_rest_meets_the_target():
    from engine.prune.plan import parse_overrides, removal_of
    from engine.prune.recipe import Recipe, prune_with

    model = make_model("llama", layers=4, heads=6, kv_heads=2, intermediate=64)
    shapes, total = layer_shapes(model), count_params(model)
    ov = parse_overrides({"1": "lock", "2": {"heads": 1, "channels": 10}}, 4, shapes, "query")
    assert ov == {1: (0, 0), 2: (1, 10)} and removal_of(shapes, ov, "query") > 0
    windows = torch.randint(3, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    plan = prune_with(model, Recipe(0.2, "taylor1", attn_share="auto"), [0, 1, 2, 3], windows, overrides=ov)
    assert plan.layers[1].widths() == (6, 2, 64)
    assert plan.layers[2].widths() == (4, 2, 54)
    assert plan.layers[0].widths() == plan.layers[3].widths() != (6, 2, 64)
    assert abs(plan.removed - 0.2 * total) <= max(2 * shapes[0].channel_params / 2, 0.002 * total)
    assert count_params(model) == plan.params_after


def test_bad_overrides_are_refused():
    from engine.prune.plan import parse_overrides

    shapes = layer_shapes(make_model("llama", layers=4, heads=6, kv_heads=2))
    with pytest.raises(AdapruneError, match="at least one query head"):
        parse_overrides({"1": {"heads": 3, "channels": 0}}, 4, shapes, "query")
    with pytest.raises(AdapruneError, match="layers 0..3"):
        parse_overrides({"9": "lock"}, 4, shapes, "query")
    with pytest.raises(AdapruneError, match="use \"lock\""):
        parse_overrides({"1": "keep"}, 4, shapes, "query")
    with pytest.raises(AdapruneError, match="more than the"):
        solve_uniform(shapes, [0], count_params(make_model("llama")), 0.05, "query", "auto", 1, 10**9)


def test_depth_ramp_moves_channels_but_not_the_total():
    from engine.prune.plan import ramp_channels

    ids = list(range(4, 28))
    flat = ramp_channels(ids, 521, 1536, 0.0)
    up = ramp_channels(ids, 521, 1536, 0.5)
    down = ramp_channels(ids, 521, 1536, -0.5)
    assert set(flat.values()) == {521}
    for r in (up, down):
        assert sum(r.values()) == 521 * len(ids) and max(r.values()) < 1536
    assert up[4] < up[15] < up[27] and down[4] > down[27]
    r64 = ramp_channels(ids, 512, 1536, 0.25, round_to=64)
    assert all(c % 64 == 0 for c in r64.values()) and sum(r64.values()) == 512 * len(ids)


def test_ramped_plan_lands_on_the_same_count():
    from engine.prune.recipe import Recipe, prune_with

    a, b = make_model("llama", layers=6, intermediate=128), make_model("llama", layers=6, intermediate=128)
    flat = prune_with(a, Recipe(0.2, "l2", attn_share="auto"), list(range(6)))
    ramped = prune_with(b, Recipe(0.2, "l2", attn_share="auto", ramp=0.5), list(range(6)))
    assert flat.params_after == ramped.params_after == count_params(b)
    widths = [lp.widths()[2] for lp in ramped.layers]
    assert widths[0] > widths[-1]  # deeper layers lose more


def _channel_scores(rows):
    return {i: LayerScores(torch.ones(2), torch.ones(1), torch.tensor(r, dtype=torch.float32))
            for i, r in enumerate(rows)}


def test_global_ranking_compares_normalised_scores_and_keeps_the_total():
    from engine.prune.plan import global_channels

    # layer 0 has a few essential channels and many weak ones; layer 1 is flat but 1000x larger in raw scale
    skewed = [10.0, 10.0, 10.0, 10.0] + [0.1] * 12
    flat = [1000.0 + j for j in range(16)]
    counts = global_channels(_channel_scores([skewed, flat]), [0, 1], 6, 16)
    assert sum(counts.values()) == 12
    assert counts[0] == 12 and counts[1] == 0  # raw scale alone would have emptied layer 0 of nothing
    # the cap keeps a tenth of every layer even when one layer is all weak
    capped = global_channels(_channel_scores([skewed, flat]), [0, 1], 8, 16)
    assert capped[0] <= int(0.9 * 16) and sum(capped.values()) == 16
    r4 = global_channels(_channel_scores([skewed, flat]), [0, 1], 4, 16, round_to=4)
    assert all(c % 4 == 0 for c in r4.values()) and sum(r4.values()) == 8
    with pytest.raises(AdapruneError, match="uniform allocation"):
        global_channels(_channel_scores([skewed, flat]), [0, 1], 15, 16)


def test_global_plan_lands_on_the_same_count_and_drops_the_lowest_channels():
    from engine.prune.recipe import Recipe, prune_with

    a, b = make_model("llama", layers=4, intermediate=64), make_model("llama", layers=4, intermediate=64)
    shapes = layer_shapes(a)
    scores = _scores(shapes, range(4))
    scores[2].channels *= 0.01  # layer 2's channels are uniformly weaker: normalisation must not single it out
    scores[1].channels = torch.cat([torch.full((48,), 0.001), torch.ones(16)])  # 48 weak channels in layer 1
    uniform = prune_with(a, Recipe(0.2, "l2", attn_share="auto"), list(range(4)), scores=scores)
    ranked = prune_with(b, Recipe(0.2, "l2", attn_share="auto", allocation="global"), list(range(4)), scores=scores)
    assert ranked.params_after == uniform.params_after == count_params(b)
    kept = [len(lp.keep_channels) for lp in ranked.layers]
    assert kept[1] == min(kept) and set(ranked.layers[1].keep_channels) <= set(range(48, 64))
    assert ranked.recipe["allocation"] == "global"
    with pytest.raises(AdapruneError, match="give one of them"):
        prune_with(make_model("llama", layers=4), Recipe(0.2, "l2", allocation="global", ramp=0.3), list(range(4)))
