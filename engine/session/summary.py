"""One row of the sessions table, read from a session's files (a damaged session still gets its row)."""

from __future__ import annotations

from engine.config import SearchConfig
from engine.errors import AdapruneError
from engine.session.layout import recovery_state
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
    row = {"name": session.name, "model": cfg.model, "prune": cfg.prune, "trials": cfg.trials,
           "status": status, "updated": m.get("updated"), "done": 0, "best": None}
    try:
        rec = recovery_state(session)
    except AdapruneError:
        rec = {"status": "unreadable", "step": 0, "config": {"steps": 0}}
    if rec is not None:  # the LoRA recovery, when there is one: "done", or e.g. "stopped 40/100"
        row["recovery"] = rec["status"] if rec["status"] == "done" else \
            f"{rec['status']} {rec['step']}/{rec['config']['steps']}"
    _, bad = session.read_events()
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
        b = best_trial(study)
        row["best"] = b[1] if b else None
    except Exception as e:  # a session whose study cannot be read still lists
        row["status"] = f"{row['status']} (study unreadable: {type(e).__name__})"
    return row

