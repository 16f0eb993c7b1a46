"""Layer-wise reconstruction on `adaprune prune`'s default plan: which calibration text, which lambda, which
statistics, and how the one-shot recipe spreads over calibration seeds. Prints and records one table.

    .venv/bin/python bench/reconstruct.py [--windows 40] [--seeds 5] [--out bench/RESULTS.md]

Every row is the embedded model at 20% of all parameters with `adaprune prune`'s defaults (taylor1 on
stdlib-docs:10x64, MLP channels first, layers 4..27); PPL on held-out text neither the pruning nor the repair
reads (stdlib-docs test, and WikiText-2 test from ../shared/data when present), 128-token windows.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import transformers

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from prune_recipes import cpu_name, heldout

from engine.config import default_layer_range
from engine.control import Control
from engine.data.text import parse_spec
from engine.model.structure import count_params, layer_shapes
from engine.oneshot import calibration_windows
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import (
    Repair,
    dense_moments,
    pruned_layer_ids,
    repair_model,
    repair_windows,
    snapshot_layers,
)

QUIET = lambda e: None  # noqa: E731


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40, help="PPL windows of 128 tokens per held-out text")
    ap.add_argument("--seeds", type=int, default=5, help="calibration seeds for the one-shot spread")
    ap.add_argument("--repair-windows", type=int, default=128)
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    torch.manual_seed(0)
    base, dense, ppl = heldout(args.windows)
    control = Control()

    n_layers = len(layer_shapes(dense.model))
    layer_ids = list(range(*default_layer_range(n_layers)))
    rows: list[tuple[str, int, dict[str, float], float | None]] = [("dense", count_params(dense.model),
                                                                   ppl(dense.model), None)]
    print(rows[-1], flush=True)
    n = args.repair_windows
    t0 = time.perf_counter()
    texts = {src: repair_windows(dense, Repair(f"{src}:{n}x128", seed=0)) for src in ("self", "stdlib-docs")}
    sample_s = time.perf_counter() - t0
    calib0, _ = calibration_windows(dense, base.calib, 0, QUIET, control)

    def one(label: str, seed: int, repair: Repair | None, moments=None) -> None:
        model = copy.deepcopy(dense.model)
        calib = calib0 if seed == 0 else calibration_windows(dense, base.calib, seed, QUIET, control)[0]
        dense_layers = snapshot_layers(model, layer_ids) if repair else {}
        plan = prune_with(model, Recipe(base.prune, seed=seed, repair=repair), layer_ids, calib)
        secs = None
        if repair:
            spec = parse_spec(repair.calib)  # the first N windows of the one draw per text
            t = time.perf_counter()
            cut = pruned_layer_ids(layer_shapes(dense.model), plan.layers)
            repair_model(model, {i: dense_layers[i] for i in cut}, plan.layers, repair, texts[spec.name][: spec.n],
                         moments, control)
            secs = time.perf_counter() - t
        assert count_params(model) == plan.params_after
        rows.append((label, plan.params_after, ppl(model), secs))
        print(rows[-1], flush=True)

    seeds = list(range(args.seeds))
    for s in seeds:
        one(f"oneshot, calibration seed {s}", s, None)
    for s in seeds:
        one(f"oneshot + repair (self {n}x128, lambda 1), seed {s}", s, Repair(f"self:{n}x128", 1.0))
    for lam in (0.1, 0.3, 3.0):
        one(f"oneshot + repair (self {n}x128, lambda {lam:g})", 0, Repair(f"self:{n}x128", lam))
    one(f"oneshot + repair (stdlib-docs {n}x128, lambda 1)", 0, Repair(f"stdlib-docs:{n}x128", 1.0))
    one(f"oneshot + repair (self {n // 2}x128, lambda 1)", 0, Repair(f"self:{n // 2}x128", 1.0))
    t = time.perf_counter()
    moments = dense_moments(dense.model, layer_ids, texts["self"][:n])
    moments_s = time.perf_counter() - t
    one(f"oneshot + repair from dense statistics (self {n}x128, lambda 1)", 0,
        Repair(f"self:{n}x128", 1.0, mode="dense"), moments)

    cols = list(rows[0][2])
    lines = [f"## reconstruct.py — {datetime.date.today()}", "",
             f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, cpu, float32. Embedded model at 20% of all parameters with `adaprune "
             f"prune`'s defaults (taylor1, stdlib-docs:10x64, MLP channels first, layers {layer_ids[0]}..{layer_ids[-1]}); "
             f"a repair counts its output biases in the parameters. PPL: {args.windows} windows of 128 tokens of "
             f"held-out text. Sampling {n} self windows took {sample_s:.0f} s; dense input statistics for the "
             f"range {moments_s:.0f} s ({n}x128 tokens); whole script {(time.perf_counter() - t_start) / 60:.1f} min.",
             ""]
    spread = {}
    for kind, prefix in (("oneshot", "oneshot, calibration seed"), ("repaired", "oneshot + repair (self")):
        vals = [r[2] for r in rows if r[0].startswith(prefix) and "seed" in r[0]]
        if len(vals) > 1:
            spread[kind] = {c: (min(v[c] for v in vals), statistics.median(v[c] for v in vals),
                                max(v[c] for v in vals)) for c in cols}
    for kind, s in spread.items():
        lines.append(f"- {kind} over {len(seeds)} calibration seeds: " + "; ".join(
            f"{c} {lo:.2f} / {med:.2f} / {hi:.2f} (min / median / max, spread ±{(hi - lo) / 2 / med:.0%})"
            for c, (lo, med, hi) in s.items()))
    if "oneshot" in spread and "repaired" in spread:
        lines.append("- repair vs no repair, medians over seeds: " + "; ".join(
            f"{c} {1 - spread['repaired'][c][1] / spread['oneshot'][c][1]:+.0%} lower PPL" for c in cols))
    lines += ["", "| model | params | " + " | ".join(f"PPL {c}" for c in cols) + " | repair s |",
              "|---|---|" + "---|" * len(cols) + "---|"]
    for label, params, p, secs in rows:
        lines.append(f"| {label} | {params:,} | " + " | ".join(f"{p[c]:.2f}" for c in cols) +
                     f" | {'' if secs is None else f'{secs:.0f}'} |")
    geo = {label: math.exp(sum(math.log(v) for v in p.values()) / len(p)) for label, _, p, _ in rows[1:]}
    lines.append("")
    lines.append(f"Lowest geometric mean PPL over the held-out texts: {min(geo, key=geo.get)}.")
    text = "\n".join(lines) + "\n"
    print(text)
    with args.out.open("a", encoding="utf-8") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
