"""Requests to a session's running work from any process: pause, resume, cancel, through a file in its folder.

A search started by the app runs in its own detached process (it outlives the terminal and the SSH
connection), and any app attached later must still pause and cancel it; so must an app attached to a headless
`adaprune search`. The requester writes `requests.json`; every process working on the session (the driver and
its workers) reads it at its safe points through `SessionControl` and says in the events log what it did.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Literal

from engine.control import Control
from engine.errors import AdapruneError, Cancelled
from engine.events import Log, Sink, null_sink
from engine.session.activity import HOST, Activity
from engine.session.store import Session

REQUESTS = "requests.json"
Command = Literal["pause", "resume", "cancel"]
COMMANDS = ("pause", "resume", "cancel")
POLL_S = 0.5  # how often a safe point re-reads the file (a stat and a small JSON read)


JOBS = {"search": "search", "recover": "recovery", "bench": "benchmark"}  # a request's job, in words


def request(session: Session, job: str, command: Command, who: str = "the app") -> None:
    """Ask every process working on the session's `job` ("search") to pause, resume or cancel."""
    if command not in COMMANDS:
        raise AdapruneError(f"unknown request {command!r}: pause, resume or cancel")
    data = _read(session)
    data[job] = {"command": command, "t": time.time(), "by": f"{socket.gethostname()}:{os.getpid()}", "who": who}
    session.write_json(REQUESTS, data)


def running_jobs(session: Session) -> dict[str, dict]:
    """The session's jobs a live process holds now ({job: its lock's holder}): search or recover, and bench."""
    out = {}
    held = session.holder()
    if held:
        out["recover" if held.get("what") == "recovery" else "search"] = held
    bench = session.holder("bench")
    if bench:
        out["bench"] = bench
    if not held:  # a search run by `adaprune worker` processes alone holds no lock: its log names them
        live = Activity().feed(session.read_events()[0]).live("search")
        if live:  # they go by the last run's start (and obey the same requests)
            out["search"] = {"pid": int(live[0].partition("@")[0]), "host": HOST, "what": "search",
                             "since": _started(session, "search"), "workers": live}
    return out


def steer(session: Session, command: Command, job: str | None = None, who: str = "adaprune") -> tuple[str, dict]:
    """Send `command` to the session's running `job` (or the only one running); the job and its holder."""
    running = running_jobs(session)
    if job is not None and job not in JOBS:
        raise AdapruneError(f"--job {job}: give {', '.join(JOBS)}")
    if job is None:
        if not running:
            raise AdapruneError(f"nothing of session {session.name!r} is running now")
        if len(running) > 1:
            raise AdapruneError(f"session {session.name!r} runs a {' and a '.join(JOBS[j] for j in running)}: "
                                f"say which with --job {' or --job '.join(running)}")
        job = next(iter(running))
    elif job not in running:
        raise AdapruneError(f"no {JOBS[job]} of session {session.name!r} is running now")
    request(session, job, command, who)
    return job, running[job]


def requested(session: Session, job: str) -> dict | None:
    """The last request for `job`: {"command", "t", "by"}, or None."""
    return _read(session).get(job)


def _since(req: dict | None, since: float | None) -> dict | None:
    """`req` if it was made since `since` (a run's start; None: unknown, any), else None (asked of an earlier run)."""
    if req is None or since is None:
        return req
    return req if isinstance(req.get("t"), (int, float)) and req["t"] >= since else None


def resume_command(name: str, job: str) -> str:
    """The command that un-pauses the session's paused `job` (a search and a benchmark may both run)."""
    return f"adaprune resume {name}" + ("" if job == "search" else f" --job {job}")


def _started(session: Session, job: str) -> float | None:
    """When the running `job` began: its lock's; a search of workers alone goes by its last run's start."""
    held = session.holder("bench") if job == "bench" else session.holder()
    if held and (job == "bench" or (held.get("what") == "recovery") == (job == "recover")):
        return held.get("since")
    return session.manifest().get("run_started") if job == "search" and not held else None


def pause_pending(session: Session, job: str) -> bool:
    """Whether the running `job` was asked to pause since it began (what `resume` can undo). Read at every poll
    of a following screen: the lock files and the manifest, never the events log."""
    since = _started(session, job)
    req = _since(requested(session, job), since if isinstance(since, (int, float)) else None)
    return req is not None and req.get("command") == "pause"


def _asker(req: dict) -> str:
    """Who asked, in words ("the app (process N)", "adaprune (process N)")."""
    host, _, pid = str(req.get("by", "")).rpartition(":")
    who = str(req.get("who", "the app"))
    here = host == socket.gethostname()
    return f"{who} (process {pid}{'' if here else f' on {host}'})" if pid else who


def _read(session: Session) -> dict:
    try:
        data = session.read_json(REQUESTS)
    except AdapruneError:
        return {}  # a damaged request file asks nothing
    return data if isinstance(data, dict) else {}


class SessionControl(Control):
    """A Control that also obeys the session's requests file: the engine's safe points pause and cancel on
    what any process asked, and the events log says so (an attached app shows it)."""

    def __init__(self, session: Session, job: str, sink: Sink = null_sink, inner: Control | None = None,
                 since: float | None = None) -> None:
        """`since`: when the run began; requests made before it were for an earlier run."""
        super().__init__()
        self.session, self.job, self.sink = session, job, sink
        self.inner = inner or Control()  # this process's own pause and cancel (an app thread, Ctrl-C)
        self.since = time.time() if since is None else since
        self.held = False  # paused by a request
        self._next = 0.0

    # this process's own requests go to the inner control
    def cancel(self) -> None:
        self.inner.cancel()

    def pause(self) -> None:
        self.inner.pause()

    def resume(self) -> None:
        self.inner.resume()

    @property
    def cancelled(self) -> bool:
        return self.inner.cancelled

    @property
    def paused(self) -> bool:
        return self.inner.paused or self.held

    def _sync(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now < self._next:
            return
        self._next = now + POLL_S
        req = _since(requested(self.session, self.job), self.since)  # None: asked of an earlier run
        command = req["command"] if req else "resume"
        if command == "cancel":
            self.sink(Log(f"{JOBS.get(self.job, self.job)} stopping at a safe point: {_asker(req)} asked to cancel",
                          "warning"))
            self.inner.cancel()
        elif command == "pause" and not self.held:
            self.held = True
            self.sink(Log(f"{JOBS.get(self.job, self.job)} paused at a safe point: {_asker(req)} asked; p in an "
                          f"app or `{resume_command(self.session.name, self.job)}` resumes it", "warning"))
        elif command in ("resume", "cancel") and self.held:
            self.held = False
            self.sink(Log(f"{JOBS.get(self.job, self.job)} resumed", "warning"))

    def checkpoint(self) -> None:
        self._sync()
        while self.held and not self.inner.cancelled:
            time.sleep(POLL_S)
            self._sync(force=True)
        if self.inner.cancelled:
            raise Cancelled("cancelled by the user")
        self.inner.checkpoint()
