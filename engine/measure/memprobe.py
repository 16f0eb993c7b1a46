"""Run as `python -m engine.measure.memprobe FOLDER DEVICE DTYPE PROMPT_LEN NEW_TOKENS`: prints the peak memory.

A fresh process, so nothing else the engine holds is counted. The number is the memory the model needs to
generate (batch 1): on CUDA the peak of allocated tensors; on the CPU the bytes of its weights and buffers plus
the peak resident memory that generation adds (after a warm-up, so code pages and thread pools don't count).
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from pathlib import Path

MARKER = "adaprune-memprobe: "


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def main() -> None:
    folder, device, dtype, prompt_len, new_tokens = sys.argv[1:6]
    import torch

    from engine.model.load import load

    loaded = load(folder, device=device, dtype=dtype)
    model = loaded.model
    dev = torch.device(device)
    with torch.no_grad():  # page in every weight: a lazily mapped file must count like copied tensors
        for p in model.parameters():
            p.float().sum().item()
    prompt = torch.randint(0, model.config.vocab_size, (1, int(prompt_len)), generator=torch.Generator().manual_seed(0))
    kw = {"max_new_tokens": int(new_tokens), "min_new_tokens": int(new_tokens), "do_sample": False,
          "pad_token_id": 0, "eos_token_id": None}
    with torch.inference_mode():  # warm-up: kernels and their code pages are loaded once, not per model
        model.generate(prompt.to(dev), **{**kw, "max_new_tokens": 2, "min_new_tokens": 2})
    gc.collect()
    weights = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())) / 2**20
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = None
    else:
        base = _status_kib("VmRSS")
        # reset the peak RSS so it covers generation only, not the transient copies made while loading
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    with torch.inference_mode():
        model.generate(prompt.to(dev), **kw)
    if dev.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        hwm = _status_kib("VmHWM")
        if hwm is None or base is None:
            raise SystemExit("cannot read /proc/self/status: no memory measurement on this platform")
        peak_mib = weights + max(0, hwm - base) / 1024
    print(MARKER + json.dumps({"peak_mib": round(peak_mib, 1)}))


if __name__ == "__main__":
    main()
