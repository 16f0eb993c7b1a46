"""Model loading: local folders, the hub cache (standing in for the hub), devices and dtypes."""

import os
import shutil
from pathlib import Path

import pytest
import torch

from engine.errors import AdapruneError
from engine.model.load import load, pick_device, pick_dtype


def test_hub_id_loads_from_the_hub_cache_offline(tiny_folder, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny" / "snapshots" / ("a" * 40)
    shutil.copytree(tiny_folder, snap)
    (cache / "models--someone--tiny" / "refs").mkdir()
    (cache / "models--someone--tiny" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    loaded = load("someone/tiny", device="cpu")
    assert loaded.folder == snap and loaded.model.config.num_hidden_layers == 4
    assert loaded.dtype == torch.float32


def test_local_folder_and_attention_implementation(tiny_folder):
    loaded = load(str(tiny_folder), device="cpu", attn_implementation="eager")
    assert loaded.model.config._attn_implementation == "eager"
    assert not loaded.model.training


def test_devices_and_dtypes():
    assert pick_device("cpu").type == "cpu"
    assert pick_dtype("auto", torch.device("cpu")) == torch.float32
    assert pick_dtype("auto", torch.device("cuda")) == torch.bfloat16
    assert pick_dtype("bf16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(AdapruneError, match="unknown dtype"):
        pick_dtype("int3", torch.device("cpu"))
    with pytest.raises(AdapruneError, match="unknown device"):
        pick_device("tpu:x")
    if not torch.cuda.is_available():
        with pytest.raises(AdapruneError, match="no CUDA GPU"):
            pick_device("cuda")


def test_a_gguf_that_is_not_a_model(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all" * 100)
    with pytest.raises(AdapruneError, match="not a GGUF file"):  # refused by its header, before any loading
        load(str(bad), device="cpu")
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"truncated" * 100)
    with pytest.raises(AdapruneError, match="cannot read .* as a GGUF model"):
        load(str(bad), device="cpu")
    models = Path(os.environ["ADAPRUNE_CACHE"]) / "models"
    left = [p.name for p in models.iterdir()] if models.exists() else []
    assert not [n for n in left if n.startswith((".", "x-"))]  # nothing half-converted in the cache


def test_a_folders_own_code_runs_only_when_the_user_asks(tmp_path, tokenizer, monkeypatch):
    """A model folder whose config maps to Python code in it: loading never imports that code unless
    trust_remote_code is asked for (the positive control shows the mapping is real)."""
    import json

    from conftest import make_model

    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    folder, marker = tmp_path / "remote", tmp_path / "code-ran"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "evil.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig, LlamaForCausalLM\n\n\n"
        "class EvilConfig(LlamaConfig):\n    pass\n\n\n"
        "class EvilForCausalLM(LlamaForCausalLM):\n    config_class = EvilConfig\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    loaded = load(str(folder), device="cpu")
    assert not marker.exists() and type(loaded.model).__name__ == "LlamaForCausalLM"
    assert type(load(str(folder), device="cpu", trust_remote_code=True).model).__name__ == "EvilForCausalLM"
    assert marker.exists()


def test_no_pickle_anywhere_in_the_code():
    """Sessions and exports are JSON, SQLite and safetensors: nothing in the code can unpickle."""
    root = Path(__file__).resolve().parent.parent
    for path in [*root.glob("engine/**/*.py"), *root.glob("tui/**/*.py"), *root.glob("bench/*.py")]:
        text = path.read_text(encoding="utf-8")
        for bad in ("import pickle", "torch.load(", "pickle.load", "weights_only=False"):
            assert bad not in text, f"{path.relative_to(root)} uses {bad}"


def test_known_depth_reads_only_what_is_at_hand(tmp_path, monkeypatch):
    """A form checks a layer range as the user types: a folder's config or a converted .gguf's, nothing loaded."""
    from engine.model.spec import converted_folder, known_depth

    monkeypatch.setenv("ADAPRUNE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 4}')
    assert known_depth(str(folder)) == 4
    assert known_depth("org/some-model") is None  # a hub id: not read (no network, no download)
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    assert known_depth(str(gguf)) is None  # not converted yet: unknown, not a 40 s conversion
    converted_folder(gguf).mkdir(parents=True)
    (converted_folder(gguf) / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 7}')
    assert known_depth(str(gguf)) == 7
