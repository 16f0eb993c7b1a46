"""One row of the sessions table, read from a session's files (a damaged session still gets its row)."""

from __future__ import annotations

from engine.config import SearchConfig
from engine.errors import AdapruneError
from engine.session.activity import HOST, Activity
from engine.session.layout import recovery_state
from engine.session.requests import pause_pending
from engine.session.store import Session
from engine.session.study import best_trial, completed, open_storage, storage_url, study_name


def summary(session: Session) -> dict:
    """One row of the sessions table; a session whose files are damaged still gets a row saying so."""
    try:
        m = session.manifest()
        cfg = SearchConfig.from_dict(m["config"])
    except AdapruneError as e:
        return {"name": session.name, "model": "?", "prune": 0.0, "trials": 0, "status": "unreadable",
                "updated": None, "done": 0, "best": None, "problem": str(e)}
    status = m.get("status", "?")
    if status == "running" and session.holder() is None:
        status = "stopped"  # its process was killed (kill -9, a reboot) before it could say so; resumable
    elif status == "running" and pause_pending(session, "search"):
        status = "paused"
    row = {"name": session.name, "model": cfg.model, "prune": cfg.prune, "trials": cfg.trials,
           "status": status, "updated": _last_change(session, m), "done": 0, "best": None}
    try:
        rec = recovery_state(session)
    except AdapruneError:
        rec = {"status": "unreadable", "step": 0, "config": {"steps": 0}}
    if rec is None and (session.holder() or {}).get("what") == "recovery":  # before its first checkpoint
        row["recovery"] = "paused" if pause_pending(session, "recover") else "running"
    elif rec is not None:  # the LoRA recovery, when there is one: "done", or e.g. "stopped 40/100"
        said = rec["status"]
        if said == "running" and (session.holder() or {}).get("what") != "recovery":
            said = "stopped"  # killed before it could say so; `recover --resume` goes on from its checkpoint
        elif said == "running" and pause_pending(session, "recover"):
            said = "paused"
        row["recovery"] = said if said == "done" else f"{said} {rec['step']}/{rec['config']['steps']}"
    events, bad = session.read_events()
    activity = Activity().feed(events)
    doing = activity.doing()
    if status in ("created", "stopped", "cancelled") and activity.live("search"):
        # run by workers alone (`adaprune worker` on a session no driver runs): they obey pause as a driver does
        status = "paused" if pause_pending(session, "search") else "running"
        row["status"] = status
    busy = status in ("running", "paused") or row.get("recovery", "").startswith(("running", "paused"))
    # what each live process of the session is doing (workers beside the search, a recovery, a benchmark);
    # one on another host can't be checked for life, so it is listed only while the session says it runs
    row["doing"] = [d.line() for d in doing if busy or d.by.endswith("@" + HOST)]
    if bad:
        shown = ", ".join(map(str, bad[:5])) + (" ..." if len(bad) > 5 else "")
        row["problem"] = f"{session.events_path}: line(s) {shown} corrupt, kept out; the other events are intact"
    if not cfg.storage and not (session.path / "study.db").is_file():
        return row  # listing never writes: no study file yet (or a folder still being copied) is 0 trials
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        storage = open_storage(storage_url(session, cfg))
        study = optuna.load_study(study_name=study_name(session, cfg, storage), storage=storage)
        row["done"] = completed(study)
        if row["status"] == "created" and row["done"]:
            row["status"] = "stopped"  # trials ran (workers alone, since gone) and nobody said it ended
        b = best_trial(study)
        row["best"] = b[1] if b else None
    except Exception as e:  # a session whose study cannot be read still lists
        row["status"] = f"{row['status']} (study unreadable: {type(e).__name__})"
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
