"""Pause, resume and cancel from another process, through the session's requests file."""

import os
import threading
import time

import pytest

from engine.errors import AdapruneError, Cancelled
from engine.events import Log
from engine.session.requests import SessionControl, request, requested
from engine.session.store import Session
from engine.session.summary import summary


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


def test_the_cli_pauses_resumes_and_cancels_a_headless_search(tmp_path, tokenizer):
    """`adaprune pause|resume|cancel NAME` from another terminal steer a search another process runs."""
    import json
    import subprocess
    import sys

    from conftest import make_model
    from typer.testing import CliRunner

    from tui.cli import app

    folder = tmp_path / "tiny"
    make_model("llama").save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    root = tmp_path / "sessions"
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, [*map(str, args), "--sessions-dir", str(root)])

    cmd = [sys.executable, "-c", "from tui.cli import main; main()", "search", "--session", "h", "--model",
           str(folder), "--trials", "200", "--objective-windows", "2", "--source", "stdlib-docs", "--objective",
           "stdlib-docs/valid", "--device", "cpu", "--sessions-dir", str(root)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        events = root / "h" / "events.jsonl"

        def logged(text: str, timeout: float = 300) -> None:
            end = time.monotonic() + timeout
            while time.monotonic() < end:
                if events.exists() and text in events.read_text():
                    return
                assert proc.poll() is None, proc.stderr.read()[-2000:]
                time.sleep(0.2)
            raise AssertionError(f"never logged {text!r}")

        logged('"trial_started"')
        r = cli("pause", "h")
        assert r.exit_code == 0 and f"asked the search of h (process {proc.pid}) to pause" in r.output, r.output
        logged("search paused at a safe point: adaprune (process")
        row = summary(Session(root / "h"))
        assert row.status == "paused", row  # the list says so, not "running"
        assert row.updated == pytest.approx(events.stat().st_mtime)  # last change: its log's last line
        r = cli("resume", "h")  # running and paused: un-paused, not a second driver
        assert r.exit_code == 0 and "to go on" in r.output, r.output
        logged("search resumed")
        assert summary(Session(root / "h")).status == "running"
        r = cli("resume", "h")  # running and not paused: nothing to resume, and it says what would help
        assert r.exit_code == 2 and "not paused" in r.output and "adaprune pause h" in r.output, r.output
        r = cli("resume", "h", "--job", "recover")
        assert r.exit_code == 2 and "adaprune recover h --resume" in r.output
        r = cli("cancel", "h", "--job", "bench")
        assert r.exit_code == 2 and "no benchmark of session 'h' is running" in r.output
        assert cli("cancel", "h").exit_code == 0
        assert proc.wait(timeout=300) == 130
    finally:
        if proc.poll() is None:
            proc.kill()
    assert json.loads((root / "h" / "session.json").read_text())["status"] == "cancelled"
    r = cli("pause", "h")
    assert r.exit_code == 2 and "nothing of session 'h' is running now" in r.output


def test_the_sessions_list_says_paused_for_a_paused_recovery(tmp_path):
    from engine.session.layout import RECOVERY, STATE

    session = Session.create(tmp_path, "r", {"model": "tiny", "prune": 0.2, "trials": 2})
    with session.lock("recovery"):  # before its first checkpoint there is no state file yet
        assert summary(session).recovery == "running"
        request(session, "recover", "pause")
        assert summary(session).recovery == "paused"
        request(session, "recover", "resume")
    session.write_json(f"{RECOVERY}/{STATE}", {"status": "running", "step": 3, "config": {"steps": 12}})
    with session.lock("recovery"):
        assert summary(session).recovery == "running 3/12"
        request(session, "recover", "pause")
        assert summary(session).recovery == "paused 3/12"
    assert summary(session).recovery == "stopped 3/12"  # its process died before it could say so


def test_the_app_tells_a_recovery_holding_the_session_from_a_search(tmp_path):
    """They share the session's lock: the Search screen must not offer to pause a recovery as a search."""
    from tui.backend import Backend

    Session.create(tmp_path, "r", {"model": "tiny", "prune": 0.2, "trials": 2})
    backend = Backend(tmp_path)
    with backend.session("r").lock("recovery"):
        assert backend.holder("r") is None and not backend.is_running("r")
        assert backend.holder("r", "recover")["pid"] == os.getpid()
    with backend.session("r").lock():
        assert backend.is_running("r") and backend.holder("r", "recover") is None


def test_a_paused_benchmark_names_the_command_that_resumes_it(session):
    """A search and a benchmark may both run: `adaprune resume NAME` alone would be ambiguous."""
    logged: list = []
    control = SessionControl(session, "bench", logged.append)
    request(session, "bench", "pause")
    control._sync(force=True)
    request(session, "bench", "resume")
    control._sync(force=True)
    assert "`adaprune resume s --job bench` resumes it" in logged[0].message
