"""The whole comparison table of a session on the embedded model, with the development data in ../shared/data:
dense, best searched, trial 0 (LLM-Pruner's recipe), magnitude and random at the best's parameter count —
zero-shot accuracy on the four local tasks (through lm-eval), PPL at 128 and 2048 tokens, speed and memory.
Records the table, its provenance and the terminal plots in bench/RESULTS.md.

    .venv/bin/python bench/table.py [--sessions-dir DIR --session NAME] [--trials 8] [--limit 100]

Without --session it first runs a short default search (--trials) in a temporary folder.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_recipes import WIKITEXT, _record, cpu_name

from engine.bench.run import run_bench
from engine.bench.table import plot_text, to_markdown
from engine.config import (
    BenchConfig,
    SearchConfig,
)
from engine.search.driver import create_session, run_search
from engine.session.store import Session

ROOT = Path(__file__).resolve().parent.parent
TASKS = ROOT.parent / "shared" / "data" / "tasks"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions-dir", type=Path)
    ap.add_argument("--session")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--limit", type=int, default=100, help="rows per task (seeded random subset)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    ap.add_argument("--report-only", action="store_true", help="re-render the session's saved table, measure nothing")
    args = ap.parse_args()

    t0 = time.perf_counter()
    if args.session:
        session = Session.open(args.sessions_dir, args.session)
    else:
        root = Path(tempfile.mkdtemp(prefix="adaprune-table-"))
        session = create_session(root, "table", SearchConfig(trials=args.trials))
        run_search(session, lambda e: None)
    searched = time.perf_counter() - t0

    def sink(event) -> None:
        if event.kind in ("metric", "log"):
            print({k: v for k, v in event.to_dict().items() if k != "t"}, flush=True)

    tasks = [str(p) for p in sorted(TASKS.glob("*.jsonl"))]
    texts = ["stdlib-docs"] + ([str(WIKITEXT)] if WIKITEXT.exists() else [])
    t1 = time.perf_counter()
    if args.report_only:
        results = session.read_json("bench.json")
    else:
        run_bench(session, BenchConfig(tasks=tasks, limit=args.limit, ppl=texts, seq_lens=[128], ppl_windows=40,
                                       speed=True), sink)
        results = run_bench(session, BenchConfig(ppl=texts, seq_lens=[2048], ppl_windows=4), sink)
    measured = time.perf_counter() - t1

    machine = f"{cpu_name()}, {os.cpu_count()} cores"
    best = session.read_json("plan.json") or {}
    body = (f"## table.py — {datetime.date.today()}\n\nMachine: {machine}. `adaprune bench` on the embedded model "
            f"at 20%: a session with {SearchConfig.from_dict(session.config()).trials} search trials "
            + (f"(the search.py session above; best trial {best.get('trial')})" if args.session else
               f"({searched / 60:.1f} min; best trial {best.get('trial')})")
            + (f", then the table ({measured / 60:.1f} min). " if not args.report_only else
               " (the table of an earlier run, re-rendered). ") +
            f"Rows: see `adaprune bench`; magnitude and random take the best's configuration with the metric "
            f"replaced. "
            f"Zero-shot: {args.limit} rows per task drawn with seed 0 from ../shared/data/tasks (sampling error "
            f"about ±{100 * 0.5 / args.limit ** 0.5:.0f} points per task), scored by lm-eval. PPL: 40 windows of "
            f"128 tokens and 4 of 2048, evenly spaced over each held-out text. Speed: median of 3 after a warm-up, "
            f"prompt 128 tokens, decode 32, fp32 on the CPU.\n\n" + to_markdown(results) +
            "\n```\n" + plot_text(results, width=76, height=12) + "\n```\n")
    print(body)
    _record(args.out, "table.py", body)


if __name__ == "__main__":
    main()
