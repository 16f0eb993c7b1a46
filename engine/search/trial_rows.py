"""The search's trials as rows, folded from engine events: what the CLI's live table and the app both show.

Plain data with no UI library, so any front end (Rich, Textual, a test) renders the same state, whether the
events arrive live from `run_search` or are replayed from a session's events.jsonl.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.events import BestChanged, Event, TrialFinished, TrialStarted


@dataclass
class TrialRow:
    number: int
    params: dict
    state: str = "running"  # running, complete, pruned (stopped early), duplicate, failed
    value: float | None = None
    seconds: float = 0.0
    params_after: int = 0
    worker: str = ""
    message: str = ""
    baseline: bool = False


@dataclass
class TrialRows:
    rows: dict[int, TrialRow] = field(default_factory=dict)
    best: int | None = None
    best_history: list[tuple[int, float]] = field(default_factory=list)  # (trial, best value) at each improvement

    def apply(self, event: Event) -> bool:
        """Fold one event in; True when it changed a row."""
        if isinstance(event, TrialStarted):
            self.rows[event.number] = TrialRow(event.number, event.params, worker=event.worker,
                                               baseline=event.baseline)
        elif isinstance(event, TrialFinished):
            row = self.rows.setdefault(event.number, TrialRow(event.number, event.params))
            row.state, row.value, row.seconds = event.state, event.value, event.seconds
            row.params_after, row.message = event.params_after, event.message
        elif isinstance(event, BestChanged):
            self.best = event.number
            self.best_history.append((event.number, event.value))
        else:
            return False
        return True

    @property
    def baseline(self) -> TrialRow | None:
        """LLM-Pruner's recipe, every other trial read against it: trial 0, or its rerun if trial 0 failed
        (logs from before the flag existed: trial 0)."""
        flagged = [r for r in self.rows.values() if r.baseline and r.state != "failed"]
        return flagged[-1] if flagged else self.rows.get(0)

    def is_baseline(self, row: TrialRow) -> bool:
        return row is self.baseline

    def gain(self, row: TrialRow) -> float | None:
        """How much lower the row's objective is than the baseline's (0.25: 25% lower)."""
        base = self.baseline
        if row.value is None or base is None or base.value is None or row.state in ("pruned", "failed"):
            return None
        return 1 - row.value / base.value

    def shown(self, limit: int) -> list[TrialRow]:
        """At most `limit` rows for a small screen: the baseline and the best always, then the latest."""
        base = self.baseline
        pinned = [n for n in (base.number if base else None, self.best) if n is not None and n in self.rows]
        latest = [n for n in sorted(self.rows, reverse=True) if n not in pinned]
        keep = set(pinned) | set(latest[: max(0, limit - len(set(pinned)))])
        return [self.rows[n] for n in sorted(keep)]
