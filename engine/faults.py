"""Crash points for fault-injection tests (tests/faults): the process kills itself with SIGKILL, or a write fails
as on a full disk or a read-only folder, where that would hurt most, so a test can show that nothing is lost or
half-written whatever the moment.

ADAPRUNE_KILL_AT="KIND[:MATCH][@N]" kills at the N-th (default first) point of KIND whose label contains MATCH:
- `write`: an all-or-nothing write, its new version complete under the temporary name, not yet renamed into
  place (label: the destination path);
- `event`: an event about to be appended to a session's log (label: its kind);
- `torn`: an event half-appended, the line cut in the middle, as a kill inside the write leaves it;
- `stage`: a unit of work starting or advancing (label: the stage's name), e.g. in the middle of calibration
  statistics or of an export, whether or not the process logs to a session.
ADAPRUNE_FAIL_AT="KIND[:MATCH][@N]=ERRNO" (ENOSPC, EROFS, ...) raises that OSError at the point instead.
ADAPRUNE_FAULT_LOG=FILE appends every point passed ("KIND LABEL" per line), so a test can choose its points from
a clean run. Unset, a point costs three environment lookups.
"""

from __future__ import annotations

import errno
import os
import signal

_seen: dict[tuple[str, str, str], int] = {}


def _hit(var: str, kind: str, label: str) -> str | None:
    """The value after '=' (or '') when this point is the one `var` names, else None (points are counted)."""
    spec = os.environ.get(var)
    if not spec:
        return None
    spec, _, value = spec.partition("=")
    spec, _, n = spec.partition("@")
    want, _, match = spec.partition(":")
    if want != kind or match not in label:
        return None
    key = (var, kind, match)
    _seen[key] = _seen.get(key, 0) + 1
    return value if _seen[key] == int(n or 1) else None


def due(kind: str, label: str) -> bool:
    """Whether the process is to die at this point (counted, and logged when asked)."""
    log = os.environ.get("ADAPRUNE_FAULT_LOG")
    if log:
        with open(log, "a", encoding="utf-8") as f:
            f.write(f"{kind} {label}\n")
    return _hit("ADAPRUNE_KILL_AT", kind, label) is not None


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(kind: str, label: str) -> None:
    if due(kind, label):
        die()
    code = _hit("ADAPRUNE_FAIL_AT", kind, label)
    if code is not None:
        number = getattr(errno, code)
        raise OSError(number, os.strerror(number), label)
