"""Which rows of a session's benchmark table describe a model the session no longer has: the best plan changed (a
new best trial), a saved plan was re-saved or removed, the LoRA recovery was trained again or discarded. The
table keeps their numbers (they were true of that model) and says so; `bench` measures them again."""

from __future__ import annotations

from engine.errors import AdapruneError
from engine.session.layout import adapter_id, best_record, plan_id, recovery_state, saved_plans, session_plan
from engine.session.store import Session


def row_identity(session: Session, name: str, plan: dict | None) -> str:
    """What a row's numbers are of: its plan, and for `recovered` the adapter too."""
    return plan_id(plan) + (f"+lora-{adapter_id(session)}" if name == "recovered" else "")


def outdated_rows(session: Session, results: dict) -> dict[str, str]:
    """{row: why} for the rows whose model changed since they were measured (the rows the session can name
    without a model: best, recovered, plan:NAME)."""
    out = {}
    for name, row in results.get("rows", {}).items():
        try:
            why = _why(session, name, row.get("plan_id"))
        except (AdapruneError, OSError, KeyError):
            why = "what it measured cannot be read any more"
        if why:
            out[name] = why
    return out


def _why(session: Session, name: str, measured: str | None) -> str | None:
    if name == "best":
        best = best_record(session)
        return None if best and plan_id(best.plan) == measured else "a new best trial since"
    if name.startswith("plan:"):
        if name.removeprefix("plan:") not in saved_plans(session):
            return f"{name} is no longer saved"
        return None if plan_id(session_plan(session, name)) == measured else f"{name} was saved again since"
    if name == "recovered":
        state = recovery_state(session)
        if state is None:
            return "its LoRA recovery was discarded"
        if state.status != "done":
            return f"its LoRA recovery was trained again ({state.status} now)"
        plan = session_plan(session, state.plan)
        return None if row_identity(session, name, plan) == measured else "its LoRA recovery was trained again"
    return None
