"""Which target should the layer-wise repair fit? Prints and records one section of RESULTS.md.

    .venv/bin/python bench/repair_targets.py [--mix stdlib-docs:64x128+self:64x128] [--windows 40]

The embedded model at 20% with `prune --metric obs` (MLP channels, layers 4..27, obs and repair text `--mix`),
then the sliced model repaired layer by layer three ways, lambda 1, its output biases counted:
- `columns` (what `--reconstruct` does): the kept columns of o_proj/down_proj fit W x on the pruned model's own
  inputs x, i.e. they make up for the removed inputs only;
- `dense`: they fit the dense layer's output on the dense model's inputs instead;
- `residual`: they fit the dense layer's output plus the gap between the dense and the pruned residual stream,
  so each repaired layer also cancels the error the layers below it left (the kind of target a global repair
  would use).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_recipes import WIKITEXT, _record, cpu_name

from engine.config import EMBEDDED, PruneConfig, default_layer_range
from engine.control import Control
from engine.data.text import calib_parts
from engine.data.windows import draw_windows
from engine.measure.evaluate import perplexity
from engine.model.load import load
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.oneshot import evaluation_sets
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import (
    Repair,
    _down_inputs,
    _o_inputs,
    _with_bias,
    layer_inputs,
    pruned_layer_ids,
)
from engine.prune.slicing import head_rows


def ridge(x: Tensor, y: Tensor, w0: Tensor, lam: float) -> tuple[Tensor, Tensor]:
    """Affine ridge least squares y ~ W x + b pulled toward w0 (the `ridge_weights` rule with any target)."""
    x, y, w0 = x.double(), y.double(), w0.double()
    mx, my = x.mean(0), y.mean(0)
    xc, yc = x - mx, y - my
    cxx, cyx = xc.T @ xc / len(x), yc.T @ xc / len(x)
    reg = lam * float(cxx.diagonal().mean())
    w = torch.linalg.solve(cxx + reg * torch.eye(x.shape[1], dtype=torch.float64), (cyx + reg * w0).T).T
    return w, my - w @ mx


def flat(ts) -> Tensor:
    return torch.cat([t.reshape(-1, t.shape[-1]) for t in ts])


@torch.no_grad()
def repair(model, dense_model, cut, plan_layers, windows, target: str, lam: float = 1.0) -> None:
    """Carry the dense and the pruned hidden states side by side, one layer at a time, and refit each cut layer."""
    layers, dlayers = decoder_layers(model), decoder_layers(dense_model)
    bp = layer_inputs(model, windows, 4)
    bd = list(bp)
    for i in range(max(cut) + 1):
        layer, dl = layers[i], dlayers[i]
        if i not in cut:
            bp, bd = [(layer(h, **kw), kw) for h, kw in bp], [(dl(h, **kw), kw) for h, kw in bd]
            continue
        lp = plan_layers[i]
        cols, ch = head_rows(lp.keep_heads, dl.self_attn.head_dim), torch.tensor(lp.keep_channels)
        xd = [_o_inputs(dl.self_attn, dl.input_layernorm(h), kw) for h, kw in bd]
        midd = [h + dl.self_attn.o_proj(x) for (h, _), x in zip(bd, xd, strict=True)]
        zd = [_down_inputs(dl.mlp, dl.post_attention_layernorm(m)) for m in midd]
        xp = [_o_inputs(dl.self_attn, layer.input_layernorm(h), kw) for h, kw in bp]
        o, d = dl.self_attn.o_proj, dl.mlp.down_proj
        if len(cols) < o.in_features:
            y = flat(xp) @ o.weight.T if target == "columns" else flat([o(x) for x in xd])
            if target == "residual":
                y = y + flat([hd - hp for (hd, _), (hp, _) in zip(bd, bp, strict=True)])
            layer.self_attn.o_proj = _with_bias(layer.self_attn.o_proj, *ridge(flat(xp)[:, cols], y, o.weight[:, cols], lam))
        midp = [h + layer.self_attn.o_proj(x.index_select(-1, cols)) for (h, _), x in zip(bp, xp, strict=True)]
        zp = [_down_inputs(dl.mlp, layer.post_attention_layernorm(m)) for m in midp]
        if len(ch) < d.in_features:
            y = flat(zp) @ d.weight.T if target == "columns" else flat([d(z) for z in zd])
            if target == "residual":
                y = y + flat([a - b for a, b in zip(midd, midp, strict=True)])
            layer.mlp.down_proj = _with_bias(layer.mlp.down_proj, *ridge(flat(zp)[:, ch], y, d.weight[:, ch], lam))
        bp = [(m + layer.mlp.down_proj(z.index_select(-1, ch)), kw) for m, z, (_, kw) in zip(midp, zp, bp, strict=True)]
        bd = [(m + d(z), kw) for m, z, (_, kw) in zip(midd, zd, bd, strict=True)]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mix", default="stdlib-docs:64x128+self:64x128", help="obs and repair text")
    ap.add_argument("--windows", type=int, default=40, help="PPL windows of 128 tokens per held-out text")
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "RESULTS.md")
    args = ap.parse_args()
    t0 = time.perf_counter()
    base = PruneConfig(model=EMBEDDED, prune=0.20, evals=["stdlib-docs", str(WIKITEXT)], eval_windows=args.windows)
    dense = load(base.model, "cpu", "float32")
    dense.model.requires_grad_(False)
    sets, _ = evaluation_sets(dense.tokenizer, base)
    control = Control()
    windows = torch.cat([draw_windows(dense.model, dense.tokenizer, p, 0)[0] for p in calib_parts(args.mix)])
    shapes = layer_shapes(dense.model)
    sliced = copy.deepcopy(dense.model)
    plan = prune_with(sliced, Recipe(0.2, "obs", repair=Repair(args.mix, 1.0)),
                      list(range(*default_layer_range(len(shapes)))), windows, control=control)
    cut = pruned_layer_ids(shapes, plan.layers)
    rows = [("(unpruned model)", [perplexity(dense.model, w, control=control) for w in sets.values()])]
    for target in ("columns", "dense", "residual"):
        model = copy.deepcopy(sliced)
        repair(model, dense.model, cut, plan.layers, windows, target)
        assert count_params(model) == plan.params_after
        rows.append((target, [perplexity(model, w, control=control) for w in sets.values()]))
        print(rows[-1], flush=True)
    ref = rows[1][1]
    lines = [f"## repair_targets.py — {datetime.date.today()}", "",
             f"Machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, cpu, float32. Embedded model at 20%, obs on {args.mix}, MLP channels, "
             f"repaired on the same text (lambda 1); PPL over {args.windows} windows of 128 tokens. "
             f"{(time.perf_counter() - t0) / 60:.1f} min.", "",
             "| repair target | PPL stdlib-docs test | PPL WikiText-2 test | against columns |", "|---|---|---|---|"]
    for k, (label, p) in enumerate(rows):
        delta = ", ".join(f"{a / b - 1:+.1%}" for a, b in zip(p, ref, strict=True)) if k else ""
        lines.append(f"| {label} | {p[0]:.2f} | {p[1]:.2f} | {delta} |")
    text = "\n".join(lines) + "\n"
    print(text)
    _record(args.out, "repair_targets.py", text)


if __name__ == "__main__":
    main()
