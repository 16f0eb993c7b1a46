"""Regenerate the recorded engine output the app's tests replay (a real search and bench on a tiny model).

    .venv/bin/python tests/data/record.py
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

from conftest import make_model, make_tokenizer  # noqa: E402

from engine.benchmark import BenchConfig, run_bench  # noqa: E402
from engine.search import SearchConfig, create_session, run_search  # noqa: E402


def main() -> None:
    tmp = Path(tempfile.mkdtemp(prefix="adaprune-record-"))
    try:
        folder = tmp / "tiny"
        make_model("llama", layers=6).save_pretrained(folder)
        make_tokenizer().save_pretrained(folder)
        cfg = SearchConfig(model=str(folder), trials=6, objective_windows=2, pool_size=12, device="cpu",
                           sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
        session = create_session(tmp / "s", "recorded", cfg)
        run_search(session)
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


if __name__ == "__main__":
    main()
