"""Adaptive search (AdaPruner): TPE over calibration data x importance metric x allocation, in a session.

Each trial prunes a copy of the dense model with one configuration and scores it by the objective: the
geometric mean of the pruned model's PPL over several validation domains (held-out built-in text and text
sampled from the dense model by default), evaluated progressively so Optuna's median pruner can stop a
hopeless trial early. Trial 0 is LLM-Pruner's recipe, enqueued, so every later trial is read against it.
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import asdict
from pathlib import Path

from engine.config import SearchConfig
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
from engine.model.load import load
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.prune.plan import parse_overrides
from engine.search.data import SearchData
from engine.search.space import baseline_params, canonical, space, suggest, validate
from engine.search.study import ask_lock, beat_once, fail_orphans, heartbeat, open_study
from engine.search.trial import run_trial
from engine.session.layout import write_best
from engine.session.store import Session
from engine.session.study import (
    best_trial,
    completed,
    counts_toward_budget,
    quiet_optuna,
    rerun_attrs,
    storage_url,
)

MAX_DUPLICATES_IN_A_ROW = 25


def run_search(session: Session, sink: Sink = null_sink, control: Control | None = None,
               worker: bool = False) -> dict:
    """Drive (or, as a worker, join) the session's study until its trial budget is spent."""
    from optuna.trial import TrialState

    control = control or Control()
    outer = sink

    def sink(event) -> None:  # every event goes to the session's log too: `attach` and the app read it
        session.append_event(event)
        outer(event)

    cfg = SearchConfig.from_dict(session.config())
    validate(cfg)
    dense = load(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, sink=sink)
    dense.model.requires_grad_(False)
    n_layers = len(decoder_layers(dense.model))
    validate(cfg, n_layers)
    parse_overrides(cfg.overrides, n_layers, layer_shapes(dense.model), cfg.head_mode)  # refuse bad ones now
    sp = space(cfg, n_layers)
    me = f"{os.getpid()}@{socket.gethostname()}"
    study = open_study(session, cfg, None if not worker else cfg.seed + os.getpid())
    if not worker:
        fail_orphans(study, sink)
        session.update(status="running", storage=storage_url(session, cfg), dense_params=count_params(dense.model))
    data = SearchData(session, cfg, dense, sink, control)
    data.prepare()
    duplicates_in_a_row = 0
    status = "done"
    current = None
    # the whole search as one stage: a progress bar with the count of trials and an ETA
    started = time.perf_counter()
    sink(StageStarted("trials", cfg.trials, "trials"))
    sink(StageProgress("trials", completed(study), cfg.trials))
    try:
        while True:
            control.checkpoint()
            trials = study.get_trials(deepcopy=False)
            if sum(1 for t in trials if counts_toward_budget(t)) >= cfg.trials:
                break
            fail_orphans(study, sink)
            with ask_lock(session), quiet_optuna():
                current = study.ask()
                current.set_user_attr("worker", me)  # owned from the first moment: orphans are found by owner
                beat_once(study, current)  # a worker killed before its first trial heartbeat is still found
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < current.number]
            if sum(1 for t in earlier if counts_toward_budget(t)) >= cfg.trials:
                # another worker took the last slot between our count and our ask
                current.set_user_attr("over_budget", True)
                study.tell(current, state=TrialState.FAIL)
                current = None
                break
            params = suggest(current, sp, cfg.fixed)
            key = canonical(params)
            twin = next((t for t in earlier if t.state in (TrialState.COMPLETE, TrialState.PRUNED)
                         and t.user_attrs.get("key") == key), None)
            current.set_user_attr("key", key)
            if twin is None and any(t.state == TrialState.RUNNING and t.user_attrs.get("key") == key for t in earlier):
                # another worker is evaluating this very configuration right now
                current.set_user_attr("duplicate_of", "running")
                study.tell(current, state=TrialState.FAIL)
                current = None
                continue
            if twin is not None:  # TPE proposes configurations it has seen: reuse the value, spend no time
                current.set_user_attr("duplicate_of", twin.number)
                if twin.state == TrialState.COMPLETE:
                    study.tell(current, twin.value)
                else:  # stopped early before: stopped again, without running
                    study.tell(current, state=TrialState.PRUNED)
                sink(TrialFinished(current.number, "duplicate", twin.value, params, message=f"same as trial {twin.number}"))
                current = None
                duplicates_in_a_row += 1
                if duplicates_in_a_row >= MAX_DUPLICATES_IN_A_ROW:
                    sink(Log("the sampler keeps proposing evaluated configurations: the space looks exhausted", "warning"))
                    break
                continue
            duplicates_in_a_row = 0
            sink(TrialStarted(current.number, params, me, bool(current.user_attrs.get("baseline"))))
            trial = current

            def report(step: int, value: float, trial=trial) -> bool:
                trial.report(value, step)
                return trial.number > 0 and trial.should_prune()

            try:
                with heartbeat(study, current):
                    out = run_trial(dense, data, cfg, params, report, control, sink)
            except AdapruneError as e:  # this configuration cannot be built (e.g. an unreachable split)
                current.set_user_attr("error", str(e))
                study.tell(current, state=TrialState.FAIL)
                sink(TrialFinished(current.number, "failed", None, params, message=str(e)))
                current = None
                continue
            if study._storage.get_trial(current._trial_id).state != TrialState.RUNNING:
                # another process judged this trial dead and failed it (its configuration is queued again)
                sink(Log(f"trial {current.number} was closed by another process while it ran here; its result "
                         f"is dropped", "warning"))
                current = None
                continue
            current.set_user_attr("seconds", out.seconds)
            current.set_user_attr("objective_seconds", out.objective_seconds)
            current.set_user_attr("params_after", out.params_after)
            if out.accuracy is not None:
                current.set_user_attr("objective_accuracy", out.accuracy)
            state = TrialState.PRUNED if out.state == "pruned" else TrialState.COMPLETE
            study.tell(current, out.value if state == TrialState.COMPLETE else None, state=state)
            sink(TrialFinished(current.number, out.state, out.value, params, out.seconds, out.objective_seconds,
                               out.params_after,
                               f"zero-shot accuracy {out.accuracy:.3f}" if out.accuracy is not None else ""))
            if state == TrialState.COMPLETE and best_trial(study) == (current.number, out.value):
                write_best(session, {"trial": current.number, "value": out.value, "params": params,
                                     "plan": out.plan})
                sink(BestChanged(current.number, out.value, params))
            current = None
            sink(StageProgress("trials", completed(study), cfg.trials))
    except (Cancelled, KeyboardInterrupt):
        status = "cancelled"
        raise
    except Exception:
        status = "failed"
        raise
    finally:
        if current is not None:  # interrupted mid-trial: fail it so a resume runs it again
            try:
                study.tell(current, state=TrialState.FAIL)
                study.enqueue_trial(current.params, user_attrs=rerun_attrs(current))
            except Exception:
                pass
        done = completed(study)
        if not worker:
            session.update(status=status if status != "done" or done >= cfg.trials else "stopped")
        b = best_trial(study)
        sink(StageFinished("trials", time.perf_counter() - started))
        sink(SearchFinished(status, done, cfg.trials, b[0] if b else None, b[1] if b else None))
    return {"completed": done, "best": b}


def create_session(root: Path, name: str, cfg: SearchConfig, sink: Sink = null_sink) -> Session:
    """Create the session folder and its study, with trial 0 (the LLM-Pruner baseline) queued."""
    from engine.model.load import num_layers

    validate(cfg)
    if (root / name).exists():
        Session.create(root, name, {})  # raises the clear "exists" error
    n_layers = num_layers(cfg.model, cfg.trust_remote_code, sink)
    validate(cfg, n_layers)
    session = Session.create(root, name, asdict(cfg))
    try:
        study = open_study(session, cfg)
        base = {k: v for k, v in baseline_params(cfg, n_layers).items() if k not in cfg.fixed}
        study.enqueue_trial(base, user_attrs={"baseline": True})
    except BaseException:
        import shutil

        shutil.rmtree(session.path, ignore_errors=True)  # nothing half-made is left behind
        raise
    return session
