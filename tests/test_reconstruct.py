"""Layer-wise reconstruction: the ridge solve against brute force, its limits, and whole-model behaviour."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_model
from helpers import hidden_error, random_plan

from engine.errors import AdapruneError
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.prune.reconstruct import (
    Moments,
    dense_moments,
    layer_inputs,
    merge_moments,
    moments_and_losses,
    pruned_layer_ids,
    reconstruct,
    repair_from_moments,
    ridge_weights,
)
from engine.prune.slicing import apply_plan


def _windows(n: int = 12, length: int = 24, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 320, (n, length), generator=torch.Generator().manual_seed(seed))


def _problem(seed: int = 0, n: int = 400, d: int = 12, out: int = 5):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + torch.randn(d, generator=g, dtype=torch.float64)
    w = torch.randn(out, d, generator=g, dtype=torch.float64)
    keep = torch.tensor([0, 2, 3, 7, 8, 11])
    mom = Moments(d)
    for chunk in x.split(97):  # uneven batches: the merge must be exact
        mom.add(chunk.float())
    return x, w, keep, mom


def _err(x, w, keep, new, b) -> float:
    return float(((x @ w.T) - (x[:, keep] @ new.T + b)).pow(2).sum(1).mean())


def test_moments_merge_matches_direct_computation():
    x, _, _, mom = _problem()
    assert mom.n == x.shape[0]
    torch.testing.assert_close(mom.mean, x.mean(0), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mom.cov, torch.cov(x.T, correction=0), rtol=1e-4, atol=1e-4)


def test_moments_of_two_texts_merge_into_those_of_both():
    model = make_model("llama")
    a, b = _windows(6, seed=1), _windows(10, seed=2)
    layers = [0, 1]
    parts = [dense_moments(model, layers, a, 4), dense_moments(model, layers, b, 4)]
    kept = [{k: v.clone() for k, v in p.items()} for p in parts]
    merged = merge_moments(parts)
    both = dense_moments(model, layers, torch.cat([a, b]), 4)
    assert merged.keys() == both.keys()
    for k in both:  # the outer products are float32: equal to their rounding
        torch.testing.assert_close(merged[k], both[k], rtol=1e-4, atol=1e-5 * float(both[k].abs().max()))
    for part, before in zip(parts, kept, strict=True):  # merged in place, but never into the parts (a cache's)
        assert all(torch.equal(part[k], before[k]) for k in part)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_one_pass_gives_the_moments_and_each_windows_loss(kind):
    from engine.control import Control
    from engine.search.data import window_losses

    model = make_model(kind)
    w = _windows(7)
    moments, losses = moments_and_losses(model, w, 3)
    torch.testing.assert_close(losses, window_losses(model, w, Control()), rtol=1e-4, atol=1e-5)
    # the inputs o_proj and down_proj see in the model's own forward pass
    seen: dict[str, list] = {}
    hooks = [getattr(parent, proj).register_forward_pre_hook(
        lambda _m, args, key=f"{i}.{tag}": seen.setdefault(key, []).append(args[0]))
        for i, layer in enumerate(decoder_layers(model))
        for parent, proj, tag in ((layer.self_attn, "o_proj", "o"), (layer.mlp, "down_proj", "down"))]
    with torch.no_grad():
        model(input_ids=w)
    for h in hooks:
        h.remove()
    assert {k.rsplit(".", 1)[0] for k in moments} == set(seen)
    for key, xs in seen.items():
        ref = Moments.of(xs)
        torch.testing.assert_close(moments[f"{key}.mean"], ref.mean, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(moments[f"{key}.m2"], ref.m2, rtol=1e-3, atol=1e-4 * float(ref.m2.abs().max()))


def test_ridge_solution_matches_brute_force_least_squares():
    x, w, keep, mom = _problem()
    lam = 0.7
    new, b = ridge_weights(w, None, mom, keep, lam)
    # the same problem as one augmented least squares: [x_K - mu_K; sqrt(reg) I] W'^T = [y - mu_y; sqrt(reg) W_K^T]
    xc = x - x.mean(0)
    reg = lam * float(torch.cov(x.T, correction=0)[keep][:, keep].diagonal().mean())
    n = x.shape[0]
    a = torch.cat([xc[:, keep] / n**0.5, reg**0.5 * torch.eye(len(keep), dtype=torch.float64)])
    y = torch.cat([(xc @ w.T) / n**0.5, reg**0.5 * w[:, keep].T])
    ref = torch.linalg.lstsq(a, y).solution.T
    torch.testing.assert_close(new, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(b, x.mean(0) @ w.T - new @ x.mean(0)[keep], rtol=1e-3, atol=1e-3)


def test_error_never_exceeds_slicing_and_grows_with_lambda_to_the_sliced_limit():
    x, w, keep, mom = _problem()
    sliced = _err(x, w, keep, w[:, keep], torch.zeros(w.shape[0], dtype=torch.float64))
    errors = []
    for lam in (0.01, 0.1, 1.0, 10.0, 1e9):
        new, b = ridge_weights(w, None, mom, keep, lam)
        errors.append(_err(x, w, keep, new, b))
    assert all(e <= sliced + 1e-9 for e in errors)
    assert errors == sorted(errors)  # a stronger pull toward the sliced weights fits the data less
    new, b = ridge_weights(w, None, mom, keep, 1e9)
    torch.testing.assert_close(new, w[:, keep], rtol=1e-5, atol=1e-5)  # lam -> inf: the sliced weights,
    dropped = torch.tensor(sorted(set(range(w.shape[1])) - set(keep.tolist())))
    torch.testing.assert_close(b, w[:, dropped] @ x.mean(0)[dropped], rtol=1e-4, atol=1e-4)  # + their mean
    assert errors[0] < 0.75 * sliced  # and a weak pull really repairs (these inputs are correlated)


def test_an_existing_bias_is_kept_in_the_target():
    x, w, keep, mom = _problem()
    bias = torch.arange(w.shape[0], dtype=torch.float64)
    new0, b0 = ridge_weights(w, None, mom, keep, 1.0)
    new1, b1 = ridge_weights(w, bias, mom, keep, 1.0)
    torch.testing.assert_close(new0, new1)
    torch.testing.assert_close(b1 - b0, bias)


def _pruned_pair(kind: str, seed: int = 0, layer_ids=(1, 2)):
    dense = make_model(kind, layers=4)
    plan = random_plan(dense, "query", seed=seed, layer_ids=layer_ids)
    model = copy.deepcopy(dense)
    apply_plan(model, plan)
    ids = pruned_layer_ids(layer_shapes(dense), plan)
    return dense, model, plan, {i: decoder_layers(dense)[i] for i in ids}


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_sequential_reconstruction_lowers_the_output_error_on_the_calibration_set(kind):
    dense, model, plan, dense_layers = _pruned_pair(kind)
    windows = _windows()
    sliced = hidden_error(dense, model, windows)
    before = count_params(model)
    repaired = reconstruct(model, dense_layers, plan, windows, lam=0.1, batch_size=5)
    assert repaired == sorted(dense_layers)
    assert hidden_error(dense, model, windows) < 0.8 * sliced
    # the new parameters are exactly the output biases of the repaired projections
    hidden = dense.config.hidden_size
    added = sum(hidden * (int(decoder_layers(model)[i].self_attn.o_proj.bias is not None) +
                          int(decoder_layers(model)[i].mlp.down_proj.bias is not None)) for i in repaired)
    assert count_params(model) == before + added > before


def test_the_first_pruned_layer_repairs_the_same_from_dense_statistics():
    """Below the first pruned layer nothing changed, so the dense inputs are the pruned model's there."""
    dense, model, plan, dense_layers = _pruned_pair("llama", layer_ids=(1,))
    windows = _windows()
    seq = copy.deepcopy(model)
    reconstruct(seq, dense_layers, plan, windows, lam=0.3)
    moments = dense_moments(dense, list(dense_layers), windows)
    repair_from_moments(model, dense_layers, plan, moments, lam=0.3)
    a, b = decoder_layers(seq)[1], decoder_layers(model)[1]
    assert a.self_attn.o_proj.bias is not None and a.mlp.down_proj.bias is not None  # both were cut
    torch.testing.assert_close(a.self_attn.o_proj.weight, b.self_attn.o_proj.weight, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(a.self_attn.o_proj.bias, b.self_attn.o_proj.bias, rtol=1e-4, atol=1e-4)
    # the MLP reads the repaired attention's output sequentially, the dense attention's from dense statistics
    assert not torch.allclose(a.mlp.down_proj.weight, b.mlp.down_proj.weight, rtol=1e-4, atol=1e-4)


def test_layer_inputs_reproduce_the_models_own_forward():
    dense = make_model("llama", layers=3)
    windows = _windows(5, 16)
    batches = layer_inputs(dense, windows, batch_size=2)
    assert [h.shape[0] for h, _ in batches] == [2, 2, 1]
    with torch.no_grad():
        want = dense(input_ids=windows, output_hidden_states=True).hidden_states
        hs = [h for h, _ in batches]
        for layer in decoder_layers(dense):
            hs = [layer(h, **kw) for h, (_, kw) in zip(hs, batches, strict=True)]
    torch.testing.assert_close(dense.model.norm(torch.cat(hs)), want[-1], rtol=1e-4, atol=1e-4)


# --- repaired plans: counted biases, exports that reload, stored plans that rebuild ------------------------


def _repaired(kind: str, layer_ids, fraction: float = 0.2, attn_share="same", mode: str = "sequential"):
    from engine.prune.plan import Plan
    from engine.prune.recipe import Recipe, prune_with
    from engine.prune.reconstruct import Repair, repair_model, snapshot_layers

    dense = make_model(kind, layers=4)
    model = copy.deepcopy(dense)
    windows = _windows(8, 20, seed=3)
    repair = Repair("test:8x20", lam=0.5, mode=mode)
    moments = dense_moments(dense, list(layer_ids), windows) if mode == "dense" else None
    dense_layers = snapshot_layers(model, list(layer_ids))
    plan = prune_with(model, Recipe(fraction, "l2", attn_share=attn_share, repair=repair), list(layer_ids), windows)
    cut = pruned_layer_ids(layer_shapes(dense), plan.layers)
    repair_model(model, {i: dense_layers[i] for i in cut}, plan.layers, repair, windows, moments)
    return dense, model, Plan.from_dict(plan.to_dict()), windows


@pytest.mark.parametrize("mode", ["sequential", "dense"])
def test_a_stored_repaired_plan_rebuilds_the_same_model(mode):
    from engine.prune.reconstruct import apply_stored_plan

    dense, model, plan, windows = _repaired("llama", [1, 2], mode=mode)
    assert plan.repair["mode"] == mode
    assert count_params(model) == plan.params_after
    again = copy.deepcopy(dense)
    apply_stored_plan(again, plan, lambda r: windows)
    ids = _windows(2, 16, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, model(input_ids=ids).logits)
    with pytest.raises(AdapruneError, match="calibration windows"):
        apply_stored_plan(copy.deepcopy(dense), plan, None)


def test_the_repair_biases_count_toward_the_target():
    from engine.prune.reconstruct import bias_layout, bias_params

    dense, model, plan, _ = _repaired("llama", [0, 1, 2, 3])  # every layer, same widths: Llama's full biases
    layout = bias_layout("llama", layer_shapes(dense), plan.layers)
    assert all(len(p) == 7 for p in layout.values())
    added = bias_params(layer_shapes(dense), plan.layers, layout)
    assert added > 0 and count_params(model) == plan.params_after
    assert model.config.attention_bias and model.config.mlp_bias
    # the structures removed pay for the biases: the net count still lands on the target, within the solver's
    # tolerance, and at least as much structure goes as without a repair
    from engine.prune.recipe import Recipe, prune_with

    plain = prune_with(copy.deepcopy(dense), Recipe(0.2, "l2", attn_share="same"), [0, 1, 2, 3], _windows(8, 20, seed=3))
    target = 0.2 * plan.params_before
    assert abs(plan.removed - target) <= max(abs(plain.removed - target), 0.002 * plan.params_before)
    assert plan.removed + added >= plain.removed


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_a_uniform_repaired_llama_exports_for_plain_transformers(tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.model.export import export

    _, model, plan, _ = _repaired("llama", [0, 1, 2, 3])
    assert export(model, tokenizer, tmp_path / "out") == "uniform"
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert count_params(plain) == plan.params_after
    ids = _windows(2, 16, seed=5)
    torch.testing.assert_close(_logits(plain, ids), _logits(model, ids))


@pytest.mark.parametrize("kind,layer_ids", [("llama", [1, 2]), ("qwen2", [1, 2]), ("qwen2", [0, 1, 2, 3])])
def test_per_layer_repaired_exports_reload_with_remote_code_and_the_engine(kind, layer_ids, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from engine.model.export import export
    from engine.model.load import load

    _, model, plan, _ = _repaired(kind, layer_ids)
    # Qwen2's config has no output biases: even uniform widths need the modeling file
    assert export(model, tokenizer, tmp_path / "out") == "per-layer"
    ids = _windows(2, 16, seed=5)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    ours = load(str(tmp_path / "out"), device="cpu").model
    for m in (remote, ours):
        assert count_params(m) == plan.params_after
        torch.testing.assert_close(_logits(m, ids), _logits(model, ids))


@pytest.mark.parametrize("layer_ids", [[1, 2], [0, 1, 2, 3]])
def test_the_layer_review_counts_a_repaired_plans_biases(layer_ids):
    from engine.prune.reconstruct import bias_layout, bias_params
    from engine.review import params_with

    dense, _, plan, _ = _repaired("llama", layer_ids)
    assert params_with(plan, {}) == plan.params_after
    # locking layer 1 drops its cut and its biases (and, for Llama's full set, the widths stop being uniform)
    locked = copy.deepcopy(plan)
    s = layer_shapes(dense)[1]
    locked.layers[1] = type(plan.layers[1])(list(range(s.n_heads)), list(range(s.n_kv_heads)),
                                            list(range(s.intermediate)))
    minimal = bias_params(layer_shapes(dense), locked.layers, bias_layout("", layer_shapes(dense), locked.layers))
    from engine.prune.plan import params_after

    assert params_with(plan, {1: (0, 0)}) == params_after(layer_shapes(dense), locked.layers,
                                                          plan.params_before) + minimal
