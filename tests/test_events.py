"""Events say what happened: a stage left by an error or a cancel does not read as finished."""

import contextlib

import pytest

from engine.errors import AdapruneError, Cancelled
from engine.events import Stage, StageFinished, event_from_dict


def _finished(raise_: BaseException | None) -> StageFinished:
    seen = []
    with pytest.raises(type(raise_)) if raise_ else contextlib.nullcontext(), Stage(seen.append, "work", 3, "steps"):
        if raise_:
            raise raise_
    return seen[-1]


def test_a_stage_says_how_it_ended():
    assert _finished(None).outcome == "done"
    assert _finished(Cancelled()).outcome == "cancelled"
    assert _finished(KeyboardInterrupt()).outcome == "cancelled"
    assert _finished(AdapruneError("bad input")).outcome == "failed"


def test_an_old_log_without_the_outcome_still_reads():
    event = event_from_dict({"kind": "stage_finished", "stage": "work", "seconds": 1.0, "t": 0.0})
    assert isinstance(event, StageFinished) and event.outcome == "done"


def test_a_sessions_log_says_which_job_wrote_each_event(tmp_path):
    from engine.events import Log
    from engine.session.store import Session
    from tui.backend import Backend

    session = Session.create(tmp_path, "s", {})
    session.logged(lambda e: None, "search")(Log("from the search", "warning"))
    session.logged(lambda e: None, "bench")(Log("from the benchmark", "warning"))
    session.append_event(Log("untagged, as older logs are", "warning"))
    rows, _ = session.follow_events(0)
    assert [r.get("job") for r in rows] == ["search", "bench", None]
    seen, _ = Backend(tmp_path).follow("s", 0, "search")
    assert [e.message for e in seen] == ["from the search", "untagged, as older logs are"]
    assert len(Backend(tmp_path).follow("s", 0)[0]) == 3
