"""Where a session keeps what: the best plan, saved plans (and a plan's identity), the benchmark table, the
recovery's state and checkpoints. Feature modules find a session's files through these names only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from engine.errors import AdapruneError
from engine.session.records import BestRecord, RecoveryState
from engine.session.store import Session

BEST = "plan.json"  # the best trial's record (BestRecord)
RESULTS = "bench.json"
PLANS = "plans"  # user plans (the app's overrides) as <name>.json Plan dicts; rows named plan:<name>
OVERRIDES_PLAN = "overrides"  # plans/overrides.json: the last re-evaluated override plan (a benchmark row)
RECOVERY = "recovery"
ADAPTER = "adapter.safetensors"
OPTIMIZER = "optimizer.safetensors"
STATE = "state.json"


def plan_id(plan: dict | None) -> str:
    """A plan's identity (a benchmark row of another plan is another model)."""
    return "dense" if plan is None else hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


def best_record(session: Session) -> BestRecord | None:
    """The best trial so far, or None before the first completes."""
    data = session.read_json(BEST)
    return None if data is None else BestRecord.from_dict(data, f"{session.path / BEST}")


def write_best(session: Session, record: BestRecord) -> None:
    session.write_json(BEST, record.to_dict())


def save_plan(session: Session, name: str, plan: dict) -> None:
    """Save a user plan as plans/NAME.json (a benchmark row plan:NAME, a recovery's --plan plan:NAME)."""
    (session.path / PLANS).mkdir(exist_ok=True)
    session.write_json(f"{PLANS}/{name}.json", plan)


def saved_plans(session: Session) -> list[str]:
    """Names of the user plans saved in the session (plans/NAME.json)."""
    folder = session.path / PLANS
    return sorted(p.stem for p in folder.glob("*.json")) if folder.is_dir() else []


def session_plan(session: Session, which: str) -> dict:
    """The plan dict a recovery trains on: the best trial's, or a saved user plan (plans/NAME.json)."""
    if which == "best":
        best = best_record(session)
        if best is None:
            raise AdapruneError(f"session {session.name!r} has no completed trial yet: run or resume its search first")
        return best.plan
    path = session.path / PLANS / f"{which.removeprefix('plan:')}.json"
    if not path.is_file():
        names = saved_plans(session)
        raise AdapruneError(f"session {session.name!r} has no plan {which!r}: choose best"
                            + "".join(f", plan:{n}" for n in names))
    return json.loads(path.read_text(encoding="utf-8"))


def recovery_dir(session: Session) -> Path:
    return session.path / RECOVERY


def recovery_state(session: Session) -> RecoveryState | None:
    data = session.read_json(f"{RECOVERY}/{STATE}")
    return None if data is None else RecoveryState.from_dict(data, f"{recovery_dir(session) / STATE}")


def write_recovery_state(session: Session, state: RecoveryState) -> None:
    session.write_json(f"{RECOVERY}/{STATE}", state.to_dict())


def checkpoint_dir(session: Session, state: RecoveryState | None) -> Path:
    """The folder of the checkpoint `state` names (its adapter and optimiser moments)."""
    if state is None or state.checkpoint is None:  # the first layout kept one checkpoint in recovery/ itself
        return recovery_dir(session)
    return recovery_dir(session) / state.checkpoint


def adapter_id(session: Session) -> str:
    """Identifies the adapter's weights (a benchmark row of a re-trained recovery is a different model)."""
    return hashlib.sha1((checkpoint_dir(session, recovery_state(session)) / ADAPTER).read_bytes()).hexdigest()[:12]
