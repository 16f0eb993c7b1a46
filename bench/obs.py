"""Which structures to remove when the kept weights are repaired: the `obs` metric against `adaprune prune`'s
taylor1 recipe, at the same widths and with the same repair. Prints and records one table.

    .venv/bin/python bench/obs.py [--windows 40] [--seeds 2] [--out bench/RESULTS.md]

Every row is the embedded model at 20% of all parameters, MLP channels first, layers 4..27 (`adaprune prune`'s
defaults apart from the metric, its calibration text and the repair's text), repaired layer by layer on the
pruned model's own inputs (`prune --reconstruct`). PPL on held-out text neither the pruning nor the repair
reads: stdlib-docs test, and WikiText-2 test from ../shared/data (or $ADAPRUNE_WIKITEXT) when present.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import math
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
from engine.data.text import calib_parts
from engine.data.windows import draw_windows
from engine.model.structure import count_params, layer_shapes
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import Repair, pruned_layer_ids, reconstruct, snapshot_layers

MIX = "stdlib-docs:64x128+self:64x128"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40, help="PPL windows of 128 tokens per held-out text")
    ap.add_argument("--seeds", type=int, default=2, help="calibration seeds for the oneshot and obs rows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    base, dense, ppl = heldout(args.windows)
    control = Control()
    drawn: dict[tuple[str, int], torch.Tensor] = {}

    def windows(spec: str, seed: int) -> torch.Tensor:  # each part drawn once (self text costs minutes here)
        parts = []
        for part in calib_parts(spec):
            if (part, seed) not in drawn:
                drawn[(part, seed)] = draw_windows(dense.model, dense.tokenizer, part, seed)[0]
            parts.append(drawn[(part, seed)])
        return torch.cat(parts)

    shapes = layer_shapes(dense.model)
    layer_ids = list(range(*default_layer_range(len(shapes))))
    rows: list[tuple[str, int, dict[str, float], float]] = [("dense", count_params(dense.model), ppl(dense.model), 0)]
    print(rows[-1], flush=True)

    def one(label: str, metric: str, calib: str, repair_text: str, seed: int) -> None:
        t = time.perf_counter()
        model = copy.deepcopy(dense.model)
        repair = Repair(repair_text, 1.0, seed=seed)
        dense_layers = snapshot_layers(model, layer_ids)
        plan = prune_with(model, Recipe(base.prune, metric, seed=seed, repair=repair), layer_ids,
                          windows(calib, seed), control=control)
        cut = pruned_layer_ids(shapes, plan.layers)
        reconstruct(model, {i: dense_layers[i] for i in cut}, plan.layers, windows(repair_text, seed), 1.0,
                    control=control)
        assert count_params(model) == plan.params_after
        rows.append((label, plan.params_after, ppl(model), time.perf_counter() - t))
        print(rows[-1], flush=True)

    self_text = "self:128x128"
    for seed in range(args.seeds):
        one(f"oneshot-repaired (taylor1 stdlib-docs:10x64, repair {self_text}), seed {seed}", "taylor1",
            "stdlib-docs:10x64", self_text, seed)
        one(f"obs {MIX}, repair {self_text}, seed {seed}", "obs", MIX, self_text, seed)
    one(f"taylor1 stdlib-docs:10x64, repair {MIX}", "taylor1", "stdlib-docs:10x64", MIX, 0)
    one(f"obs {MIX}, repair {MIX}", "obs", MIX, MIX, 0)
    one(f"obs stdlib-docs:128x128, repair {self_text}", "obs", "stdlib-docs:128x128", self_text, 0)
    one(f"obs {self_text}, repair {self_text}", "obs", self_text, self_text, 0)

    cols = list(rows[0][2])
    lines = [f"## obs.py — {datetime.date.today()}", "",
             f"Machine: {cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, cpu, float32. Embedded model at 20% of all parameters, MLP channels "
             f"first, layers {layer_ids[0]}..{layer_ids[-1]}; every row repaired layer by layer (lambda 1) as "
             f"`prune --reconstruct`, its output biases counted. PPL: {args.windows} windows of 128 tokens of "
             f"held-out text. Whole script {(time.perf_counter() - t_start) / 60:.1f} min (seconds per row include "
             f"the scores, the repair and the PPL; the first row of each text also draws it).", "",
             "| recipe | params | " + " | ".join(f"PPL {c}" for c in cols) + " | geo. mean | s |",
             "|---|---|" + "---|" * len(cols) + "---|---|"]
    for label, params, p, secs in rows:
        geo = math.exp(sum(math.log(v) for v in p.values()) / len(p))
        lines.append(f"| {label} | {params:,} | " + " | ".join(f"{p[c]:.2f}" for c in cols) +
                     f" | {geo:.2f} | {secs:.0f} |")
    ref = [r for r in rows if r[0].startswith("oneshot-repaired")]
    if ref:
        lines += ["", "Against oneshot-repaired with the same calibration seed (lower PPL is better):"]
        for label, _, p, _ in rows[1:]:
            seed = label.rsplit("seed ", 1)[-1] if "seed " in label else "0"
            r = next((x for x in ref if x[0].endswith(f"seed {seed}")), ref[0])
            if r[0] != label:
                lines.append(f"- {label}: " + ", ".join(f"{c} {p[c] / r[2][c] - 1:+.1%}" for c in cols))
    text = "\n".join(lines) + "\n"
    print(text)
    with args.out.open("a", encoding="utf-8") as f:
        f.write("\n" + text)


if __name__ == "__main__":
    main()
