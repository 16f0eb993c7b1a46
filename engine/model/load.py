"""Loading models: the embedded default, a local HF folder, a local .gguf file, or a hub id."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from engine.config import EMBEDDED
from engine.errors import AdapruneError
from engine.events import Log, Sink, Stage, null_sink
from engine.files import atomic_folder
from engine.hub import hub_reachable
from engine.model.export import load_pruned_folder
from engine.model.memory import MemoryPlan, job_plan
from engine.model.spec import check_model, check_type, config_dict, converted_folder, embedded_gguf
from engine.model.structure import check_supported


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: object
    name: str  # what the user asked for
    folder: Path | None  # a local HF folder with exactly these weights (None for a hub model not cached)
    device: torch.device
    dtype: torch.dtype


def quiet_transformers() -> None:
    """transformers' own progress bars and warnings would tear through a Rich or Textual display."""
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise AdapruneError(f"unknown device {device!r}: use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise AdapruneError("--device cuda asked for, but torch sees no CUDA GPU: use --device cpu")
    return dev


def pick_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise AdapruneError(f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16")
    return table[dtype]


# --- resolving the spec to a local folder ------------------------------------------------------------------


def convert_gguf(path: Path, sink: Sink = null_sink) -> Path:
    """Dequantise a .gguf once into a cached safetensors folder: 40 s the first time, seconds after."""
    dest = converted_folder(path)
    if (dest / "config.json").is_file():
        return dest
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    with Stage(sink, "convert GGUF (once)"):
        # the GGUF reader draws its own tqdm bar on stderr, which would tear through a Rich display
        try:
            with contextlib.redirect_stderr(io.StringIO()):
                tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
                gguf_model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)
        except Exception as e:  # gguf raises ValueError/KeyError/... for files it cannot map
            raise AdapruneError(f"cannot read {path} as a GGUF model ({type(e).__name__}: {e})"[:300]) from None
        config = gguf_model.config
        # the GGUF quantization config makes save_pretrained refuse; the weights are dequantised already
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = type(gguf_model)(config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.config.architectures = [type(plain).__name__]
        with atomic_folder(dest) as tmp:
            plain.save_pretrained(tmp)
            tok.save_pretrained(tmp)
    return dest


def resolve(spec: str, sink: Sink = null_sink) -> Path | str:
    """A local folder for the spec, or the hub id itself when it must be downloaded."""
    kind = check_model(spec)
    if kind == "embedded":
        return convert_gguf(embedded_gguf(), sink)
    if kind == "gguf":
        return convert_gguf(Path(spec).expanduser(), sink)
    if kind == "folder":
        return Path(spec).expanduser()
    # a hub id: the local HF cache first, then the network, failing fast when it is unreachable
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snap = Path(snapshot_download(spec, local_files_only=True))
        if (snap / "config.json").is_file() and _weights_bytes(snap) > 0:
            return snap
    except HFValidationError:
        raise AdapruneError(f"{spec!r} is not a model folder, a .gguf file or a valid hub id") from None
    except Exception:
        pass  # not cached (or only partly): download below
    if not hub_reachable():
        raise AdapruneError(
            f"model {spec!r} is not cached and the Hugging Face hub is unreachable: "
            f"pass a local folder or .gguf file, or {EMBEDDED!r}"
        )
    return spec


def _weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors")) + sum(p.stat().st_size for p in folder.glob("*.bin"))


def num_layers(spec: str, trust_remote_code: bool = False, sink: Sink = null_sink) -> int:
    """The model's depth from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    where = resolve(spec, sink)
    if isinstance(where, Path):
        data = config_dict(where)
        check_type(data, spec)
        if "num_hidden_layers" in data:
            return int(data["num_hidden_layers"])
    try:
        config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise AdapruneError(f"cannot read the config of {spec!r} ({type(e).__name__}): {str(e)[:200]}") from None
    check_type(config.to_dict(), spec)
    return int(config.num_hidden_layers)


class ModelSettings(Protocol):
    """What a job's configuration says about its model (PruneConfig and SearchConfig both do)."""

    model: str
    device: str
    dtype: str
    trust_remote_code: bool


def announce_memory(cfg: ModelSettings, job: str, metrics: set[str], repair: bool, sink: Sink = null_sink,
                    batch: int = 4, seq_len: int = 128, repair_cache: float | None = None) -> MemoryPlan | None:
    """Say what `job` will hold in memory before the weights load (the plan in the log), warn when its peak may
    not fit, and refuse when the dense weights alone cannot. None when the config cannot be read without a
    download (a hub model not cached)."""
    dev = pick_device(cfg.device)
    dt = str(pick_dtype(cfg.dtype, dev)).removeprefix("torch.")
    where = resolve(cfg.model, sink)
    if not isinstance(where, Path):
        return None
    plan = job_plan(config_dict(where), str(dev) if dev.type == "cpu" else f"cuda:{dev.index or 0}", dt, job,
                    metrics, repair, batch, seq_len, repair_cache)
    if problem := plan.problem():
        raise AdapruneError(problem)
    sink(Log(plan.text()))
    if warning := plan.warning():
        sink(Log(warning, "warning"))
    return plan


def load_configured(cfg: ModelSettings, sink: Sink = null_sink, frozen: bool = False) -> Loaded:
    """The model a job's configuration names, on its device and dtype; `frozen`: no gradients (inference)."""
    loaded = load(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, sink=sink)
    if frozen:
        loaded.model.requires_grad_(False)
    return loaded


def load(
    spec: str,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    attn_implementation: str = "sdpa",
    sink: Sink = null_sink,
) -> Loaded:
    """Load a supported causal LM and its tokenizer, ready to prune."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    quiet_transformers()
    dev = pick_device(device)
    dt = pick_dtype(dtype, dev)
    where = resolve(spec, sink)
    folder = where if isinstance(where, Path) else None
    if folder is not None:
        data = config_dict(folder)
        check_type(data, spec)
        if "adaprune_layers" in data:
            model, tok = load_pruned_folder(folder, dt, attn_implementation)
            model.to(dev)
            check_supported(model)
            return Loaded(model, tok, spec, folder, dev, dt)
    kwargs: dict = {"dtype": dt, "trust_remote_code": trust_remote_code, "attn_implementation": attn_implementation}
    with Stage(sink, f"load {spec}"):
        try:
            config = AutoConfig.from_pretrained(where, trust_remote_code=trust_remote_code)
        except Exception as e:
            raise AdapruneError(f"cannot read the config of {spec!r} ({type(e).__name__}): {str(e)[:200]}") from None
        check_type(config.to_dict(), spec)
        big = dev.type == "cuda" and folder is not None and _weights_bytes(folder) > 0.8 * torch.cuda.mem_get_info(dev)[0]
        if big:
            kwargs["device_map"] = "auto"
            sink(Log(f"{spec} does not fit on one GPU: spreading it with device_map='auto'"))
        try:
            tok = AutoTokenizer.from_pretrained(where, trust_remote_code=trust_remote_code)
            model = AutoModelForCausalLM.from_pretrained(where, **kwargs)
        except AdapruneError:
            raise
        except Exception as e:
            raise AdapruneError(f"cannot load model {spec!r} ({type(e).__name__}): {str(e)[:200]}") from None
        if not big:
            model.to(dev)
    model.eval()
    check_supported(model)
    if folder is None:
        # downloaded from the hub just now: its snapshot is in the HF cache
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(spec, local_files_only=True))
        except Exception:
            folder = None
    return Loaded(model, tok, spec, folder, dev, dt)
