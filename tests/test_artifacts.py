"""The per-artifact build lock workers share: a dead builder never blocks the others, a live one is waited for."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from engine.api import create_session
from engine.config import SearchConfig
from engine.control import Control
from engine.errors import Cancelled
from engine.events import Log
from engine.session import artifacts
from engine.session.artifacts import build_lock


@pytest.fixture
def session(tmp_path):
    return create_session(tmp_path, "s", SearchConfig(trials=2))  # the embedded model: nothing is loaded


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout)


def test_a_lock_left_by_a_killed_builder_is_taken_over(session):
    lock = session.stats_dir / "pool-self-0.lock"
    lock.write_text(json.dumps({"pid": dead_pid(), "host": socket.gethostname(), "since": 0}))
    said = []
    with build_lock(session, "pool-self-0", said.append, Control()):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists() and not said  # taken over at once: nobody to wait for


def test_a_lock_cut_short_before_its_holder_was_written_is_taken_over_once_old(session, monkeypatch):
    lock = session.stats_dir / "obs-0.lock"
    lock.write_text("")  # its writer died between creating the file and writing the holder
    monkeypatch.setattr(artifacts, "YOUNG_S", 0.0)
    with build_lock(session, "obs-0", lambda e: None, Control()):
        assert json.loads(lock.read_text())["pid"] == os.getpid()


def test_a_live_builder_is_waited_for_and_named(session, monkeypatch):
    monkeypatch.setattr(artifacts, "POLL_S", 0.01)
    lock = session.stats_dir / "objective-self-0.lock"
    lock.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "since": 0}))  # alive
    said: list = []
    control = Control()
    threading.Timer(0.3, control.cancel).start()  # the wait obeys a cancel at its safe point
    with pytest.raises(Cancelled), build_lock(session, "objective-self-0", said.append, control):
        pass
    assert [e.message for e in said if isinstance(e, Log)] == [
        f"waiting for process {os.getppid()} to build objective-self-0 (built once per session)"]
    assert json.loads(lock.read_text())["pid"] == os.getppid()  # the other's lock is left alone
