"""One row of the sessions table, read from a session's files (a damaged session still gets its row)."""

from __future__ import annotations

from engine.config import SearchConfig
from engine.errors import AdapruneError
from engine.session.activity import HOST, Activity
from engine.session.layout import best_record, recovery_state
from engine.session.records import SessionRow
from engine.session.requests import pause_pending
from engine.session.store import Session
from engine.session.study import best_trial, completed, open_storage, storage_url, study_name


def summary(session: Session) -> SessionRow:
    """One row of the sessions table; a session whose files are damaged still gets a row saying so."""
    try:
        m = session.manifest()
        cfg = SearchConfig.from_dict(m["config"])
    except AdapruneError as e:
        return SessionRow(session.name, "?", 0.0, 0, "unreadable", problem=str(e))
    status = m.get("status", "?")
    if status == "running" and session.holder() is None:
        status = "stopped"  # its process was killed (kill -9, a reboot) before it could say so; resumable
    elif status == "running" and pause_pending(session, "search"):
        status = "paused"
    row = SessionRow(session.name, cfg.model, cfg.prune, cfg.trials, status, _last_change(session, m))
    try:
        best_record(session)  # a damaged plan.json is said in the list, not only when the session is opened
    except AdapruneError as e:
        row.add_problem(str(e))
    try:
        rec = recovery_state(session)
    except AdapruneError as e:
        rec, row.recovery = None, "unreadable"
        row.add_problem(str(e))
    if rec is None and (session.holder() or {}).get("what") == "recovery":  # before its first checkpoint
        row.recovery = "paused" if pause_pending(session, "recover") else "running"
    elif rec is not None:  # the LoRA recovery, when there is one: "done", or e.g. "stopped 40/100"
        if rec.status == "running" and (session.holder() or {}).get("what") != "recovery":
            rec.status = "stopped"  # killed before it could say so; `recover --resume` goes on from its checkpoint
        elif rec.status == "running" and pause_pending(session, "recover"):
            rec.status = "paused"
        row.recovery = rec.progress()
    events, bad = session.read_events()
    activity = Activity().feed(events)
    doing = activity.doing()
    if status in ("created", "stopped", "cancelled") and activity.live("search"):
        # run by workers alone (`adaprune worker` on a session no driver runs): they obey pause as a driver does
        status = "paused" if pause_pending(session, "search") else "running"
        row.status = status
    busy = status in ("running", "paused") or (row.recovery or "").startswith(("running", "paused"))
    # what each live process of the session is doing (workers beside the search, a recovery, a benchmark);
    # one on another host can't be checked for life, so it is listed only while the session says it runs
    row.doing = [d.line() for d in doing if busy or d.by.endswith("@" + HOST)]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        row.add_problem(f"{session.events_path}: line(s) {shown} corrupt, kept out; the other events are intact")
    if not cfg.storage and not (session.path / "study.db").is_file():
        return row  # listing never writes: no study file yet (or a folder still being copied) is 0 trials
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        storage = open_storage(storage_url(session, cfg))
        study = optuna.load_study(study_name=study_name(session, cfg, storage), storage=storage)
        row.done = completed(study)
        if row.status == "created" and row.done:
            row.status = "stopped"  # trials ran (workers alone, since gone) and nobody said it ended
        b = best_trial(study)
        row.best = b[1] if b else None
    except Exception as e:  # a session whose study cannot be read still lists
        row.status = f"{row.status} (study unreadable: {type(e).__name__})"
    return row



def _last_change(session: Session, manifest: dict) -> float | None:
    """When anything of the session last changed: its manifest, or its events log, which every job (search,
    recovery, benchmark, re-evaluation) appends to as it works."""
    try:
        logged = session.events_path.stat().st_mtime
    except OSError:
        logged = None
    times = [t for t in (manifest.get("updated"), logged) if isinstance(t, (int, float))]
    return max(times) if times else None
