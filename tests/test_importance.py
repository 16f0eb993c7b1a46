"""Group scores against an independent brute-force computation on a tiny GQA model."""

import pytest
import torch
from conftest import make_model

from engine.config import METRICS, PROJ_ATTN, REPAIR_METRICS
from engine.errors import AdapruneError
from engine.model.structure import decoder_layers
from engine.prune.importance import check_metric, collect_stats, score_layers


def _windows(n=4, length=16):
    return torch.randint(3, 320, (n, length), generator=torch.Generator().manual_seed(1))


def _per_sample_grads(model, windows, layer, name):
    w = getattr(decoder_layers(model)[layer].self_attn if "_proj" in name and name[0] in "qkvo" else
                decoder_layers(model)[layer].mlp, name).weight
    grads = []
    for s in range(windows.shape[0]):
        x = windows[s : s + 1]
        g, = torch.autograd.grad(model(input_ids=x, labels=x).loss, w)
        grads.append(g)
    return w.detach(), torch.stack(grads)


@pytest.mark.parametrize("metric", ["taylor1", "taylor2", "taylor-mix", "vector"])
def test_head_and_channel_scores_match_brute_force(metric):
    model = make_model("llama", heads=6, kv_heads=2)
    win = _windows()
    stats = collect_stats(model, win, [1], metric, batch_size=1)
    scores = score_layers(model, [1], metric, "sum", stats)[1]
    attn = decoder_layers(model)[1].self_attn
    hd, r = attn.head_dim, 3
    parts = {}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        w, gs = _per_sample_grads(model, win, 1, name)
        g, h = gs.mean(0), gs.pow(2).mean(0)
        parts[name] = {"taylor1": (w * g).abs(), "taylor2": 0.5 * w**2 * h,
                       "taylor-mix": (w * g - 0.5 * w**2 * h).abs(), "vector": w * g}[metric]
    fin = (lambda t: t.abs()) if metric == "vector" else (lambda t: t)

    def head(h):
        return fin(parts["q_proj"][h * hd : (h + 1) * hd].sum()) + fin(parts["o_proj"][:, h * hd : (h + 1) * hd].sum())

    def group(g):
        q = slice(g * r * hd, (g + 1) * r * hd)  # the contiguous block of query heads reading KV head g
        kv = slice(g * hd, (g + 1) * hd)
        return (fin(parts["q_proj"][q].sum()) + fin(parts["k_proj"][kv].sum()) + fin(parts["v_proj"][kv].sum())
                + fin(parts["o_proj"][:, q].sum()))

    def channel(c):
        return fin(parts["gate_proj"][c].sum()) + fin(parts["up_proj"][c].sum()) + fin(parts["down_proj"][:, c].sum())

    torch.testing.assert_close(scores.heads, torch.stack([head(h) for h in range(6)]), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scores.kv_groups, torch.stack([group(g) for g in range(2)]), rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(scores.channels, torch.stack([channel(c) for c in range(64)]), rtol=1e-4, atol=1e-8)


def test_batched_first_order_equals_per_sample():
    model = make_model("qwen2")
    win = _windows(6)
    a = score_layers(model, [0], "taylor1", "sum", collect_stats(model, win, [0], "taylor1", batch_size=1))[0]
    b = score_layers(model, [0], "taylor1", "sum", collect_stats(model, win, [0], "taylor1", batch_size=3))[0]
    torch.testing.assert_close(a.channels, b.channels, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("metric", [m for m in METRICS if m not in REPAIR_METRICS])  # obs: tests/test_obs.py
@pytest.mark.parametrize("aggregate", ["sum", "mean", "max", "prod", "last"])
def test_every_metric_and_aggregate_scores_every_group(metric, aggregate):
    model = make_model("qwen2", heads=6, kv_heads=3)
    stats = collect_stats(model, _windows(2), [2], metric)
    s = score_layers(model, [2], metric, aggregate, stats)[2]
    assert s.heads.shape == (6,) and s.kv_groups.shape == (3,) and s.channels.shape == (64,)
    assert torch.isfinite(s.channels).all() and torch.isfinite(s.heads).all()
    assert not any(p.grad is not None for p in model.parameters())  # no gradients left behind


def test_magnitude_and_wanda_by_hand():
    model = make_model("llama")
    win = _windows(3)
    mlp = decoder_layers(model)[0].mlp
    l1 = score_layers(model, [0], "l1", "last", collect_stats(model, win, [0], "l1"))[0]
    torch.testing.assert_close(l1.channels, mlp.down_proj.weight.abs().sum(0))
    seen = []
    mlp.down_proj.register_forward_pre_hook(lambda _m, a: seen.append(a[0].detach().reshape(-1, a[0].shape[-1])))
    stats = collect_stats(model, win, [0], "wanda")
    x = torch.cat(seen)
    norm = x.pow(2).mean(0).sqrt()
    wanda = score_layers(model, [0], "wanda", "last", stats)[0]
    torch.testing.assert_close(wanda.channels, mlp.down_proj.weight.abs().sum(0) * norm, rtol=1e-4, atol=1e-6)


def test_unknown_metric_is_refused():
    with pytest.raises(AdapruneError, match="unknown metric"):
        check_metric("taylor3", "sum")
    with pytest.raises(AdapruneError, match="unknown aggregation"):
        check_metric("taylor1", "median")


def test_per_window_gradients_equal_autograd_window_by_window():
    """The Fisher sums and the per-sample statistics form each window's gradient from its inputs and output
    gradients in one backward per batch; autograd on each window alone is the reference (q/k/v biases, GQA)."""
    from engine.prune.importance import collect_sample_stats, gradient_sums

    model = make_model("qwen2", heads=6, kv_heads=2)
    windows = _windows(5, 16)
    keys = ["0.q_proj", "1.o_proj", "1.down_proj", "2.up_proj", "2.v_proj"]
    layers = decoder_layers(model)
    weights = {k: getattr(layers[int(k[0])].self_attn if k[2:] in PROJ_ATTN else layers[int(k[0])].mlp,
                          k[2:]).weight for k in keys}
    per_window = []
    model.eval()
    for s in range(windows.shape[0]):
        model.zero_grad()
        model(input_ids=windows[s : s + 1], labels=windows[s : s + 1]).loss.backward()
        per_window.append({k: w.grad.detach().clone() for k, w in weights.items()})
    model.zero_grad()
    grad, sq = gradient_sums(model, windows, keys, squares=True, batch_size=3)
    plain, _ = gradient_sums(model, windows, keys, squares=False, batch_size=2)
    seen = {k: [] for k in keys}
    collect_sample_stats(model, windows, on_grad=lambda k, g: k in seen and seen[k].append(g), batch_size=2)
    for k in keys:
        torch.testing.assert_close(grad[k], sum(w[k] for w in per_window), rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(plain[k], grad[k], rtol=1e-4, atol=1e-7)
        torch.testing.assert_close(sq[k], sum(w[k].pow(2) for w in per_window), rtol=1e-4, atol=1e-9)
        assert len(seen[k]) == windows.shape[0]
        for got, ref in zip(seen[k], per_window, strict=True):
            torch.testing.assert_close(got, ref[k], rtol=1e-4, atol=1e-7)
    assert all(p.grad is None for p in model.parameters())


def test_a_projection_called_twice_in_a_forward_is_refused_not_summed_wrong():
    """Each window's gradient is formed per call of a projection: a model that calls one twice would get the
    square of each part, not of their sum. It is named, and the model is left as it was."""
    import types

    from engine.prune.importance import gradient_sums

    model = make_model("llama")
    mlp = decoder_layers(model)[1].mlp
    plain = mlp.forward
    mlp.forward = types.MethodType(lambda self, x: plain(x) + self.down_proj(self.act_fn(self.gate_proj(x))), mlp)
    with pytest.raises(AdapruneError, match="calls 1.down_proj more than once"):
        gradient_sums(model, _windows(2, 8), ["1.down_proj"], squares=True)
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("metric", ["vector", "taylor2", "wanda"])
def test_per_sample_cache_equals_direct_scoring(metric):
    from engine.prune.importance import collect_sample_stats, scores_from_samples

    model = make_model("qwen2", heads=6, kv_heads=2)
    pool = _windows(6, 16)
    cache = collect_sample_stats(model, pool)
    subset = torch.tensor([4, 1, 3])
    stats = collect_stats(model, pool[subset], [1, 2], metric, batch_size=1)
    for aggregate, i in (("sum", 1), ("max", 2), ("last", 1)):
        direct = score_layers(model, [i], metric, aggregate, stats)
        cached = scores_from_samples(model, cache, subset, [i], metric, aggregate, seq_len=16)
        for a, b in ((direct[i].heads, cached[i].heads), (direct[i].kv_groups, cached[i].kv_groups),
                     (direct[i].channels, cached[i].channels)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-9)


def test_mixing_two_metrics():
    from engine.prune.importance import LayerScores, mix_scores

    a = {0: LayerScores(torch.tensor([1.0, 2.0]), torch.tensor([1.0]), torch.tensor([1.0, 2.0, 3.0]))}
    b = {0: LayerScores(torch.tensor([40.0, 20.0]), torch.tensor([5.0]), torch.tensor([300.0, 200.0, 100.0]))}
    assert torch.argsort(mix_scores(a, b, 0.0)[0].channels).tolist() == [0, 1, 2]
    assert torch.argsort(mix_scores(a, b, 1.0)[0].channels).tolist() == [2, 1, 0]
    # normalised: a 100x larger metric does not swamp the other at equal weight
    torch.testing.assert_close(mix_scores(a, b, 0.5)[0].channels, torch.tensor([1.0, 1.0, 1.0]))


def test_a_batchs_inputs_are_freed_before_the_next_batch_runs():
    """Each weight's input is kept only until its window gradients are formed: the graph of one batch must not
    hold every projection input through the next batch's forward (memory at an 8B model's scale)."""
    import gc
    import weakref

    from engine.prune.importance import gradient_sums

    model = make_model("llama")
    seen: list[weakref.ref] = []
    alive_at_next: list[int] = []

    def check(_m, _args):
        gc.collect()
        alive_at_next.append(sum(r() is not None for r in seen))

    import engine.prune.importance as importance

    real = importance._window_grad

    def spy(x, dy):
        seen.append(weakref.ref(x._base if x._base is not None else x))  # the batch input, not the view
        return real(x, dy)

    importance._window_grad = spy
    handle = decoder_layers(model)[0].register_forward_pre_hook(check)
    try:
        gradient_sums(model, _windows(4, 8), ["1.down_proj", "2.q_proj"], squares=True, batch_size=2)
    finally:
        importance._window_grad = real
        handle.remove()
    assert seen and alive_at_next == [0, 0]
