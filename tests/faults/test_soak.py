"""Load held: a 200-trial search on a tiny model, two worker processes sharing its study. Slow (minutes): run by
`make soak` (`pytest -m soak`), not by `make test`."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from kills import make_tiny

from engine.config import SearchConfig
from engine.search.driver import create_session
from engine.search.study import open_study

TRIALS = 200


def rss_mib(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status", encoding="utf-8") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


@pytest.mark.soak
def test_two_workers_run_200_trials_exactly_with_bounded_memory(tmp_path, tokenizer):
    cfg = SearchConfig(model=str(make_tiny(tmp_path / "tiny", tokenizer)), trials=TRIALS, objective_windows=2,
                       pool_size=12, device="cpu", sources=["stdlib-docs"], objective=["stdlib-docs/valid"])
    root = tmp_path / "sessions"
    session = create_session(root, "soak", cfg)
    env = {**os.environ, "ADAPRUNE_SESSIONS": str(root)}
    cmd = [sys.executable, "-c", "from tui.cli import main; main()", "worker", "soak"]
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    study = open_study(session, cfg)
    early: dict[int, float] = {}  # each worker's RSS once 20 trials are done (caches built, the heap warm)
    late: dict[int, float] = {}
    started = time.monotonic()
    while any(p.poll() is None for p in procs):
        n = len(study.get_trials(deepcopy=False))
        for p in procs:
            rss = rss_mib(p.pid)
            if rss is not None:
                (early if n < 20 or p.pid not in early else late)[p.pid] = rss
        assert time.monotonic() - started < 3600, "the soak ran over an hour"
        time.sleep(1.0)
    for p in procs:
        assert p.returncode == 0, p.stderr.read()[-3000:]
    trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED") and "duplicate_of" not in t.user_attrs]
    assert len(counted) == TRIALS
    keys = [t.user_attrs["key"] for t in counted]
    assert len(keys) == len(set(keys))  # no configuration evaluated twice
    assert len({t.user_attrs["worker"] for t in counted}) == 2
    events, bad = session.read_events()
    assert not bad and sum(e["kind"] == "trial_finished" for e in events) >= TRIALS
    print(f"RSS MiB after 20 trials {sorted(early.values())}, at the end {sorted(late.values())}; "
          f"{len(trials)} trials in {time.monotonic() - started:.0f} s")
    for pid, end in late.items():  # no leak that grows with the trial count
        assert end < 1.5 * early[pid] + 64, (early, late)
