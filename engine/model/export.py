"""Exporting a pruned model as a Hugging Face folder (safetensors + config + tokenizer + model card).

Uniform widths -> a standard config that plain `transformers` loads. Per-layer widths -> the dense widths in
the standard fields, the real ones in `adaprune_layers`, and a modeling file in the folder (`auto_map`), so it
loads with `trust_remote_code=True` and no adaprune installed; `engine.model.load.load` reads it without running
that file.
"""

from __future__ import annotations

import inspect
import json
from importlib import resources
from pathlib import Path

import torch
from torch import nn

from engine.errors import AdapruneError
from engine.events import Log, Sink, Stage, null_sink
from engine.files import atomic_folder
from engine.model.structure import decoder_layers
from engine.prune.slicing import describe_widths, shrink_empty

BASE_CLASSES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
MODELING_FILE = "modeling_adaprune.py"


def check_out_dir(out: Path, force: bool) -> None:
    """Refuse an existing output folder up front, before any work is spent."""
    if out.exists() and not force:
        raise AdapruneError(f"output folder {out} exists: choose another --out or pass --force to replace it")
    if out.exists() and not out.is_dir():
        raise AdapruneError(f"{out} exists and is not a folder: choose another --out")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        # --force replaces an earlier export, never a folder of other things (a typo could name $HOME)
        raise AdapruneError(f"{out} is not a model folder (no config.json): --force replaces only an earlier "
                            f"export or an empty folder; choose another --out")


def _write_card(folder: Path, card: dict) -> None:
    lines = ["---", "library_name: transformers", "tags:", "- pruned", "- adaprune", "---", "",
             f"# {card.get('title', 'Pruned model')}", "",
             "Structurally pruned with [adaprune](https://pypi.org/project/adaprune): whole attention heads and "
             "MLP channels removed; the weights are smaller tensors, not masks.", ""]
    if card.get("load"):
        lines += ["## Loading", "", "```python", card["load"], "```", ""]
    if card.get("recipe"):
        lines += ["## Recipe", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in card["recipe"].items()]
        lines.append("")
    if card.get("results"):
        lines += ["## Results", "", "| measure | dense | pruned |", "|---|---|---|"]
        lines += [f"| {k} | {a} | {b} |" for k, (a, b) in card["results"].items()]
        lines.append("")
    (folder / "README.md").write_text("\n".join(lines), encoding="utf-8")


def export(model: nn.Module, tokenizer, out: Path, force: bool = False, card: dict | None = None,
           sink: Sink = null_sink) -> str:
    """Write the folder atomically (a temp folder renamed into place). Returns 'uniform' or 'per-layer'."""
    check_out_dir(out, force)
    card = dict(card or {})
    describe_widths(model)  # from the modules as they are now (a repair adds biases after slicing)
    cfg = model.config
    per_layer = hasattr(cfg, "adaprune_layers")
    if per_layer and all(w == cfg.adaprune_layers[0] for w in cfg.adaprune_layers):
        sink(Log("the uniform widths are not valid in a standard config (heads must divide the hidden size, and "
                 "only Llama's config holds repaired output biases): exporting per-layer widths with a modeling "
                 "file instead", "warning"))
    base = getattr(cfg, "adaprune_base_model_type", cfg.model_type)
    with Stage(sink, f"export to {out}"), atomic_folder(out, replace=True) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if per_layer:
            config_path = tmp / "config.json"
            data = json.loads(config_path.read_text(encoding="utf-8"))
            cls = BASE_CLASSES[base]
            data["adaprune_base_model_type"] = base
            data["model_type"] = f"adaprune_{base}"
            data["architectures"] = [f"Adaprune{cls}ForCausalLM"]
            stem = MODELING_FILE.removesuffix(".py")
            data["auto_map"] = {"AutoConfig": f"{stem}.Adaprune{cls}Config",
                                "AutoModelForCausalLM": f"{stem}.Adaprune{cls}ForCausalLM"}
            config_path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            template = resources.files("engine").joinpath("templates/modeling_adaprune.py.txt").read_text()
            # the export must load without adaprune: the one shrinking routine is copied in as source
            source = inspect.getsource(shrink_empty)
            (tmp / MODELING_FILE).write_text(template.format(module=base, Base=cls, shrink_source=source),
                                             encoding="utf-8")
            # transformers reads the config before the tokenizer, so the tokenizer too needs the flag (else it asks)
            card["load"] = ("from transformers import AutoModelForCausalLM, AutoTokenizer\n"
                            f"model = AutoModelForCausalLM.from_pretrained('{out.name}', trust_remote_code=True)\n"
                            f"tokenizer = AutoTokenizer.from_pretrained('{out.name}', trust_remote_code=True)")
        else:
            card["load"] = ("from transformers import AutoModelForCausalLM\n"
                            f"model = AutoModelForCausalLM.from_pretrained('{out.name}')")
        _write_card(tmp, card)
    return "per-layer" if per_layer else "uniform"


def load_pruned_folder(folder: Path, dtype: torch.dtype, attn_implementation: str = "sdpa"):
    """Load a per-layer export without executing its modeling file: build the base model, shrink, load."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    widths = data.pop("adaprune_layers")
    base = data.pop("adaprune_base_model_type")
    for key in ("auto_map", "architectures", "model_type", "transformers_version"):
        data.pop(key, None)
    config = AutoConfig.for_model(base, **data)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    layers = decoder_layers(model)
    if len(widths) != len(layers):
        raise AdapruneError(f"{folder}: adaprune_layers lists {len(widths)} layers, the config {len(layers)}")
    for layer, dims in zip(layers, widths, strict=True):
        shrink_empty(layer, dims)
    state: dict[str, torch.Tensor] = {}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise AdapruneError(f"{folder} has no .safetensors weights")
    for f in files:
        state.update(load_file(f))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise AdapruneError(f"{folder}: weights do not match the config (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.config.adaprune_layers = widths
    model.config.adaprune_base_model_type = base
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
