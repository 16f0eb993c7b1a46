"""Measuring a model: perplexity, prefill/decode speed, peak memory."""

from __future__ import annotations

import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Sink, Stage, null_sink
from engine.measure.memprobe import MARKER
from engine.measure.nll import next_token_nll


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def perplexity(
    model: nn.Module,
    windows: torch.Tensor,
    batch_size: int = 4,
    control: Control | None = None,
    sink: Sink = null_sink,
    stage: str = "perplexity",
) -> float:
    """exp of the mean next-token NLL over all windows (each window scored on its own, LLM-Pruner style)."""
    control = control or Control()
    device = _device(model)
    nll, count = 0.0, 0
    n_batches = (windows.shape[0] + batch_size - 1) // batch_size
    with Stage(sink, stage, n_batches, "batches") as st:
        for b in range(n_batches):
            control.checkpoint()
            batch = windows[b * batch_size : (b + 1) * batch_size].to(device)
            tokens = next_token_nll(model(input_ids=batch).logits, batch)
            nll += tokens.sum().item()
            count += tokens.numel()
            st.advance(b + 1)
    return math.exp(nll / count) if nll / count < 700 else float("inf")


@dataclass
class Speed:
    prefill_tok_s: float  # batch x prompt tokens per second of one forward pass
    decode_tok_s: float  # new tokens per second after the prompt, batch 1
    ttft_s: float  # time to first token: one prompt forward at batch 1
    batch: int
    prompt_len: int
    new_tokens: int
    repeats: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.inference_mode()
def speed(
    model: nn.Module,
    vocab_size: int,
    batch: int = 4,
    prompt_len: int = 128,
    new_tokens: int = 32,
    repeats: int = 3,
    sink: Sink = null_sink,
    stage: str = "speed",
) -> Speed:
    """Median of `repeats` timings after one warm-up, on random token ids (speed does not depend on content)."""
    device = _device(model)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab_size, (batch, prompt_len), generator=g).to(device)
    one = prompt[:1]

    def timed(fn) -> float:
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - t0

    gen = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
           "pad_token_id": 0, "eos_token_id": None}
    with Stage(sink, stage, 3 * (repeats + 1), "runs") as st:
        done = 0
        prefill, first, full = [], [], []
        for r in range(repeats + 1):  # run 0 is the warm-up
            tp = timed(lambda: model(input_ids=prompt, logits_to_keep=1))
            tf = timed(lambda: model(input_ids=one, logits_to_keep=1))
            tg = timed(lambda: model.generate(one, **gen))
            if r:
                prefill.append(tp)
                first.append(tf)
                full.append(tg)
            done += 3
            st.advance(done)
    t_prefill, t_first, t_full = (statistics.median(x) for x in (prefill, first, full))
    decode = new_tokens / max(t_full - t_first, 1e-9)
    return Speed(batch * prompt_len / t_prefill, decode, t_first, batch, prompt_len, new_tokens, repeats)


def peak_memory(folder: Path, device: str = "cpu", dtype: str = "float32", prompt_len: int = 128,
                new_tokens: int = 32, sink: Sink = null_sink, stage: str = "peak memory") -> float:
    """Peak memory (MiB) the model in `folder` needs to generate, measured in a fresh process (see memprobe)."""
    with Stage(sink, stage):
        cmd = [sys.executable, "-m", "engine.measure.memprobe", str(folder), device, dtype, str(prompt_len),
               str(new_tokens)]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                            os.environ.get("PYTHONPATH", "")])}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)

    lines = [ln.split(MARKER, 1)[1] for ln in proc.stdout.splitlines() if MARKER in ln]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise AdapruneError(f"the memory probe of {folder} failed: {tail}")
    return float(json.loads(lines[-1])["peak_mib"])
