"""The real embedded model end to end: load (GGUF -> cached safetensors), prune 20%, evaluate, export, reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.config import PruneConfig, RecoverConfig, SearchConfig
from engine.data.text import load_text
from engine.data.windows import random_windows, tokenize
from engine.model.load import load
from engine.oneshot import prune
from engine.prune.recipe import Recipe, prune_with
from engine.recover.train import recovered_model, run_recovery
from engine.search.driver import create_session
from engine.session.store import Session
from engine.session_export import export_session

pytestmark = pytest.mark.embedded


def test_embedded_model_prunes_exports_and_reloads(tmp_path):
    out = tmp_path / "smol-80"
    cfg = PruneConfig(prune=0.20, metric="taylor1", calib="stdlib-docs:4x64", eval_windows=2, measure_speed=False,
                      measure_memory=False, out=str(out), device="cpu")
    result = prune(cfg)
    dense, pruned = result.dense, result.pruned
    assert dense.params == 134_515_008  # SmolLM2-135M, tied embeddings counted once
    assert abs((dense.params - pruned.params) / dense.params - 0.20) < 0.005
    assert 5 < dense.ppl["stdlib-docs"] < pruned.ppl["stdlib-docs"] < 10 * dense.ppl["stdlib-docs"]
    # LLM-Pruner's range scaled to 30 layers: 4..27 pruned, so the widths differ per layer
    assert result.export_format == "per-layer" and result.plan.recipe["layers"] == "4-27"
    widths = json.loads((out / "config.json").read_text())["adaprune_layers"]
    assert widths[0]["intermediate_size"] == 1536 and widths[10]["intermediate_size"] < 1536

    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    ours = load(str(out), device="cpu").model
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    with torch.no_grad():
        a, b = ours(ids).logits, remote(ids).logits
    torch.testing.assert_close(a, b)
    assert sum(p.numel() for p in remote.parameters()) == pruned.params


def test_embedded_model_recovers_with_lora_and_exports_merged(tmp_path):
    """peft on the real pruned SmolLM2 (per-layer widths, GQA): train, merge, export, reload."""
    session = create_session(tmp_path / "s", "smol", SearchConfig(trials=1, device="cpu"))
    loaded = load("smollm2-135m", device="cpu")
    windows = random_windows(tokenize(loaded.tokenizer, load_text("stdlib-docs", "calib")), 2, 32, 0)
    # the session's plan from one real taylor1 pruning instead of a search (minutes on 2 cores)
    plan = prune_with(loaded.model, Recipe(0.20), list(range(4, 28)), windows)
    session.write_json("plan.json", {"trial": 0, "value": 0.0, "params": {}, "plan": plan.to_dict()})
    cfg = RecoverConfig(steps=2, batch_size=1, seq_len=64, warmup=1, lr=1e-3, valid_windows=1, valid_len=64)
    state = run_recovery(tmp_path / "s", "smol", cfg)
    assert state.status == "done" and state.trainable_params > 0

    out = tmp_path / "recovered"
    assert export_session(tmp_path / "s", "smol", out, recovered=True) == "per-layer"
    merged, _ = recovered_model(Session.open(tmp_path / "s", "smol"), load("smollm2-135m", device="cpu").model)
    remote = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    ids = torch.randint(0, 49152, (1, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(remote(ids).logits, merged(ids).logits, rtol=1e-4, atol=1e-4)
    assert sum(p.numel() for p in remote.parameters()) == plan.params_after


def test_embedded_model_repaired_uniform_export_loads_in_plain_transformers(tmp_path):
    """Reconstruction on the real model: lower PPL than slicing alone, biases counted, a standard Llama config."""
    runs = {}
    for name, repair in (("sliced", False), ("repaired", True)):
        cfg = PruneConfig(prune=0.20, calib="stdlib-docs:4x64", layers="all", eval_windows=4, measure_speed=False,
                          measure_memory=False, device="cpu", reconstruct=repair,
                          reconstruct_calib="stdlib-docs:32x128", out=str(tmp_path / name))
        runs[name] = prune(cfg)
    rep = runs["repaired"]
    assert rep.pruned.ppl["stdlib-docs"] < runs["sliced"].pruned.ppl["stdlib-docs"]
    assert rep.export_format == "uniform" and rep.pruned.params == rep.plan.params_after
    config = json.loads((tmp_path / "repaired" / "config.json").read_text())
    assert config["attention_bias"] and config["mlp_bias"] and "auto_map" not in config
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "repaired").eval()
    assert sum(p.numel() for p in plain.parameters()) == rep.pruned.params
    ours = load(str(tmp_path / "repaired"), device="cpu").model
    ids = torch.randint(0, 49152, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, ours(ids).logits)
