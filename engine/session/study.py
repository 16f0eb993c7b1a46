"""A session's Optuna study on disk: where it is stored, how it is opened, and what it says (trials counted,
the best). Database storages keep heartbeats, so a trial whose worker died is failed and queued again."""

from __future__ import annotations

import contextlib
import warnings

from engine.config import SearchConfig
from engine.errors import AdapruneError
from engine.session.store import Session


def storage_url(session: Session, cfg: SearchConfig) -> str:
    return cfg.storage or f"sqlite:///{(session.path / 'study.db').resolve()}"


HEARTBEAT_S = 20  # a running trial's owner records a heartbeat this often (database storages)


GRACE_S = 120  # a running trial without a heartbeat this long belongs to a dead process, on any host


def study_name(session: Session, cfg: SearchConfig, storage) -> str:
    """The session's study in its storage. A session folder copied under another name (`cp -r a b`) keeps
    its own SQLite file, whose single study is named after the original: that one is the session's."""
    import optuna

    name = session.study_name
    if cfg.storage:
        return name  # a shared database: the recorded name, exactly
    names = optuna.study.get_all_study_names(storage)
    return names[0] if name not in names and len(names) == 1 else name


def open_storage(url: str):
    """SQLite or PostgreSQL by URL; a journal file (one machine, many processes) by a *.log path.

    Database storages keep Optuna's trial heartbeats, so a trial whose worker died on another machine is
    failed and queued again by whichever process looks next; the journal file relies on same-host pids.
    """
    import optuna

    if url.endswith((".log", ".journal")) and "://" not in url:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(url))
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    try:
        with quiet_optuna():
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=requeue)
    except Exception as e:
        raise AdapruneError(f"cannot open the study storage {url!r} ({type(e).__name__}): check the URL") from None


@contextlib.contextmanager
def quiet_optuna():
    """Heartbeats are experimental in Optuna and it warns when they are used with ask/tell, as we do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Hh]eartbeat.*")
        warnings.filterwarnings("ignore", category=optuna_experimental_warning())
        yield


def optuna_experimental_warning() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def rerun_attrs(trial) -> dict:
    """A re-queued trial remembers what it reruns, and stays the baseline if it was (trial 0 may be rerun)."""
    return {"rerun_of": trial.number, **({"baseline": True} if trial.user_attrs.get("baseline") else {})}


def requeue(study, trial) -> None:
    # a trial stopped before it drew its parameters still holds what the queue gave it (e.g. the baseline)
    params = trial.params or trial.system_attrs.get("fixed_params")
    if params and "duplicate_of" not in trial.user_attrs:
        study.enqueue_trial(params, user_attrs=rerun_attrs(trial))


def counts_toward_budget(t) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) and \
        "duplicate_of" not in t.user_attrs


def trial_state(study, number: int):
    """A trial's state as the storage has it now (another process may have closed it)."""
    return study.get_trials(deepcopy=False)[number].state


def completed(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "duplicate_of" not in t.user_attrs)


def best_trial(study) -> tuple[int, float] | None:
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    t = min(done, key=lambda t: t.value)
    return t.number, t.value

