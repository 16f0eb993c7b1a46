"""Variants of the strongest fixed recipe (`prune --metric obs`, repaired layer by layer): do the allocation or a
sequential choice of the channels (SlimGPT's) lower held-out PPL? Prints and records one section of RESULTS.md.

    .venv/bin/python bench/obs_variants.py [--windows 40] [--out bench/RESULTS.md]

Every row is the embedded model at 20% of all parameters, MLP channels only, layers 4..27, obs scores and the
repair (lambda 1) both on stdlib-docs:64x128+self:64x128; rows differ in one thing:
- `uniform`: `prune`'s obs recipe as it ships (the same count cut from every layer, channels chosen on the dense
  model's input covariance);
- `reselect`: the same counts, each layer's channels chosen again on the covariance of its inputs as the pruned
  and repaired layers below produce them (the sequential statistics the repair already gathers), then repaired;
- `global`: one ranking of obs scores across layers decides the widths;
- `ramp R`: uniform along a depth ramp (R > 0 prunes deeper layers more).
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
from engine.data.text import calib_parts
from engine.data.windows import draw_windows
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.prune.obs import removal_scores
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import (
    Moments,
    Repair,
    _down_inputs,
    _o_inputs,
    _repair_layer,
    add_biases,
    bias_layout,
    layer_inputs,
    pruned_layer_ids,
    reconstruct,
    snapshot_layers,
)
from engine.prune.slicing import _sliced, apply_plan

MIX = "stdlib-docs:64x128+self:64x128"


@torch.no_grad()
def reselect_and_repair(model, dense_layers, plan_layers, windows, lam: float = 1.0) -> None:
    """SlimGPT's order: layer by layer, choose the kept channels by obs on the pruned model's own inputs, slice
    from the dense layer, repair, and carry the hidden states on (MLP-only plans)."""
    layers = decoder_layers(model)
    batches = layer_inputs(model, windows, 4)
    for i in range(max(dense_layers) + 1):
        layer = layers[i]
        if i not in dense_layers:
            batches = [(layer(h, **kw), kw) for h, kw in batches]
            continue
        dense, lp = dense_layers[i], plan_layers[i]
        xs = [_o_inputs(dense.self_attn, layer.input_layernorm(h), kw) for h, kw in batches]
        mids = [h + dense.self_attn.o_proj(x) for (h, _), x in zip(batches, xs, strict=True)]
        zs = [_down_inputs(dense.mlp, layer.post_attention_layernorm(m)) for m in mids]
        mom = Moments.of(zs)
        scores = removal_scores(dense.mlp.down_proj.weight, mom.cov, 1, 8)
        lp.keep_channels = sorted(torch.argsort(scores, descending=True)[: len(lp.keep_channels)].tolist())
        ch = torch.tensor(lp.keep_channels)
        layer.mlp.gate_proj = _sliced(dense.mlp.gate_proj, rows=ch)
        layer.mlp.up_proj = _sliced(dense.mlp.up_proj, rows=ch)
        layer.mlp.down_proj = _sliced(dense.mlp.down_proj, cols=ch)
        _repair_layer(layer, dense, lp, None, mom, lam)
        batches = [(m + layer.mlp.down_proj(z.index_select(-1, ch)), kw)
                   for m, z, (_, kw) in zip(mids, zs, batches, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--windows", type=int, default=40, help="PPL windows of 128 tokens per held-out text")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args()
    t_start = time.perf_counter()
    base, dense, ppl = heldout(args.windows)
    control = Control()
    windows = torch.cat([draw_windows(dense.model, dense.tokenizer, part, 0)[0] for part in calib_parts(MIX)])
    shapes = layer_shapes(dense.model)
    layer_ids = list(range(*default_layer_range(len(shapes))))

    rows = [("dense", ppl(dense.model), 0.0)]
    variants = [("uniform", {}), ("reselect", {}), ("global", {"allocation": "global"}),
                ("ramp 0.25", {"ramp": 0.25}), ("ramp -0.25", {"ramp": -0.25})]
    for label, kw in variants:
        t = time.perf_counter()
        model = copy.deepcopy(dense.model)
        dense_layers = snapshot_layers(model, layer_ids)
        plan = prune_with(model, Recipe(0.2, "obs", repair=Repair(MIX, 1.0), **kw), layer_ids, windows,
                          control=control)
        cut = {i: dense_layers[i] for i in pruned_layer_ids(shapes, plan.layers)}
        if label == "reselect":  # from the dense weights again: the choice changes, the widths do not
            model = copy.deepcopy(dense.model)
            apply_plan(model, plan.layers)
            add_biases(model, bias_layout(dense.model.config.model_type, shapes, plan.layers))
            reselect_and_repair(model, cut, plan.layers, windows)
        else:
            reconstruct(model, cut, plan.layers, windows, 1.0, control=control)
        assert count_params(model) == plan.params_after
        rows.append((label, ppl(model), time.perf_counter() - t))
        print(rows[-1], flush=True)

    cols = list(rows[0][1])
    ref = rows[1][1]
    lines = [f"## obs_variants.py — {datetime.date.today()}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, cpu, float32. Embedded model at 20% of all parameters, MLP channels only, "
             f"layers {layer_ids[0]}..{layer_ids[-1]}, obs scores and the layer-wise repair (lambda 1) on {MIX}; "
             f"PPL over {args.windows} windows of 128 tokens of held-out text. Whole script "
             f"{(time.perf_counter() - t_start) / 60:.1f} min.", "",
             "| variant | " + " | ".join(f"PPL {c}" for c in cols) + " | geo. mean | against uniform | s |",
             "|---|" + "---|" * len(cols) + "---|---|---|"]
    for label, p, secs in rows:
        geo = math.exp(sum(math.log(v) for v in p.values()) / len(p))
        delta = ", ".join(f"{p[c] / ref[c] - 1:+.1%}" for c in cols) if label != "dense" else ""
        lines.append(f"| {label} | " + " | ".join(f"{p[c]:.2f}" for c in cols) + f" | {geo:.2f} | {delta} | "
                     f"{secs:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    _record(args.out, "obs_variants.py", text)


if __name__ == "__main__":
    main()
