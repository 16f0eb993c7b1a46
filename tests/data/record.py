"""Regenerate the recorded engine output the app's tests replay (a real search, bench and LoRA recovery on a
tiny model).

    .venv/bin/python tests/data/record.py [search] [recovery]    (default: both)
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import make_model, make_tokenizer

from engine.bench.run import run_bench
from engine.config import (
    BenchConfig,
    SearchConfig,
)
from engine.search.driver import create_session, run_search


def main(parts: list[str]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="adaprune-record-"))
    try:
        folder = tmp / "tiny"
        make_model("llama", layers=6).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        trials = 6 if "search" in parts else 2
        cfg = SearchConfig(model=str(folder), trials=trials, objective_windows=2, pool_size=12, device="cpu",
                           sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
        session = create_session(tmp / "s", "recorded", cfg)
        run_search(session)
        if "recovery" in parts:
            record_recovery(tmp, session)
        if "search" not in parts:
            return
        run_bench(session, BenchConfig(ppl=["stdlib-docs"], seq_lens=[32], ppl_windows=2))
        events = [json.loads(line) for line in session.events_path.read_text().splitlines()]
        for e in events:
            e["t"] = 0.0
        (HERE / "search_events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
        (HERE / "plan.json").write_text(json.dumps(session.read_json("plan.json")) + "\n")
        bench = session.read_json("bench.json")
        for row in bench["rows"].values():
            row["plan"] = None
        (HERE / "bench.json").write_text(json.dumps(bench) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def record_recovery(tmp: Path, session) -> None:
    from engine.config import RecoverConfig
    from engine.recover.train import run_recovery

    events = []
    cfg = RecoverConfig(steps=8, batch_size=2, seq_len=32, lr=3e-3, warmup=2, valid_windows=2, valid_len=32,
                        eval_every=4, save_every=4)
    state = run_recovery(tmp / "s", session.name, cfg, lambda e: events.append(e.to_dict()))
    for e in events:
        e.pop("t", None)
        for k in ("seconds",):
            if k in e:
                e[k] = 0.0
    (HERE / "recovery_events.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    state.started = state.finished = 0.0
    (HERE / "recovery_state.json").write_text(json.dumps(state.to_dict()) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:] or ["search", "recovery"])
