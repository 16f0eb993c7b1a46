"""Physical pruning makes tensors smaller and computes exactly what zeroing the same structures computes."""

import pytest
import torch
from conftest import make_model
from helpers import random_plan, zeroed_copy

from engine.errors import AdapruneError
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.prune.plan import LayerPlan, params_after
from engine.prune.slicing import apply_plan


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
@pytest.mark.parametrize("head_mode", ["query", "kv"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_pruned_logits_equal_zeroed_dense(kind, head_mode, attn):
    model = make_model(kind, heads=6, kv_heads=2, attn=attn)
    plan = random_plan(model, head_mode, seed=3)
    ref = zeroed_copy(model, plan)
    shapes = layer_shapes(model)
    before = count_params(model)
    apply_plan(model, plan)
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, atol=1e-5, rtol=1e-4)
    # the tensors really are smaller, and the arithmetic agrees with the tensors
    assert count_params(model) == params_after(shapes, plan, before) < before
    for layer, lp in zip(decoder_layers(model), plan, strict=True):
        hd = layer.self_attn.head_dim
        assert layer.self_attn.q_proj.weight.shape[0] == len(lp.keep_heads) * hd
        assert layer.self_attn.k_proj.weight.shape[0] == len(lp.keep_kv) * hd
        assert layer.mlp.down_proj.weight.shape[1] == len(lp.keep_channels)


def test_generation_with_cache_after_pruning(tokenizer):
    model = make_model("llama")
    plan = random_plan(model, "query", seed=1)
    ref = zeroed_copy(model, plan)
    apply_plan(model, plan)
    prompt = torch.tensor([[1, 5, 9, 14, 3]])
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 2, "eos_token_id": None}
    assert torch.equal(model.generate(prompt, **kw), ref.generate(prompt, **kw))


def test_plan_breaking_gqa_is_refused():
    model = make_model("llama", heads=6, kv_heads=2)  # heads 0-2 read KV head 0, heads 3-5 KV head 1
    s = layer_shapes(model)[0]
    bad = LayerPlan(keep_heads=[0, 1, 3], keep_kv=[0, 1], keep_channels=list(range(s.intermediate)))
    plan = [LayerPlan(list(range(6)), [0, 1], list(range(s.intermediate))) for _ in range(4)]
    plan[1] = bad
    with pytest.raises(AdapruneError, match="same number of its own query heads"):
        apply_plan(model, plan)
    orphan = LayerPlan(keep_heads=[0, 3], keep_kv=[0], keep_channels=list(range(s.intermediate)))
    plan[1] = orphan
    with pytest.raises(AdapruneError):
        apply_plan(model, plan)


def test_repeat_kv_layout_is_contiguous():
    """The query heads that read KV head g are g*r..(g+1)*r-1: perturbing KV head g changes only those."""
    model = make_model("llama", heads=6, kv_heads=2, attn="eager")
    attn = decoder_layers(model)[0].self_attn
    hd, r = attn.head_dim, 3
    seen = {}
    attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.__setitem__("x", args[0].detach().clone()))
    ids = torch.randint(0, 320, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids)
        base = seen["x"]
        attn.v_proj.weight[hd : 2 * hd] += 1.0  # KV head 1
        model(ids)
    changed = [h for h in range(6) if not torch.allclose(base[..., h * hd : (h + 1) * hd], seen["x"][..., h * hd : (h + 1) * hd])]
    assert changed == [h for h in range(6) if h // r == 1]
