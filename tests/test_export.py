"""Exports load in plain transformers (uniform widths) or with trust_remote_code (per-layer widths)."""

import json

import pytest
import torch
from conftest import make_model
from helpers import random_plan
from transformers import AutoModelForCausalLM

from engine.errors import AdapruneError
from engine.model.export import export
from engine.model.load import load
from engine.model.structure import count_params, layer_shapes
from engine.prune.importance import LayerScores
from engine.prune.plan import select, solve_uniform
from engine.prune.slicing import apply_plan

IDS = torch.randint(0, 320, (2, 20), generator=torch.Generator().manual_seed(0))


def _no_pickles(folder):
    assert not [p for p in folder.rglob("*") if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".pickle")]
    assert list(folder.glob("*.safetensors"))


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral"])
def test_uniform_export_loads_in_plain_transformers(kind, tokenizer, tmp_path):
    model = make_model(kind)
    shapes = layer_shapes(model)
    ids = list(range(len(shapes)))
    b = solve_uniform(shapes, ids, count_params(model), 0.2, "query", "same")
    scores = {i: LayerScores(torch.rand(6), torch.rand(2), torch.rand(64)) for i in ids}
    plan = select(shapes, scores, {i: (b.heads, b.channels) for i in ids}, "query")
    apply_plan(model, plan)
    fmt = export(model, tokenizer, tmp_path / "out", card={"title": "t", "recipe": {"metric": "x"}})
    assert fmt == "uniform"
    out = tmp_path / "out"
    assert not (out / "modeling_adaprune.py").exists()
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == kind and "auto_map" not in config
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    assert count_params(plain) == count_params(model)
    torch.testing.assert_close(_logits(plain), _logits(model))
    _no_pickles(out)
    assert "Recipe" in (out / "README.md").read_text()


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_per_layer_export_loads_with_remote_code_and_engine(kind, tokenizer, tmp_path):
    model = make_model(kind, layers=4)
    plan = random_plan(model, "query", seed=7, layer_ids=[1, 2])
    apply_plan(model, plan)
    assert hasattr(model.config, "adaprune_layers")
    out = tmp_path / "out"
    assert export(model, tokenizer, out) == "per-layer"
    assert (out / "modeling_adaprune.py").exists()
    with pytest.raises(ValueError, match="trust_remote_code"):  # plain loading must not silently mis-build it
        AutoModelForCausalLM.from_pretrained(out)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(remote), _logits(model))
    ours = load(str(out), device="cpu").model
    torch.testing.assert_close(_logits(ours), _logits(model))
    _no_pickles(out)
    # a per-layer model can be pruned again and exported again
    apply_plan(ours, random_plan(ours, "query", seed=8, layer_ids=[0]))
    assert export(ours, tokenizer, tmp_path / "again") == "per-layer"
    again = load(str(tmp_path / "again"), device="cpu").model
    torch.testing.assert_close(_logits(again), _logits(ours))


def test_uniform_widths_invalid_for_llama_config_fall_back_to_per_layer(tokenizer, tmp_path):
    # hidden 48 with 6 heads -> prune to 4 heads: 48 % 4 == 0 is fine, so use 8 heads of dim 6, keep 5 per...
    model = make_model("llama", heads=8, kv_heads=1, hidden=48, layers=2)
    plan = random_plan(model, "query", seed=0)
    for lp in plan:  # keep 5 heads everywhere: 48 % 5 != 0, which LlamaConfig rejects
        lp.keep_heads = [0, 1, 2, 3, 4]
        lp.keep_channels = list(range(64))
    apply_plan(model, plan)
    events = []
    assert export(model, tokenizer, tmp_path / "o", sink=events.append) == "per-layer"
    assert any("not valid in a standard config" in getattr(e, "message", "") for e in events)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "o", trust_remote_code=True).eval()
    torch.testing.assert_close(_logits(remote), _logits(model))


def test_existing_output_is_refused_and_force_replaces_it(tokenizer, tmp_path):
    model = make_model("llama")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(AdapruneError, match="exists"):
        export(model, tokenizer, out)
    assert (out / "keep.txt").read_text() == "mine"
    # --force replaces an earlier export, never a folder of other things (a typo could name $HOME)
    with pytest.raises(AdapruneError, match="not a model folder"):
        export(model, tokenizer, out, force=True)
    assert (out / "keep.txt").read_text() == "mine"
    export(model, tokenizer, tmp_path / "first")
    (tmp_path / "first" / "keep.txt").write_text("old export")
    export(model, tokenizer, tmp_path / "first", force=True)
    assert not (tmp_path / "first" / "keep.txt").exists() and (tmp_path / "first" / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["first", "out"]  # no temp folder left behind
