"""Adaptive search (AdaPruner): TPE over calibration data x importance metric x allocation, in a session.

Each trial prunes a copy of the dense model with one configuration and scores it by the objective: the
geometric mean of the pruned model's PPL over several validation domains (held-out built-in text and text
sampled from the dense model by default), evaluated progressively so successive halving can stop a
hopeless trial early. Trial 0 is LLM-Pruner's recipe, enqueued, so every later trial is read against it.
"""

from __future__ import annotations

import contextlib
import gc
import os
import time
from dataclasses import asdict
from pathlib import Path

import torch

from engine.config import SEARCH_METRICS, SearchConfig
from engine.control import Control
from engine.errors import AdapruneError, Cancelled
from engine.events import (
    BestChanged,
    Log,
    SearchFinished,
    Sink,
    StageFinished,
    StageProgress,
    StageStarted,
    TrialFinished,
    TrialStarted,
    null_sink,
)
from engine.model.load import Loaded, announce_memory, load_configured, num_layers
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.prune.plan import parse_overrides
from engine.prune.slicing import shared_copy
from engine.search.data import SearchData
from engine.search.params import TrialParams
from engine.search.space import baseline_params, canonical, space, suggest, validate, warm_start_params
from engine.search.study import ask_lock, beat_once, fail_orphans, heartbeat, open_study
from engine.search.trial import TrialOutcome, prune_trial, run_trial
from engine.session import requests
from engine.session.activity import me
from engine.session.layout import BEST, best_record, write_best
from engine.session.records import BestRecord
from engine.session.store import Session
from engine.session.study import (
    best_trial,
    completed,
    counts_toward_budget,
    quiet_optuna,
    rerun_attrs,
    storage_url,
    trial_state,
)

MAX_DUPLICATES_IN_A_ROW = 25
WAIT_S = 0.5  # how often a worker looks again while the others' running trials fill the budget
MAX_FAILURES_IN_A_ROW = 5  # then the cause is not the configuration: stop and say why


def free_memory() -> None:
    """Give back what a failed trial held (its model copy and activations) before the next one starts."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class _Driver:
    """One process's part of a session's study: claim a trial, reuse a repeated configuration's value, or
    evaluate it, and record the result. Several processes (workers) may drive the same study at once."""

    def __init__(self, session: Session, cfg: SearchConfig, study, dense: Loaded, data: SearchData, sp: dict,
                 sink: Sink, control: Control) -> None:
        self.session, self.cfg, self.study, self.dense, self.data, self.sp = session, cfg, study, dense, data, sp
        self.sink, self.control = sink, control
        self.me = me()
        self.current = None  # the trial this process holds, to be failed and queued again if interrupted
        self.duplicates_in_a_row = 0
        self.failures_in_a_row = 0

    def budget_spent(self, before: int | None = None, running: bool = True) -> bool:
        """Whether the trials so far (with `running`, those other processes are evaluating too) fill the budget."""
        from optuna.trial import TrialState

        trials = self.study.get_trials(deepcopy=False)
        return sum(1 for t in trials if (before is None or t.number < before) and counts_toward_budget(t)
                   and (running or t.state != TrialState.RUNNING)) >= self.cfg.trials

    def claim(self):
        """Ask for the next trial, owned by this process from its first moment; None when the budget is spent
        (another worker may take the last slot between our count and our ask)."""
        from optuna.trial import TrialState

        fail_orphans(self.study, self.sink)
        with ask_lock(self.session), quiet_optuna():
            trial = self.study.ask()
            trial.set_user_attr("worker", self.me)  # orphans are found by owner
            beat_once(self.study, trial)  # a worker killed before its first trial heartbeat is still found
        self.current = trial
        if self.budget_spent(before=trial.number):
            trial.set_user_attr("over_budget", True)
            self.close(TrialState.FAIL)
            return None
        return trial

    def close(self, state, value: float | None = None) -> None:
        self.study.tell(self.current, value, state=state)
        self.current = None

    def reuse(self, trial, params: dict) -> bool:
        """TPE proposes configurations it has seen: a finished twin's value is reused at no cost, and one
        another worker is evaluating right now is left to it. True when the trial needs no evaluation."""
        from optuna.trial import TrialState

        key = canonical(params, self.cfg.overrides)
        trial.set_user_attr("key", key)
        earlier = [t for t in self.study.get_trials(deepcopy=False) if t.number < trial.number]
        twin = next((t for t in earlier if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                     and t.user_attrs.get("key") == key), None)
        if twin is None:
            if any(t.state == TrialState.RUNNING and t.user_attrs.get("key") == key for t in earlier):
                trial.set_user_attr("duplicate_of", "running")
                self.close(TrialState.FAIL)
                return True
            self.duplicates_in_a_row = 0
            return False
        trial.set_user_attr("duplicate_of", twin.number)
        if twin.state == TrialState.COMPLETE:
            self.close(TrialState.COMPLETE, twin.value)
        else:  # stopped early before: stopped again, without running
            self.close(TrialState.PRUNED)
        self.sink(TrialFinished(trial.number, "duplicate", twin.value, params, message=f"same as trial {twin.number}"))
        self.duplicates_in_a_row += 1
        return True

    def evaluate(self, trial, params: dict) -> TrialOutcome | None:
        """Run the trial here; None when it could not be built or another process closed it meanwhile."""
        from optuna.trial import TrialState

        self.sink(TrialStarted(trial.number, params, self.me, bool(trial.user_attrs.get("baseline"))))

        baseline = bool(trial.user_attrs.get("baseline"))

        def report(done: int, value: float) -> bool:
            trial.report(value, done)
            # the baseline is measured whole (every trial reads against it) but stands in the pruner's rungs
            return trial.should_prune() and not baseline

        try:
            with heartbeat(self.study, trial):
                out = run_trial(self.dense, self.data, self.cfg, TrialParams.from_dict(params), report, self.control,
                                self.sink)
        except (AdapruneError, torch.OutOfMemoryError, MemoryError) as e:
            # this configuration cannot be built (e.g. an unreachable split) or does not fit: the search goes on
            reason = str(e) if isinstance(e, AdapruneError) else f"out of memory: {str(e)[:200]}"
            del e
            free_memory()
            trial.set_user_attr("error", reason)
            self.close(TrialState.FAIL)
            self.sink(TrialFinished(trial.number, "failed", None, params, message=reason))
            self.failures_in_a_row += 1
            return None
        self.failures_in_a_row = 0
        if trial_state(self.study, trial.number) != TrialState.RUNNING:
            # another process judged this trial dead and failed it (its configuration is queued again)
            self.sink(Log(f"trial {trial.number} was closed by another process while it ran here; its result "
                          f"is dropped", "warning"))
            self.current = None
            return None
        return out

    def record(self, trial, params: dict, out: TrialOutcome) -> None:
        from optuna.trial import TrialState

        trial.set_user_attr("seconds", out.seconds)
        trial.set_user_attr("objective_seconds", out.objective_seconds)
        trial.set_user_attr("params_after", out.params_after)
        if out.accuracy is not None:
            trial.set_user_attr("objective_accuracy", out.accuracy)
        state = TrialState.PRUNED if out.state == "pruned" else TrialState.COMPLETE
        self.close(state, out.value if state == TrialState.COMPLETE else None)
        self.sink(TrialFinished(trial.number, out.state, out.value, params, out.seconds, out.objective_seconds,
                                out.params_after, out.message))
        if state == TrialState.COMPLETE and best_trial(self.study) == (trial.number, out.value):
            write_best(self.session, BestRecord(trial.number, out.value, params, out.plan))
            self.sink(BestChanged(trial.number, out.value, params))

    def run(self) -> None:
        """Trials until the budget is spent (or the sampler only repeats itself)."""
        while True:
            self.control.checkpoint()
            if self.budget_spent(running=False):
                return
            if self.budget_spent():
                # the trials other workers run fill the budget, unless one turns out a duplicate or dies:
                # wait for them rather than leave the search one trial short
                fail_orphans(self.study, self.sink)
                time.sleep(WAIT_S)
                continue
            trial = self.claim()
            if trial is None:  # another worker took the last slot meanwhile: look again
                continue
            params = suggest(trial, self.sp, self.cfg.fixed)
            if self.reuse(trial, params):
                if self.duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                    self.sink(Log("the sampler keeps proposing evaluated configurations: the space looks exhausted",
                                  "warning"))
                    return
                continue
            out = self.evaluate(trial, params)
            if out is not None:
                self.record(trial, params, out)
            elif self.failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
                raise AdapruneError(f"{self.failures_in_a_row} trials in a row failed (the last: "
                                    f"{trial.user_attrs.get('error', 'closed elsewhere')}): fix that, then resume")
            self.sink(StageProgress("trials", completed(self.study), self.cfg.trials))

    def release(self) -> None:
        """Interrupted mid-trial: fail the trial held here and queue its configuration, so a resume runs it."""
        if self.current is None:
            return
        from optuna.trial import TrialState

        with contextlib.suppress(Exception):
            self.study.tell(self.current, state=TrialState.FAIL)
            self.study.enqueue_trial(self.current.params, user_attrs=rerun_attrs(self.current))
        # its row must not stay "running" in a table that follows the log
        self.sink(TrialFinished(self.current.number, "failed", None, self.current.params,
                                message="interrupted: its configuration runs again when the search resumes"))
        self.current = None


def settle_best(session: Session, cfg: SearchConfig, study, dense: Loaded, data: SearchData, sp: dict,
                sink: Sink, control: Control) -> None:
    """Make plan.json name the study's best trial. A process killed between a trial's result and the write of
    its plan leaves a best without a plan: the plan is rebuilt (the trial's pruning, not its objective)."""
    b = best_trial(study)
    try:
        record, why = best_record(session), "was not saved (its process stopped in between)"
    except AdapruneError:  # damaged: what it held comes from the study, so it is rebuilt like a missing one
        record, why = None, f"({BEST}) cannot be read"
    if b is None or (record is not None and record.trial == b[0]):
        return
    frozen = next(t for t in study.get_trials(deepcopy=False) if t.number == b[0])
    params = suggest(frozen, sp, cfg.fixed)
    sink(Log(f"trial {b[0]} is the best but its plan {why}: rebuilding it"))
    model = shared_copy(dense.model)
    plan, _ = prune_trial(model, data, cfg, TrialParams.from_dict(params), control, sink)
    write_best(session, BestRecord(b[0], b[1], params, plan))


def _already_done(session: Session) -> dict | None:
    """A search that has run all its trials and saved its best has nothing to resume: say so without loading
    the model (and without turning its status into "cancelled" when the user stops that load)."""
    cfg = SearchConfig.from_dict(session.config())
    study = open_study(session, cfg)
    done, b = completed(study), best_trial(study)
    try:
        record = best_record(session)
    except AdapruneError:  # a damaged plan.json is rebuilt from the study once the model is loaded
        return None
    if done < cfg.trials or b is None or record is None or record.trial != b[0]:
        return None
    if session.manifest().get("status") != "done":
        session.update(status="done")
    return {"completed": done, "best": b, "already_done": True}


def _prepare(session: Session, sink: Sink) -> tuple[SearchConfig, Loaded, dict]:
    """The session's configuration, checked once without and once with the model; the dense model; the space."""
    cfg = SearchConfig.from_dict(session.config())
    validate(cfg)
    announce_memory(cfg, "search", set(cfg.metrics or SEARCH_METRICS), cfg.repair_sources != [], sink,
                    repair_cache=cfg.repair_cache_gb * 2**30)
    dense = load_configured(cfg, sink, frozen=True)
    n_layers = len(decoder_layers(dense.model))
    validate(cfg, n_layers)
    parse_overrides(cfg.overrides, n_layers, layer_shapes(dense.model), cfg.head_mode)  # refuse bad ones now
    return cfg, dense, space(cfg, n_layers)


def run_search(session: Session, sink: Sink = null_sink, control: Control | None = None,
               worker: bool = False, since: float | None = None) -> dict:
    """Drive (or, as a worker, join) the session's study until its trial budget is spent. `since`: when
    this run was asked for (a process's start); pause and cancel requests from before it are not for it."""
    if not worker:
        done = _already_done(session)
        if done is not None:
            return done
    sink = session.logged(sink, "search")
    # pause and cancel from any process (an app attached later, after the terminal that started it is gone);
    # what was asked of an earlier run is not for this one (workers go by their driver's start)
    since = time.time() if since is None else since
    if worker:
        since = float(session.manifest().get("run_started", since))
    else:
        session.update(run_started=since)
    control = requests.SessionControl(session, "search", sink, control, since)
    cfg, dense, sp = _prepare(session, sink)
    study = open_study(session, cfg, None if not worker else cfg.seed + os.getpid())
    if not worker:
        fail_orphans(study, sink)
        session.update(status="running", storage=storage_url(session, cfg), dense_params=count_params(dense.model))
    status, started = "done", time.perf_counter()

    def ended() -> tuple[int, tuple | None]:
        done, b = completed(study), best_trial(study)
        if not worker:
            session.update(status=status if status != "done" or done >= cfg.trials else "stopped")
        elif session.holder() is None and (status == "cancelled" or (status == "done" and done >= cfg.trials)):
            session.update(status=status)  # workers alone ran it (a cancel reaches them all): no driver says so
        sink(SearchFinished(status, done, cfg.trials, b[0] if b else None, b[1] if b else None))
        return done, b

    # a cancel (or an error) while the data is prepared ends the run as one in a trial does: the session says
    # "cancelled" (resumable), not "stopped" as if its process had died
    try:
        data = SearchData(session, cfg, dense, sink, control)
        data.prepare()
        if not worker:
            settle_best(session, cfg, study, dense, data, sp, sink, control)
    except BaseException as e:
        status = "cancelled" if isinstance(e, (Cancelled, KeyboardInterrupt)) else "failed"
        ended()
        raise
    driver = _Driver(session, cfg, study, dense, data, sp, sink, control)
    # the whole search as one stage: a progress bar with the count of trials and an ETA
    sink(StageStarted("trials", cfg.trials, "trials"))
    sink(StageProgress("trials", completed(study), cfg.trials))
    try:
        driver.run()
    except (Cancelled, KeyboardInterrupt):
        status = "cancelled"
        raise
    except Exception:
        status = "failed"
        raise
    finally:
        driver.release()
        sink(StageFinished("trials", time.perf_counter() - started,
                           "done" if status in ("done", "stopped") else status))
        done, b = ended()
    return {"completed": done, "best": b}


def create_session(root: Path, name: str, cfg: SearchConfig, sink: Sink = null_sink) -> Session:
    """Create the session folder and its study, with trial 0 (the LLM-Pruner baseline) queued, and trial 1 (the
    strongest fixed recipe) when the space holds it."""
    validate(cfg)
    Session.check_free(root, name)  # before the model is read
    n_layers = num_layers(cfg.model, cfg.trust_remote_code, sink)
    validate(cfg, n_layers)

    def start_study(session: Session) -> None:
        study = open_study(session, cfg)
        base = {k: v for k, v in baseline_params(cfg, n_layers).items() if k not in cfg.fixed}
        study.enqueue_trial(base, user_attrs={"baseline": True})
        warm = warm_start_params(cfg, n_layers)
        if warm is not None:  # the strongest fixed recipe next: the search improves on it, not on luck
            study.enqueue_trial({k: v for k, v in warm.items() if k not in cfg.fixed}, user_attrs={"warm_start": True})

    # the study is made before the folder is a session: a listing (the app's, every second) never opens a
    # study while it is being created (two first opens of one SQLite study race to write its version row)
    return Session.create(root, name, asdict(cfg), start_study)
