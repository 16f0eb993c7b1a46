"""Running a study with others: the sampler and pruner, heartbeats while a trial runs, taking trials one at
a time, and failing trials a dead process left running."""

from __future__ import annotations

import contextlib
import socket
import threading

from engine.config import SearchConfig
from engine.events import (
    Log,
    Sink,
    null_sink,
)
from engine.session.store import Session, pid_alive
from engine.session.study import open_storage, quiet_optuna, requeue, storage_url, study_name


@contextlib.contextmanager
def ask_lock(session: Session):
    """Workers on one machine take trials one at a time: SQLite has no row locks, so two processes asking at
    once can both claim the same queued trial (e.g. the baseline) and run it twice."""
    try:
        import fcntl
    except ImportError:  # not POSIX: a database server's row locks (PostgreSQL) are the safe storage there
        yield
        return
    with open(session.path / ".ask.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _beats(study):
    """The storage that keeps heartbeats, or None. Optuna records them itself only inside `study.optimize`;
    with ask/tell there is no public call, so this and `_trial_id` are the one place that reaches inside."""
    storage = study._storage
    if hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval() is not None:
        return storage
    return None


def _trial_id(trial) -> int:
    return trial._trial_id


def beat_once(study, trial) -> None:
    storage = _beats(study)
    if storage is not None:
        storage.record_heartbeat(_trial_id(trial))


@contextlib.contextmanager
def heartbeat(study, trial):
    """Record the trial's heartbeat in the background while this process works on it."""
    storage = _beats(study)
    if storage is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; the trial must not fail for it
                storage.record_heartbeat(_trial_id(trial))
            if stop.wait(storage.get_heartbeat_interval()):
                return

    thread = threading.Thread(target=beat, name=f"heartbeat-{trial.number}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def open_study(session: Session, cfg: SearchConfig, sampler_seed: int | None = None):
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # Optuna's logger must not write over the display
    storage = open_storage(storage_url(session, cfg))
    seed = cfg.seed if sampler_seed is None else sampler_seed
    sampler = (optuna.samplers.RandomSampler(seed=seed) if cfg.sampler == "random" else
               optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(8, cfg.trials // 3)),
                                          multivariate=True))
    # successive halving over the objective's batches (the resource: batches of every text done): a trial goes
    # on past 1, 2, 4... batches only while it is in the better half of the trials measured at that point.
    # Every trial reads the same windows in the same order, so one batch already ranks trials as the whole
    # objective does (bench/RESULTS.md); most trials then cost a quarter or half of an objective
    pruner = (optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2) if cfg.early_stop
              else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=study_name(session, cfg, storage), storage=storage, sampler=sampler, pruner=pruner,
                               direction="minimize", load_if_exists=True)


def fail_orphans(study, sink: Sink = null_sink) -> int:
    """Trials left RUNNING by a dead process are failed and their configuration queued again.

    Same host: the owner's pid is gone. Any host (database storages): no heartbeat for GRACE_S seconds.
    """
    import optuna
    from optuna.trial import TrialState

    host = socket.gethostname()
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        owner = t.user_attrs.get("worker", "")
        pid, _, where = owner.partition("@")
        if where != host or not pid.isdigit() or pid_alive(int(pid)):
            continue  # a live worker here, or another machine's (its heartbeat speaks for it)
        study.tell(t.number, state=TrialState.FAIL, skip_if_finished=True)
        requeue(study, t)
        n += 1
    running = {t.number for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))}
    with quiet_optuna():
        optuna.storages.fail_stale_trials(study)  # requeues through the storage's callback
    n += sum(1 for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if t.number in running)
    if n:
        sink(Log(f"{n} trial(s) left running by a stopped process were marked failed and will run again"))
    return n

