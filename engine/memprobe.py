"""Run as `python -m engine.memprobe FOLDER DEVICE DTYPE PROMPT_LEN NEW_TOKENS`: prints {"peak_mib": ...}.

A fresh process, so nothing else the engine holds is counted.
"""

from __future__ import annotations

import contextlib
import gc
import json
import sys
from pathlib import Path


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

    from engine.models import load

    loaded = load(folder, device=device, dtype=dtype)
    model = loaded.model
    gc.collect()
    dev = torch.device(device)
    prompt = torch.randint(0, model.config.vocab_size, (1, int(prompt_len)), generator=torch.Generator().manual_seed(0))
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
        base = 0
    else:
        base = _status_kib("VmRSS")
        # reset the peak RSS so it measures use, not the transient copies made while loading
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")
    with torch.inference_mode():
        model.generate(prompt.to(dev), max_new_tokens=int(new_tokens), min_new_tokens=int(new_tokens),
                       do_sample=False, pad_token_id=0, eos_token_id=None)
    if dev.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated(dev) / 2**20
    else:
        # weights are part of use: count the model's own bytes plus what generation added above the baseline
        weights = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
        hwm = _status_kib("VmHWM")
        extra = max(0, (hwm - base)) / 1024 if hwm is not None and base is not None else 0.0
        peak_mib = weights + extra
    print(json.dumps({"peak_mib": round(peak_mib, 1)}))


if __name__ == "__main__":
    main()
