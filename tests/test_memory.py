"""The memory plan: sizes from the config alone, exact where they can be, and a refusal only when the dense
weights cannot fit."""

import json

import pytest
from conftest import make_model

from engine.model import memory
from engine.model.memory import Shape, job_plan, plan_memory
from engine.model.structure import count_params


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_the_parameter_count_from_the_config_is_the_models(kind):
    model = make_model(kind)
    shape = Shape.of(model.config.to_dict())
    assert shape.params == count_params(model)  # GQA, tied or not, qwen2's q/k/v biases
    assert shape.proj_params < shape.params


def test_llama_3_8b_shape_and_a_search_plan():
    big = Shape.of({"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                    "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                    "tie_word_embeddings": False, "model_type": "llama"})
    assert big.params == 8_030_261_248
    plan = plan_memory(big, "cuda:0", "bfloat16", "search", repair_cache=2 * 2**30)
    held = dict(plan.lines)
    assert held["dense"] == 2 * big.params
    assert held["trial"] == 2 * big.proj_params  # it shares the rest with the dense weights
    assert held["repair statistics"] == 2 * 2**30  # the search's cache budget caps it
    assert plan.peak == sum(held.values()) and "memory, about: peak 34.6 GiB (dense 15.0 GiB" in plan.text()
    # the fp32 gradient sums (26 GB, 52 with squares) are summed in host memory, not on the GPU, and the plan
    # says so; on a CPU they are the device's memory
    assert "gradients" not in dict(plan.lines) and dict(plan.host)["gradient sums"] == 8 * big.proj_params
    assert plan.text().endswith("bfloat16 on cuda:0; gradient sums 52.0 GiB in host memory)")
    cpu = dict(plan_memory(big, "cpu", "bfloat16", "search", repair_cache=2 * 2**30).lines)
    assert cpu["batch + gradients"] > 8 * big.proj_params
    prune = plan_memory(big, "cuda:0", "bfloat16", "prune", gradients=False, repair=False, obs=False)
    assert "trial" not in dict(prune.lines) and prune.peak < plan.peak
    obs = dict(plan_memory(big, "cuda:0", "bfloat16", "prune", gradients=False, repair=False, obs=True).lines)
    assert obs["obs input statistics"] == 32 * 8 * (4096**2 + 14336**2)  # every layer's moments, float64


def test_refused_only_when_the_dense_weights_cannot_fit_a_cpu(monkeypatch, tmp_path):
    config = make_model("llama").config.to_dict()
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    plan = job_plan(config, "cpu", "float32", "search", {"taylor1"}, True)
    assert "the dense model needs" in plan.problem() and "--dtype bfloat16" in plan.problem()
    assert job_plan(config, "cuda:0", "bfloat16", "search", {"taylor1"}, True).problem() is None  # device_map
    dense = dict(plan.lines)["dense"]
    monkeypatch.setattr(memory, "free_bytes", lambda device: dense + 1)
    plan = job_plan(config, "cpu", "float32", "search", {"taylor1"}, True)
    assert plan.problem() is None and "may run out of memory" in plan.warning()


def test_prune_says_its_plan_and_refuses_a_model_too_big_before_loading(monkeypatch, tmp_path, tokenizer):
    from typer.testing import CliRunner

    from tui.cli import app

    llama_folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(llama_folder)
    tokenizer.save_pretrained(llama_folder)

    r = CliRunner().invoke(app, ["prune", "--model", str(llama_folder), "--calib", "stdlib-docs:2x32",
                                 "--device", "cpu", "--no-speed"])
    assert r.exit_code == 0, r.output
    assert "memory, about: peak" in r.output and "float32 on cpu" in r.output
    monkeypatch.setattr(memory, "free_bytes", lambda device: 1000)
    loads = []
    import engine.model.load as load_module

    monkeypatch.setattr(load_module, "load", lambda *a, **k: loads.append(a) or pytest.fail("loaded"))
    r = CliRunner().invoke(app, ["prune", "--model", str(llama_folder), "--device", "cpu"])
    assert r.exit_code == 2 and "the dense model needs" in r.output and "Traceback" not in r.output
    assert len(r.output.strip().splitlines()) == 1 and not loads
    assert json.loads((llama_folder / "config.json").read_text())  # nothing written to the model


def test_the_forms_estimate_reads_only_a_config_at_hand(tmp_path):
    from engine import api

    folder = tmp_path / "m"
    make_model("qwen2").save_pretrained(folder)
    line = api.memory_estimate(str(folder), "auto", ["wanda"], repair=False)
    assert line.startswith("memory, about: peak") and "float32 on cpu" in line and "gradients" not in line
    assert api.memory_estimate("org/not-cached", "auto", ["taylor1"]) is None  # no download for an estimate


def test_the_estimate_survives_a_torch_still_being_imported(tmp_path, monkeypatch):
    """The app imports torch in a thread while the form checks: a partly imported module has no `cuda` yet."""
    import sys
    import types

    from engine import api

    folder = tmp_path / "m"
    make_model("llama").save_pretrained(folder)
    monkeypatch.setitem(sys.modules, "torch", types.ModuleType("torch"))  # as it is mid-import
    line = api.memory_estimate(str(folder), "auto", ["taylor1"])
    assert "float32 on cpu" in line
    assert memory.free_bytes("cuda:0") is None
