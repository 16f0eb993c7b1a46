"""Prune the embedded model at 20% with LLM-Pruner's recipe and baselines; print and record one table.

    .venv/bin/python bench/prune_recipes.py [--windows 40] [--out bench/RESULTS.md]

Columns: parameters, PPL on held-out stdlib-docs (and WikiText-2 test from ../shared/data when present),
prune wall time (calibration + scoring + slicing), prefill/decode speed, peak memory (see engine/measure/memprobe.py).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

from engine.config import EMBEDDED, PruneConfig
from engine.control import Control
from engine.measure.evaluate import peak_memory, perplexity
from engine.model.export import export
from engine.model.load import Loaded, load
from engine.oneshot import evaluation_sets, measure, plan_and_prune

ROOT = Path(__file__).resolve().parent.parent
WIKITEXT = Path(os.environ.get("ADAPRUNE_WIKITEXT", ROOT.parent / "shared" / "data" / "wikitext2-test.txt"))

# LLM-Pruner's recipe and its baselines use its split (same ratio of heads and channels); then our defaults.
LLM_PRUNER = {"attn_share": "same"}
RECIPES = [
    ("LLM-Pruner default (taylor1, 10x64, sum)", LLM_PRUNER),
    ("magnitude l2", {**LLM_PRUNER, "metric": "l2"}),
    ("magnitude l1", {**LLM_PRUNER, "metric": "l1"}),
    ("random", {**LLM_PRUNER, "metric": "random"}),
    ("taylor1, whole KV groups (--heads kv --attn-share same)", {**LLM_PRUNER, "head_mode": "kv"}),
    ("adaprune default: taylor1, --attn-share auto", {}),
    ("magnitude l2, --attn-share auto", {"metric": "l2"}),
    ("random, --attn-share auto", {"metric": "random"}),
]


def heldout(windows: int) -> tuple[PruneConfig, Loaded, Callable[[torch.nn.Module], dict[str, float]]]:
    """The embedded model at 20% as `adaprune prune` configures it, its dense model (frozen), and a model's PPL
    on the held-out texts (stdlib-docs test, and WikiText-2 test when present) over `windows` windows of 128
    tokens, keyed "stdlib-docs test" / "WikiText-2 test"."""
    evals = ["stdlib-docs"] + ([str(WIKITEXT)] if WIKITEXT.exists() else [])
    base = PruneConfig(model=EMBEDDED, prune=0.20, evals=evals, eval_windows=windows)
    dense = load(base.model, "cpu", "float32")
    dense.model.requires_grad_(False)
    sets, _ = evaluation_sets(dense.tokenizer, base)
    names = {k: ("stdlib-docs test" if k.startswith("stdlib") else "WikiText-2 test") for k in sets}

    def ppl(model) -> dict[str, float]:
        return {names[k]: perplexity(model, w, control=Control()) for k, w in sets.items()}

    return base, dense, ppl


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40, help="PPL windows of 128 tokens per text")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()

    evals = ["stdlib-docs"] + ([str(WIKITEXT)] if WIKITEXT.exists() else [])
    base = PruneConfig(model=EMBEDDED, prune=0.20, evals=evals, eval_windows=args.windows, device=args.device)
    dense_loaded = load(base.model, base.device, base.dtype)
    dt = str(dense_loaded.dtype).removeprefix("torch.")
    dev = str(dense_loaded.device)
    sets, _ = evaluation_sets(dense_loaded.tokenizer, base)
    control = Control()
    rows = []
    dense = measure(dense_loaded, sets, base, "dense", print_sink, control)
    dense.peak_mib = peak_memory(dense_loaded.folder, dev, dt)
    rows.append(("dense", dense, None))
    for name, overrides in RECIPES:
        cfg = dataclasses.replace(base, **overrides)
        loaded = Loaded(copy.deepcopy(dense_loaded.model), dense_loaded.tokenizer, base.model, None,
                        dense_loaded.device, dense_loaded.dtype)
        t0 = time.perf_counter()
        plan_and_prune(loaded, cfg, print_sink, control)
        seconds = time.perf_counter() - t0
        report = measure(loaded, sets, cfg, name, print_sink, control)
        with tempfile.TemporaryDirectory() as tmp:
            export(loaded.model, loaded.tokenizer, Path(tmp) / "m")
            report.peak_mib = peak_memory(Path(tmp) / "m", dev, dt)
        rows.append((name, report, seconds))
        del loaded

    names = list(sets)
    short = {n: ("WikiText-2 test" if n == str(WIKITEXT) else "stdlib-docs test") for n in names}
    header = ["model", "params", *[f"PPL {short[n]}" for n in names], "prune s", "prefill tok/s (4x128)",
              "decode tok/s", "peak MiB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    def ratio(a: float, b: float) -> str:
        return f" ({a / b:.2f}x)" if a != b else ""

    for name, r, secs in rows:
        cells = [name, f"{r.params:,}", *[f"{r.ppl[n]:.2f}" for n in names], f"{secs:.1f}" if secs else "",
                 f"{r.speed.prefill_tok_s:.0f}{ratio(r.speed.prefill_tok_s, dense.speed.prefill_tok_s)}",
                 f"{r.speed.decode_tok_s:.1f}{ratio(r.speed.decode_tok_s, dense.speed.decode_tok_s)}",
                 f"{r.peak_mib:.0f}{ratio(r.peak_mib, dense.peak_mib)}"]
        lines.append("| " + " | ".join(cells) + " |")
    table = "\n".join(lines)
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
               f"{transformers.__version__}, device {dev}, {dt}")
    body = (f"## prune_recipes.py — {datetime.date.today()}\n\nMachine: {machine}.\n"
            f"Target: 20% of all parameters; layers 4..27 of 30 (LLM-Pruner's range scaled); PPL over "
            f"{args.windows} evenly spaced 128-token windows per text; speed is the median of 3 runs after a warm-up; "
            f"peak memory: weights plus what generating 32 tokens from a 128-token prompt adds (engine/measure/memprobe.py)."
            f"\n\n{table}\n")
    print(body)
    _record(args.out, "prune_recipes.py", body)


def _record(path: Path, key: str, body: str) -> None:
    """Replace this script's section of RESULTS.md, keeping other scripts' sections."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmark results\n\n"
    marker = f"## {key}"
    if marker in text:
        start = text.index(marker)
        nxt = text.find("\n## ", start + 1)
        text = text[:start] + body + (text[nxt + 1 :] if nxt != -1 else "")
    else:
        text = text.rstrip() + "\n\n" + body
    path.write_text(text, encoding="utf-8")


def print_sink(event) -> None:
    kind = event.kind
    if kind == "log" or kind == "metric":
        print(getattr(event, "message", None) or f"{event.model} {event.name} = {event.value:.3f}", flush=True)


if __name__ == "__main__":
    main()
