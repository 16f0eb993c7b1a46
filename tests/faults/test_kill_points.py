"""Fault injection: `adaprune search`, `recover`, `export` and `bench` run as processes that SIGKILL themselves at
chosen points (engine/faults.py: a write complete under its temporary name, an event about to be logged, an
event line cut in half). After every kill the session still lists, every JSON file in it parses, what finished
before the kill is still there, and running the command again (resuming where that exists) finishes. Each
test chains its kills: the run that recovers from one kill is itself killed at the next point."""

from __future__ import annotations

import json

import pytest
from kills import adaprune, finished, intact, killed, make_tiny, no_temporaries, search_args, trial_values

from engine.config import SearchConfig
from engine.search.study import open_study
from engine.session.study import completed


@pytest.fixture
def tiny(tmp_path, tokenizer):
    return make_tiny(tmp_path / "tiny", tokenizer)


def test_a_search_killed_again_and_again_finishes_with_every_trial_kept(tmp_path, tiny):
    root = tmp_path / "sessions"
    search = search_args(tiny, "s", 4)
    # killed while the session is being created: it is not a session yet, and the same command starts afresh
    killed(adaprune(root, *search, kill="write:session.json"), "creation")
    r = adaprune(root, "sessions")
    assert r.returncode == 0 and " s " not in r.stdout
    killed(adaprune(root, *search, kill="write:stats/pool"), "a calibration pool's file")
    session = intact(root, "s")
    kept: dict[int, float] = {}
    # in the order a clean run passes them: trial 0 is the first best, trial 2 the first to need samples
    for point in ("event:stage_progress@3", "write:plan.json", "event:trial_finished", "write:stats/samples",
                  "torn:trial_started", "event:trial_finished", "write:session.json@2"):
        killed(adaprune(root, "resume", "s", kill=point), point)
        session = intact(root, "s")
        values = trial_values(session)
        assert all(values.get(n) == v for n, v in kept.items()), (point, kept, values)  # nothing lost
        kept = values
    finished(adaprune(root, "resume", "s"))
    session = intact(root, "s")
    values = trial_values(session)
    assert all(values[n] == v for n, v in kept.items())
    assert completed(open_study(session, SearchConfig.from_dict(session.config()))) == 4  # exactly the budget
    assert session.manifest()["status"] == "done"
    best = json.loads((session.path / "plan.json").read_text())
    assert best["value"] == min(values.values()) and values[best["trial"]] == best["value"]  # the best is saved
    _, bad = session.read_events()
    assert len(bad) == 1  # the one torn line; the event after it started a line of its own
    no_temporaries(session.path)


def test_a_recovery_killed_at_its_checkpoints_resumes_to_the_last_step(tmp_path, searched_template):
    root = tmp_path / "sessions"
    searched_template(root, "r")
    recover = ["recover", "r", "--steps", 6, "--save-every", 2, "--eval-every", 3, "--batch", 2, "--seq-len", 32,
               "--valid-windows", 2, "--data", "stdlib-docs"]
    # before the first checkpoint is in place there is nothing to resume: the same command starts again
    killed(adaprune(root, *recover, kill="write:recovery/ckpt"), "the first checkpoint")
    intact(root, "r")
    killed(adaprune(root, *recover, "--restart", kill="write:recovery/state.json@2"), "the second state")
    state = json.loads((root / "r" / "recovery" / "state.json").read_text())
    assert state["step"] == 2 and (root / "r" / "recovery" / state["checkpoint"]).is_dir()
    for point in ("event:recovery_step@2", "torn:recovery_step", "write:recovery/ckpt"):
        killed(adaprune(root, *recover, "--resume", kill=point), point)
        state = json.loads((intact(root, "r").path / "recovery" / "state.json").read_text())
        assert (root / "r" / "recovery" / state["checkpoint"]).is_dir()  # the state names a checkpoint on disk
    finished(adaprune(root, *recover, "--resume"))
    state = json.loads((root / "r" / "recovery" / "state.json").read_text())
    assert state["status"] == "done" and [h["step"] for h in state["history"]] == list(range(1, 7))
    no_temporaries(root / "r")


def test_an_export_killed_at_any_point_is_complete_or_absent(tmp_path, searched_template):
    from transformers import AutoModelForCausalLM

    root = tmp_path / "sessions"
    searched_template(root, "x")
    out = tmp_path / "export"
    for point in ("stage:export to", f"write:{out}"):
        killed(adaprune(root, "export", "x", "--out", out, kill=point), point)
        assert not out.exists()
    finished(adaprune(root, "export", "x", "--out", out))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # replacing an earlier export: killed before the new one is in place, the old one is still whole
    killed(adaprune(root, "export", "x", "--out", out, "--widths", "uniform", "--force", kill=f"write:{out}"),
           "the replacing export")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True) is not None
    finished(adaprune(root, "export", "x", "--out", out, "--widths", "uniform", "--force"))
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"
    no_temporaries(tmp_path)


def test_a_benchmark_killed_mid_table_keeps_its_rows_and_runs_again(tmp_path, searched_template):
    root = tmp_path / "sessions"
    searched_template(root, "b")
    bench = ["bench", "b", "--ppl", "stdlib-docs", "--ppl-windows", 2, "--rows", "dense,best,oneshot,baseline"]
    for point in ("write:bench.json@3", "event:metric@2", "torn:stage_finished@2", "write:bench.json@5"):
        killed(adaprune(root, *bench, kill=point), point)
        table = json.loads((intact(root, "b").path / "bench.json").read_text())
        assert set(table["rows"]) <= {"dense", "best", "oneshot", "baseline"}  # the rows measured, parseable
    finished(adaprune(root, *bench))
    table = json.loads((root / "b" / "bench.json").read_text())
    assert {"dense", "best", "oneshot", "baseline"} <= set(table["rows"])
    assert all(row["ppl"] for row in table["rows"].values())
    no_temporaries(root / "b")
