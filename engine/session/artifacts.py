"""One builder per one-time artifact of a session (a calibration pool, an objective text, the self-sampled text,
per-sample statistics, obs scores): the process that needs it first builds it under a lock in stats/, and
every other process (a worker started beside the driver) waits for that file instead of building it again.

A lock whose holder died on this machine is taken over; one held on another machine is waited for (as with
the session's own lock, a remote death is not seen here)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

from engine.control import Control
from engine.events import Log, Sink
from engine.files import pid_alive
from engine.session.store import Session

POLL_S = 0.5
YOUNG_S = 10.0  # a lock file with no holder written yet is being created, unless it is older than this


def _holder(path) -> tuple[dict, float]:
    age = 0.0
    try:
        age = time.time() - path.stat().st_mtime
        return json.loads(path.read_text(encoding="utf-8")), age
    except FileNotFoundError:
        return {"gone": True}, 0.0
    except (OSError, ValueError):
        return {}, age


@contextlib.contextmanager
def build_lock(session: Session, name: str, sink: Sink, control: Control) -> Iterator[None]:
    """Hold the lock to build stats/NAME; while another live process holds it, wait (saying for whom). The
    caller checks again, once inside, whether the other process built it meanwhile."""
    path = session.stats_dir / f"{name}.lock"
    host = socket.gethostname()
    said = False
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            holder, age = _holder(path)
            if holder.get("gone"):
                continue  # released between our open and our read
            pid, where = holder.get("pid"), holder.get("host")
            if (isinstance(pid, int) and where == host and not pid_alive(pid)) or (
                    not isinstance(pid, int) and age > YOUNG_S):
                path.unlink(missing_ok=True)  # its builder died: take over
                continue
            if not said:
                who = f"process {pid}" + ("" if where == host else f" on {where}") if isinstance(pid, int) \
                    else "another process"
                sink(Log(f"waiting for {who} to build {name} (built once per session)"))
                said = True
            control.checkpoint()
            time.sleep(POLL_S)
            continue
        with os.fdopen(fd, "w") as f:
            json.dump({"pid": os.getpid(), "host": host, "since": time.time()}, f)
        break
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
