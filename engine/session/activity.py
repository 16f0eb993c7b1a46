"""Who is doing what: each process's open stages, folded from a session's events log.

Every line a process writes to `events.jsonl` names it (`by`: "PID@HOST"), so a viewer in another process (an
attached app, `adaprune sessions`) can tell two workers' stages apart instead of mixing them in one bar. Stages
nest (a calibration pool holds its reconstruction statistics), so each process keeps a stack; the innermost
open stage is what it is doing. A stage first seen through its progress (its start fell before the part of the
log that was read) counts as open too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from engine.events import Event
from engine.files import pid_alive

OUTER = "trials"  # the search's own budget bar: the trial, not this, says what a worker is doing


HOST = socket.gethostname()


def me() -> str:
    """This process, as its events (and its trials' owner) name it: the pid read each time, a forked child is
    another process."""
    return f"{os.getpid()}@{HOST}"


def _gone(by: str) -> bool:
    """A process of this host that no longer runs (another host's can't be told: never gone)."""
    pid, _, where = by.partition("@")
    return where == HOST and pid.isdigit() and not pid_alive(int(pid))


@dataclass
class OpenStage:
    stage: str
    done: int = 0
    total: int | None = None
    since: float = 0.0


@dataclass
class Doing:
    """One process's innermost open stage and the trial it is on (None: between trials or not a search)."""

    by: str
    job: str
    stage: OpenStage | None
    trial: int | None

    def line(self, here: str | None = None) -> str:
        """'process 123 (trial 4): per-sample statistics self x64 12/64', the host named when not this one."""
        pid, _, host = self.by.partition("@")
        who = f"process {pid}" + ("" if host in ("", here or HOST) else f" on {host}")
        what = f"trial {self.trial}" if self.trial is not None else self.job
        who += f" ({what})" if what else ""
        if self.stage is None:
            return who
        s = self.stage
        count = f" {s.done}/{s.total}" if s.total else ""
        return f"{who}: {s.stage}{count}"


@dataclass
class Activity:
    """Fold of event dicts (as the log holds them) into each process's open stages, in the order they came."""

    stacks: dict[str, list[OpenStage]] = field(default_factory=dict)
    trials: dict[str, int | None] = field(default_factory=dict)
    jobs: dict[str, str] = field(default_factory=dict)
    ended: set[str] = field(default_factory=set)

    def apply(self, e: Mapping | Event) -> None:
        if isinstance(e, Event):
            e = e.to_dict()
        by, kind = str(e.get("by", "")), e.get("kind")
        stack = self.stacks.setdefault(by, [])
        self.jobs[by] = str(e.get("job") or self.jobs.get(by, ""))
        self.ended.discard(by)
        if kind == "stage_started":
            stack.append(OpenStage(str(e["stage"]), 0, e.get("total"), float(e.get("t", 0.0))))
        elif kind == "stage_progress":
            for s in reversed(stack):
                if s.stage == e["stage"]:
                    s.done, s.total = int(e["done"]), e.get("total")
                    break
            else:
                stack.append(OpenStage(str(e["stage"]), int(e["done"]), e.get("total"), float(e.get("t", 0.0))))
        elif kind == "stage_finished":
            for k in range(len(stack) - 1, -1, -1):
                if stack[k].stage == e["stage"]:
                    del stack[k:]  # stages inside it ended with it (a failure unwinds them all)
                    break
        elif kind == "trial_started":
            self.trials[by] = int(e["number"])
        elif kind == "trial_finished" and self.trials.get(by) == e.get("number"):
            self.trials[by] = None
        elif kind == "search_finished":
            self.stacks[by], self.trials[by] = [], None
            self.ended.add(by)

    def feed(self, events: Iterable[Mapping | Event]) -> Activity:
        for e in events:
            self.apply(e)
        return self

    def live(self, job: str | None = None) -> list[str]:
        """Processes of this host (of `job`) that wrote to the log, have not said their search ended, and run:
        e.g. `adaprune worker` processes, which hold no lock (another host's can't be checked: left out)."""
        return [by for by in self.stacks if by not in self.ended and by.endswith("@" + HOST)
                and by.partition("@")[0].isdigit() and (not job or self.jobs.get(by) == job) and not _gone(by)]

    def doing(self, alive_only: bool = True) -> list[Doing]:
        """Processes with an open stage or trial, most recently started stage first. `alive_only` drops those
        this host can tell are gone (a process killed mid-stage never closes it)."""
        out = []
        for by, stack in self.stacks.items():
            if by in self.ended:
                continue
            inner = next((s for s in reversed(stack) if s.stage != OUTER), None)
            trial = self.trials.get(by)
            if inner is None and trial is None:
                continue
            if alive_only and _gone(by):
                continue
            out.append(Doing(by, self.jobs.get(by, ""), inner, trial))
        return sorted(out, key=lambda d: -(d.stage.since if d.stage else 0.0))
