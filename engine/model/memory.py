"""What a search or a prune will hold in memory, from the model's config alone, before anything is loaded.

Estimates, said as such ("about"): the dense weights and a trial's copy are exact; gradients, activations and
statistics are upper bounds from the shapes. A job whose dense weights alone do not fit is refused with the
numbers; one whose estimated peak does not fit is warned about (the estimate can be high), never refused.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

from engine.config import GRAD_METRICS
from engine.errors import AdapruneError

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "fp32": 4, "bfloat16": 2, "bf16": 2, "float16": 2, "fp16": 2}


@dataclass(frozen=True)
class Shape:
    """The sizes a memory plan needs, read from a Hugging Face config."""

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    qkv_bias: bool = False

    @classmethod
    def of(cls, config: dict) -> Shape:
        try:
            d, h = int(config["hidden_size"]), int(config["num_attention_heads"])
            return cls(int(config["num_hidden_layers"]), d, int(config["intermediate_size"]), h,
                       int(config.get("num_key_value_heads") or h), int(config.get("head_dim") or d // h),
                       int(config["vocab_size"]), bool(config.get("tie_word_embeddings", False)),
                       config.get("model_type") == "qwen2" or bool(config.get("attention_bias")))
        except (KeyError, TypeError, ValueError) as e:
            raise AdapruneError(f"the model's config lacks a size the memory plan needs ({e})") from None

    @property
    def proj_params(self) -> int:
        """The weights of the projections pruning scores and slices (q, k, v, o, gate, up, down), all layers."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return self.layers * (2 * self.hidden * q + 2 * self.hidden * kv + 3 * self.hidden * self.intermediate)

    @property
    def params(self) -> int:
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        biases = self.layers * (q + 2 * kv) if self.qkv_bias else 0
        embed = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.proj_params + biases + self.layers * 2 * self.hidden + self.hidden + embed


@dataclass
class MemoryPlan:
    device: str
    dtype: str
    lines: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes) on the device
    host: list[tuple[str, int]] = field(default_factory=list)  # (what, bytes) kept in host memory off an accelerator
    peak: int = 0
    available: int | None = None
    must_fit: int = 0  # what is refused when it does not fit: the dense weights

    def text(self) -> str:
        held = ", ".join(f"{what} {_gib(n)}" for what, n in self.lines)
        room = f" of {_gib(self.available)} free" if self.available is not None else ""
        host = "".join(f"; {what} {_gib(n)} in host memory" for what, n in self.host)
        return f"memory, about: peak {_gib(self.peak)}{room} ({held}; {self.dtype} on {self.device}{host})"

    def problem(self) -> str | None:
        """A refusal when the dense weights alone cannot fit in a CPU's memory; None otherwise (on a GPU the
        loader spreads a model that does not fit with device_map='auto')."""
        if self.device == "cpu" and self.available is not None and self.must_fit > self.available:
            return (f"the dense model needs {_gib(self.must_fit)} in {self.dtype} and {self.device} has "
                    f"{_gib(self.available)} free: use a smaller dtype (--dtype bfloat16), another device, or a "
                    f"smaller model")
        return None

    def warning(self) -> str | None:
        if self.available is not None and self.peak > self.available >= self.must_fit:
            return (f"the estimated peak ({_gib(self.peak)}) is above the {_gib(self.available)} free on "
                    f"{self.device}: it may run out of memory (a trial that does is marked failed with the reason)")
        return None


def _gib(n: int | float | None) -> str:
    if n is None:
        return "?"
    return f"{n / 2**20:.0f} MiB" if n < GIB else f"{n / GIB:.1f} GiB" if n < 100 * GIB else f"{n / GIB:.0f} GiB"


def plan_memory(shape: Shape, device: str, dtype: str, job: str = "search", batch: int = 4, seq_len: int = 128,
                gradients: bool = True, repair: bool = True, obs: bool = True,
                repair_cache: float | None = None) -> MemoryPlan:
    """What `job` ("search" or "prune") holds at its peak. `gradients`: a taylor metric may run (its backward
    and fp32 gradient sums); `repair`: input moments of every layer are kept (a search keeps at most
    `repair_cache` bytes of them); `obs`: a layer's inverse covariance in float64."""
    b = DTYPE_BYTES.get(dtype, 4)
    dense = shape.params * b
    p = MemoryPlan(device, dtype, must_fit=dense)
    p.lines.append(("dense", dense))
    if job == "search":
        # a trial shares the dense weights (engine.prune.slicing.shared_copy): it holds the projections it
        # slices anew, at most every projection's
        p.lines.append(("trial", shape.proj_params * b))
    tokens = batch * seq_len
    # per layer, the tensors a backward keeps (inputs of the norms, q/k/v, attention out, gate/up/act) and the
    # logits with their gradient in fp32
    act = tokens * (shape.layers * (6 * shape.hidden + 4 * shape.intermediate) * b + 2 * shape.vocab * 4)
    # fp32 sums and squared sums, kept in host memory (engine.prune.gradsums): on a CPU that is the device's;
    # each weight's gradient is formed in its hook and added at once (no .grad)
    sums = shape.proj_params * 4 * 2 if gradients else 0
    grad = sums if device == "cpu" else 0
    if sums and device != "cpu":
        p.host.append(("gradient sums", sums))
    stage = {"batch + gradients" if grad else "batch and its backward": act + grad} if gradients else \
        {"batch": tokens * (2 * shape.hidden * b + 3 * shape.vocab * 4)}  # the loss: logits and 2 copies (scale.py)
    if repair:
        one = 4 * (shape.hidden**2 + shape.intermediate**2)
        every = shape.layers * one if repair_cache is None else max(one, min(shape.layers * one, int(repair_cache)))
        p.lines.append(("repair statistics", every))
    elif obs:  # obs scores every layer from its input moments, held in float64 (bench/scale.py measured them)
        p.lines.append(("obs input statistics", shape.layers * 8 * (shape.hidden**2 + shape.intermediate**2)))
    if obs:
        stage["obs inverse"] = 2 * 8 * shape.intermediate**2
    if repair:  # one layer's solve in float64: the MLP input's moments, their kept columns, the system (scale.py)
        stage["repair solve"] = 3 * 8 * shape.intermediate**2
    what, most = max(stage.items(), key=lambda kv: kv[1])
    p.lines.append((what, most))
    p.peak = sum(n for _, n in p.lines)
    return p


def loaded_cuda():
    """torch.cuda when torch is imported already and sees a GPU, else None. Never imports torch (the app's form
    asks as the user types), and a torch still being imported (the app warms it up in a thread) has no `cuda`."""
    try:
        cuda = sys.modules["torch"].cuda
        return cuda if cuda.is_available() else None
    except Exception:
        return None


def free_bytes(device: str) -> int | None:
    """Memory free for the job on `device` now: the GPU's free memory (when torch is loaded already), or the
    machine's available memory on a CPU."""
    if device.startswith("cuda"):
        cuda = loaded_cuda()
        try:
            return int(cuda.mem_get_info(int(device.split(":")[1]) if ":" in device else 0)[0]) if cuda else None
        except Exception:
            return None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        try:
            return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return None


def job_plan(config: dict, device: str, dtype: str, job: str, metrics: set[str], repair: bool,
             batch: int = 4, seq_len: int = 128, repair_cache: float | None = None) -> MemoryPlan:
    """The plan of a search (every metric it may try) or a prune (its one metric), with what is free now.
    `device` is resolved ("cpu", "cuda:0"); `dtype` too ("float32", "bfloat16")."""
    p = plan_memory(Shape.of(config), device, dtype, job, batch, seq_len, gradients=bool(metrics & GRAD_METRICS),
                    repair=repair, obs="obs" in metrics, repair_cache=repair_cache)
    p.available = free_bytes(device)
    return p
