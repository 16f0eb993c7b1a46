"""Typed, JSON-serialisable events through which the engine reports progress.

Every UI (the CLI's Rich output, a session's events.jsonl, the Textual app) consumes the same stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from engine.errors import Cancelled
from engine.faults import crash_point


@dataclass(frozen=True)
class Event:
    kind: ClassVar[str] = "event"
    t: float = field(default_factory=time.time, kw_only=True)
    # the process that logged it ("PID@HOST", set as a session's log writes it): viewers tell workers apart
    by: str = field(default="", kw_only=True, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, **asdict(self)}


@dataclass(frozen=True)
class StageStarted(Event):
    kind: ClassVar[str] = "stage_started"
    stage: str
    total: int | None = None
    unit: str = ""


@dataclass(frozen=True)
class StageProgress(Event):
    kind: ClassVar[str] = "stage_progress"
    stage: str
    done: int
    total: int | None = None


@dataclass(frozen=True)
class StageFinished(Event):
    kind: ClassVar[str] = "stage_finished"
    stage: str
    seconds: float
    outcome: str = "done"  # done, cancelled (a cancel or Ctrl-C) or failed (an error left the stage)
    cpu: float = 0.0  # CPU seconds of the whole process meanwhile (a stage that waits for another uses ~none)


@dataclass(frozen=True)
class Log(Event):
    kind: ClassVar[str] = "log"
    message: str
    level: str = "info"


@dataclass(frozen=True)
class Metric(Event):
    """One measured number, e.g. the PPL of the dense model on a text."""

    kind: ClassVar[str] = "metric"
    name: str
    value: float
    model: str = ""


@dataclass(frozen=True)
class TrialStarted(Event):
    kind: ClassVar[str] = "trial_started"
    number: int
    params: dict
    worker: str = ""
    baseline: bool = False  # LLM-Pruner's recipe, the row every other trial is read against


@dataclass(frozen=True)
class TrialFinished(Event):
    """A trial ended: state is complete, pruned (stopped early), duplicate (value copied) or failed."""

    kind: ClassVar[str] = "trial_finished"
    number: int
    state: str
    value: float | None
    params: dict
    seconds: float = 0.0
    objective_seconds: float = 0.0
    params_after: int = 0
    message: str = ""


@dataclass(frozen=True)
class BestChanged(Event):
    kind: ClassVar[str] = "best_changed"
    number: int
    value: float
    params: dict


@dataclass(frozen=True)
class SearchFinished(Event):
    kind: ClassVar[str] = "search_finished"
    status: str
    completed: int
    total: int
    best_number: int | None = None
    best_value: float | None = None


@dataclass(frozen=True)
class RecoveryStep(Event):
    """One optimiser step of LoRA recovery; valid_ppl is set on the steps that measure it."""

    kind: ClassVar[str] = "recovery_step"
    step: int
    total: int
    loss: float
    lr: float
    valid_ppl: float | None = None


Sink = Callable[[Event], None]


def null_sink(event: Event) -> None:
    """A sink that drops everything (the default when nobody listens)."""


EVENT_TYPES: dict[str, type[Event]] = {
    cls.kind: cls
    for cls in (StageStarted, StageProgress, StageFinished, Log, Metric, TrialStarted, TrialFinished, BestChanged,
                SearchFinished, RecoveryStep)
}


def event_from_dict(data: dict[str, Any]) -> Event:
    data = dict(data)
    data.pop("job", None)  # which job logged it (a session's log holds them all)
    cls = EVENT_TYPES[data.pop("kind")]
    return cls(**data)


class Stage:
    """Context manager that brackets a unit of work with started/finished events."""

    def __init__(self, sink: Sink, stage: str, total: int | None = None, unit: str = "") -> None:
        self.sink, self.stage, self.total, self.unit = sink, stage, total, unit
        self._t0 = self._cpu0 = 0.0

    def __enter__(self) -> Stage:
        crash_point("stage", self.stage)
        self._t0, self._cpu0 = time.perf_counter(), time.process_time()
        self.sink(StageStarted(self.stage, self.total, self.unit))
        return self

    def advance(self, done: int) -> None:
        crash_point("stage", self.stage)
        self.sink(StageProgress(self.stage, done, self.total))

    def __exit__(self, kind: type[BaseException] | None, *_: object) -> None:
        outcome = ("done" if kind is None else
                   "cancelled" if issubclass(kind, (Cancelled, KeyboardInterrupt)) else "failed")
        self.sink(StageFinished(self.stage, time.perf_counter() - self._t0, outcome,
                                time.process_time() - self._cpu0))
