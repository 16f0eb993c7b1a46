"""Pause, resume and cancel from another process, through the session's requests file."""

import os
import threading
import time

import pytest

from engine.errors import AdapruneError, Cancelled
from engine.events import Log
from engine.session.requests import SessionControl, request, requested
from engine.session.store import Session


@pytest.fixture
def session(tmp_path):
    return Session.create(tmp_path, "s", {})


def test_requests_pause_resume_and_cancel_a_running_job(session):
    logged: list = []
    control = SessionControl(session, "search", logged.append)
    control.checkpoint()  # nothing asked: runs on
    request(session, "search", "pause")
    assert requested(session, "search")["command"] == "pause"
    time.sleep(0.6)  # a safe point reads the file at most every POLL_S
    passed = threading.Event()

    def work():
        control.checkpoint()  # blocks while paused
        passed.set()

    t = threading.Thread(target=work)
    t.start()
    time.sleep(1.2)
    assert not passed.is_set() and control.paused  # paused means paused
    request(session, "search", "resume")
    t.join(5)
    assert passed.is_set() and not control.paused
    request(session, "search", "cancel")
    time.sleep(0.6)
    with pytest.raises(Cancelled):
        control.checkpoint()
    said = [e.message for e in logged if isinstance(e, Log)]
    assert [m.split(":")[0] for m in said] == ["search paused at a safe point", "search resumed",
                                                "search stopping at a safe point"]
    assert f"the app (process {os.getpid()})" in said[0] and "asked to cancel" in said[2]  # who, in words


def test_requests_for_an_earlier_run_are_ignored_and_bad_ones_refused(session):
    request(session, "search", "cancel")
    control = SessionControl(session, "search", since=time.time() + 1)  # a run that began after the request
    control.checkpoint()
    assert not control.cancelled
    with pytest.raises(AdapruneError, match="pause, resume or cancel"):
        request(session, "search", "explode")
    (session.path / "requests.json").write_text("{not json")
    assert requested(session, "search") is None  # a damaged file asks nothing
    SessionControl(session, "search").checkpoint()
