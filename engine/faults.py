"""Crash points for fault-injection tests (tests/faults): the process kills itself with SIGKILL where a real crash
would hurt most, so a test can show that nothing is lost or half-written whatever the moment.

ADAPRUNE_KILL_AT="KIND[:MATCH][@N]" kills at the N-th (default first) point of KIND whose label contains MATCH:
- `write`: an all-or-nothing write, its new version complete under the temporary name, not yet renamed into
  place (label: the destination path);
- `event`: an event about to be appended to a session's log (label: its kind);
- `torn`: an event half-appended, the line cut in the middle, as a kill inside the write leaves it;
- `stage`: a unit of work starting or advancing (label: the stage's name), e.g. in the middle of calibration
  statistics or of an export, whether or not the process logs to a session.
ADAPRUNE_FAULT_LOG=FILE appends every point passed ("KIND LABEL" per line), so a test can choose its points from
a clean run. Unset, a point costs two environment lookups.
"""

from __future__ import annotations

import os
import signal

_seen: dict[tuple[str, str], int] = {}


def _target() -> tuple[str, str, int] | None:
    spec = os.environ.get("ADAPRUNE_KILL_AT")
    if not spec:
        return None
    spec, _, n = spec.partition("@")
    kind, _, match = spec.partition(":")
    return kind, match, int(n or 1)


def due(kind: str, label: str) -> bool:
    """Whether the process is to die at this point (counted, and logged when asked)."""
    log = os.environ.get("ADAPRUNE_FAULT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{kind} {label}\n")
    target = _target()
    if target is None or target[0] != kind or target[1] not in label:
        return False
    key = target[:2]
    _seen[key] = _seen.get(key, 0) + 1
    return _seen[key] == target[2]


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(kind: str, label: str) -> None:
    if due(kind, label):
        die()
