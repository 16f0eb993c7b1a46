"""The real embedded model end to end: load (GGUF -> cached safetensors), prune 20%, evaluate, export, reload."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine.api import PruneConfig, prune
from engine.models import load

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
