"""A full disk or a read-only folder in the middle of a search or an export (a write made to fail with ENOSPC or
EROFS, engine/faults.py): one line naming the file and the fix, nothing corrupted, and once the space is back
the search resumes and the export runs."""

from __future__ import annotations

import json

import pytest
from kills import (
    adaprune,
    finished,
    intact,
    make_tiny,
    no_temporaries,
    one_line_error,
    search_args,
    trial_values,
)


@pytest.fixture
def tiny(tmp_path, tokenizer):
    return make_tiny(tmp_path / "tiny", tokenizer)


def test_a_search_on_a_full_or_read_only_disk_says_so_and_resumes(tmp_path, tiny):
    root = tmp_path / "sessions"
    r = adaprune(root, *search_args(tiny, "s", 3), fail="write:plan.json=ENOSPC")
    one_line_error(r, "cannot write", "plan.json", "no space left", "resumes")
    session = intact(root, "s")
    kept = trial_values(session)
    assert kept and not (session.path / "plan.json").exists()
    r = adaprune(root, "resume", "s", fail="event:trial_finished=EROFS")  # the session's log, read-only
    one_line_error(r, "cannot write", "events.jsonl", "read-only file system", "make the folder writable")
    session = intact(root, "s")
    assert all(trial_values(session).get(n) == v for n, v in kept.items())
    finished(adaprune(root, "resume", "s"))
    session = intact(root, "s")
    values = trial_values(session)
    assert len(values) == 3 and all(values[n] == v for n, v in kept.items())
    best = json.loads((session.path / "plan.json").read_text())
    assert best["value"] == min(values.values())
    no_temporaries(session.path)


def test_an_export_on_a_full_disk_leaves_nothing_and_runs_once_space_is_back(tmp_path, searched_template):
    root = tmp_path / "sessions"
    searched_template(root, "x")
    out = tmp_path / "out"
    one_line_error(adaprune(root, "export", "x", "--out", out, fail=f"write:{out}=ENOSPC"), str(out), "no space left")
    assert not out.exists()
    no_temporaries(tmp_path)
    finished(adaprune(root, "export", "x", "--out", out))
    assert (out / "config.json").is_file()
