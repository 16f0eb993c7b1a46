"""LoRA recovery of a searched session on the embedded model, with the language-modelling loss and with the
KL divergence to the dense model (`--distil`) at the same steps: what each costs and gives back, on text
neither the search nor the recovery read. Records its section in bench/RESULTS.md.

    .venv/bin/python bench/recover.py [--session /tmp/adaprune-bench-XXXX/bench] [--steps 100]
        [--run lm@stdlib-docs --run kl@self:128x256 ...]

Each --run is LOSS@TEXT[,TEXT...][@LR]: lm (LLM-Pruner's language-modelling loss) or kl (`--distil`, KL to the
dense model), trained on those texts (`self:NxL` is text the dense model samples), at peak learning rate LR
(default: recover's). Default: lm and kl on stdlib-docs.

Without --session it takes the newest session bench/search.py left in the temp folder.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_recipes import WIKITEXT, _record, cpu_name

from engine.config import (
    PruneConfig,
    RecoverConfig,
    SearchConfig,
)
from engine.control import Control
from engine.measure.evaluate import perplexity
from engine.model.load import load
from engine.oneshot import evaluation_sets
from engine.prune.plan import Plan
from engine.prune.reconstruct import apply_stored_plan
from engine.recover.train import loss_name, recovered_model, run_recovery, warmup_steps
from engine.search.data import SearchData
from engine.session.store import Session

ROOT = Path(__file__).resolve().parent.parent


def newest_bench_session() -> Path:
    found = sorted(Path(tempfile.gettempdir()).glob("adaprune-bench-*/bench/plan.json"), key=lambda p: p.stat().st_mtime)
    if not found:
        sys.exit("no session from bench/search.py in the temp folder: run it first, or give --session")
    return found[-1].parent


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--session", type=Path, help="a session folder with a completed search")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--windows", type=int, default=40, help="held-out PPL windows of 128 tokens per text")
    ap.add_argument("--run", action="append", help="LOSS@TEXT[,TEXT...][@LR] (lm or kl); repeatable")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    folder = args.session or newest_bench_session()
    session = Session(folder)
    scfg = SearchConfig.from_dict(session.config())
    dense = load(scfg.model)
    evals = ["stdlib-docs"] + ([str(WIKITEXT)] if WIKITEXT.exists() else [])
    sets, _ = evaluation_sets(dense.tokenizer, PruneConfig(evals=evals, eval_windows=args.windows))
    windows_for = SearchData(session, scfg, dense, lambda e: None, Control()).repair_windows
    best = copy.deepcopy(dense.model)
    apply_stored_plan(best, Plan.from_dict(session.read_json("plan.json")["plan"]), windows_for)
    rows = [(name, {k: perplexity(m, v) for k, v in sets.items()}) for name, m in
            (("dense", dense.model), ("best (pruned, untuned)", best))]
    del best

    def sink(event) -> None:
        if event.kind in ("log", "recovery_step") and (event.kind == "log" or event.valid_ppl is not None):
            print({k: v for k, v in event.to_dict().items() if k != "t"}, flush=True)

    runs = []
    for run in args.run or ["lm@stdlib-docs", "kl@stdlib-docs"]:
        loss, _, data = run.partition("@")
        data, _, lr = data.partition("@")
        if loss not in ("lm", "kl") or not data:
            sys.exit(f"--run {run!r}: give LOSS@TEXT[,TEXT...][@LR] with LOSS lm or kl")
        cfg = RecoverConfig(steps=args.steps, distil=1.0 if loss == "kl" else 0.0, data=data.split(","),
                            **({"lr": float(lr)} if lr else {}))
        t0 = time.perf_counter()
        state = run_recovery(folder.parent, folder.name, cfg, sink, restart=True)
        wall = time.perf_counter() - t0
        merged, _ = recovered_model(session, copy.deepcopy(dense.model), windows_for)
        label = f"{loss_name(cfg)} on {', '.join(cfg.data)}, lr {cfg.lr:g}"
        rows.append((f"best + LoRA, loss {label}", {k: perplexity(merged, v) for k, v in sets.items()}))
        runs.append((label, state, wall))
        del merged
    names = list(sets)
    short = {n: ("WikiText-2 test" if n == str(WIKITEXT) else "stdlib-docs test") for n in names}
    lines = ["| model | " + " | ".join(f"PPL {short[n]}" for n in names) + " |", "|---|" + "---|" * len(names)]
    lines += [f"| {label} | " + " | ".join(f"{ppl[n]:.2f}" for n in names) + " |" for label, ppl in rows]
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
               f"{transformers.__version__}, cpu, float32")
    c = runs[0][1].config
    body = (f"## recover.py — {datetime.date.today()}\n\nMachine: {machine}.\n"
            f"`adaprune recover` on the best plan of the search.py session (embedded model, 20% removed): LoRA "
            f"r={c.rank}, alpha {c.alpha}, dropout {c.dropout} on {', '.join(c.targets)}; "
            f"{c.steps} steps of {c.batch_size}x{c.seq_len} tokens (texts: their calibration splits; "
            f"`self:NxL`: N sequences the dense model samples, drawn once), linear decay after "
            f"{warmup_steps(c)} warm-up steps; loss LM is LLM-Pruner's language-modelling loss, KL `--distil` (KL to the dense "
            f"model's next-token distributions). Wall time includes sampling self text. "
            f"Held-out PPL: {args.windows} windows of 128 tokens of texts neither the search nor the recovery "
            f"read.\n\n")
    for (label, state, wall), (_, ppl) in zip(runs, rows[2:], strict=True):
        body += (f"- loss {label}: {state.trainable_params:,} trainable parameters; {wall / 60:.1f} min, "
                 f"{wall / c.steps:.1f} s a step including validation; validation PPL (stdlib-docs valid) "
                 f"{state.valid_ppl_before:.2f} -> {state.valid_ppl_after:.2f}; against the untuned best: "
                 + ", ".join(f"{short[n]} {1 - ppl[n] / rows[1][1][n]:+.0%}" for n in names) + " lower PPL\n")
    body += "\n" + "\n".join(lines) + "\n"
    print(body)
    _record(args.out, "recover.py", body)


if __name__ == "__main__":
    main()
