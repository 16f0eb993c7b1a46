"""Does more calibration text carry the strongest fixed recipe further on unseen text? Prints and records one
section of RESULTS.md.

    .venv/bin/python bench/calib_size.py [--sizes 64,128,256] [--windows 40] [--out bench/RESULTS.md]

Every row is the embedded model at 20% of all parameters, MLP channels only, layers 4..27, `prune --metric obs`
with the repair (lambda 1), both reading the same joined text `stdlib-docs:Nx128+self:Nx128` for each N of
`--sizes` (seed 0: the self text of a smaller N is the first N sequences of a larger one's). The covariance obs
and the repair read is 1536 wide in the MLP: 64+64 windows give it about 11 tokens per dimension.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
import os
import sys
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_recipes import _record, cpu_name, heldout

from engine.config import default_layer_range
from engine.control import Control
from engine.data.windows import draw_windows
from engine.model.structure import count_params, layer_shapes
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import Repair, pruned_layer_ids, reconstruct, snapshot_layers


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="64,128,256", help="windows per source, comma-separated")
    ap.add_argument("--windows", type=int, default=40, help="PPL windows of 128 tokens per held-out text")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args()
    sizes = sorted(int(s) for s in args.sizes.split(","))
    t_start = time.perf_counter()
    base, dense, ppl = heldout(args.windows)
    control = Control()
    shapes = layer_shapes(dense.model)
    layer_ids = list(range(*default_layer_range(len(shapes))))
    t = time.perf_counter()
    self_all = draw_windows(dense.model, dense.tokenizer, f"self:{sizes[-1]}x128", 0)[0]
    sample_s = time.perf_counter() - t

    rows = [("dense", ppl(dense.model), 0.0)]
    for n in sizes:
        t = time.perf_counter()
        spec = f"stdlib-docs:{n}x128+self:{n}x128"
        windows = torch.cat([draw_windows(dense.model, dense.tokenizer, f"stdlib-docs:{n}x128", 0)[0], self_all[:n]])
        model = copy.deepcopy(dense.model)
        dense_layers = snapshot_layers(model, layer_ids)
        plan = prune_with(model, Recipe(0.2, "obs", repair=Repair(spec, 1.0)), layer_ids, windows, control=control)
        cut = {i: dense_layers[i] for i in pruned_layer_ids(shapes, plan.layers)}
        reconstruct(model, cut, plan.layers, windows, 1.0, control=control)
        assert count_params(model) == plan.params_after
        rows.append((spec, ppl(model), time.perf_counter() - t))
        print(rows[-1], flush=True)

    cols = list(rows[0][1])
    ref = rows[1][1]
    lines = [f"## calib_size.py — {datetime.date.today()}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, cpu, float32. Embedded model at 20% of all parameters, MLP channels only, "
             f"layers {layer_ids[0]}..{layer_ids[-1]}, obs scores and the layer-wise repair (lambda 1) both on the "
             f"row's text; PPL over {args.windows} windows of 128 tokens of held-out text. Whole script "
             f"{(time.perf_counter() - t_start) / 60:.1f} min ({sample_s:.0f} s of it sampling {sizes[-1]} "
             f"sequences of self text once; a row's seconds: moments, scores, repair, PPL).", "",
             "| obs and repair text | " + " | ".join(f"PPL {c}" for c in cols) + f" | against {sizes[0]} | s |",
             "|---|" + "---|" * len(cols) + "---|---|"]
    for label, p, secs in rows:
        vs = "" if label == "dense" else ", ".join(f"{p[c] / ref[c] - 1:+.1%}" for c in cols)
        lines.append(f"| {label} | " + " | ".join(f"{p[c]:.2f}" for c in cols) + f" | {vs} | {secs:.0f} |")
    geo = {label: math.exp(sum(math.log(v) for v in p.values()) / len(p)) for label, p, _ in rows}
    lines += ["", "Geometric means: " + ", ".join(f"{k} {v:.2f}" for k, v in geo.items())]
    body = "\n".join(lines) + "\n"
    print(body)
    _record(args.out, "calib_size.py", body)


if __name__ == "__main__":
    main()
