"""One trial: prune a copy of the dense model with a configuration (and repair it), then measure the
objective."""

from __future__ import annotations

import time
from dataclasses import dataclass

from engine.config import FISHER_METRICS, REPAIR_METRICS, SAMPLE_METRICS, SearchConfig, parse_attn_share
from engine.control import Control
from engine.errors import AdapruneError
from engine.events import (
    Sink,
    Stage,
)
from engine.model.load import Loaded
from engine.model.structure import count_params, decoder_layers, layer_shapes
from engine.prune.importance import mix_scores, score_layers, scores_from_samples
from engine.prune.plan import parse_overrides
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import Repair, pruned_layer_ids, repair_from_moments, snapshot_layers
from engine.prune.slicing import shared_copy
from engine.search.data import SearchData, pick_indices, pool_repair, pools_repair
from engine.search.objective import Pruned, progressive_objective
from engine.search.params import TrialParams
from engine.search.space import ALL, CALIB_LENS, repair_sources


@dataclass
class TrialOutcome:
    value: float
    state: str
    plan: dict | None
    seconds: float
    objective_seconds: float
    params_after: int
    accuracy: float | None = None  # the objective's zero-shot accuracy, when it has tasks
    message: str = ""


def _notes(p: TrialParams, cfg: SearchConfig) -> dict:
    calib = f"{p.calib_source}:{p.calib_n}x{p.calib_len} ({p.calib_select}, seed {p.calib_seed})"
    if p.metric in REPAIR_METRICS:
        calib = f"{pools_repair(cfg.sources, cfg).calib} (every pool)"
    extra = {"metric2": p.metric2, "mix": p.mix} if p.mixing else {}
    return {"calib": calib, **extra}


def prune_trial(model, data: SearchData, cfg: SearchConfig, params: TrialParams, control: Control,
                sink: Sink) -> tuple[dict, float]:
    """Prune `model` (a copy of the dense one) in place with a trial's configuration.

    Returns the plan and the seconds spent building per-session caches (not the trial's own work).
    """
    n_layers = len(decoder_layers(model))
    overrides = parse_overrides(cfg.overrides, n_layers, layer_shapes(model), cfg.head_mode)
    p = params
    layer_ids = [i for i in range(p.first_kept, n_layers - p.last_kept) if i not in overrides]
    if not layer_ids:
        raise AdapruneError("the protected first and last layers and the overrides leave nothing to prune")
    scored = sorted(set(layer_ids) | {i for i, kc in overrides.items() if kc != (0, 0)})
    _, loss = data.pool(p.calib_source)
    idx = pick_indices(loss, p.calib_n, p.calib_select, p.calib_seed)
    once = 0.0

    def sample_stats(metric: str) -> dict:
        nonlocal once
        tc = time.perf_counter()
        cache = data.sample_stats(p.calib_source, p.calib_len, idx, metric)
        once += time.perf_counter() - tc  # built once per session: not this trial's own work
        return cache

    def cached_scores(metric: str) -> dict:
        return scores_from_samples(model, sample_stats(metric), idx, scored, metric, p.aggregate, p.calib_len,
                                   cfg.seed)

    repair = trial_repair(p, cfg)
    if repair is not None:  # the dense model's statistics, before `model` (which may be the dense one) is cut
        tc = time.perf_counter()
        moments = data.repair_moments(repair)
        once += time.perf_counter() - tc  # built once per session (per text and size)
    second = cached_scores(p.metric2) if p.mixing else None
    if p.metric in REPAIR_METRICS:  # from every pool's input moments, once per session
        tc = time.perf_counter()
        every = data.obs_scores()
        once += time.perf_counter() - tc
        scores = {i: every[i] for i in scored}
    elif p.metric in SAMPLE_METRICS:  # decomposable: scores from cached per-sample statistics
        scores = cached_scores(p.metric)
    else:  # taylor1 / taylor-mix: from gradient sums shared between trials
        stats = data.gradient_stats(model, p.calib_source, p.calib_len, idx, scored, p.metric in FISHER_METRICS)
        scores = score_layers(model, scored, p.metric, p.aggregate, stats, cfg.seed)
        del stats
    if second is not None:
        scores = mix_scores(scores, second, float(p.mix))
    if repair is not None:  # the repair's targets: the dense layers (copied first when `model` is the dense one)
        dense_shapes = layer_shapes(model)
        dense_layers = (snapshot_layers(model, range(n_layers)) if model is data.loaded.model
                        else dict(enumerate(decoder_layers(data.loaded.model))))
    recipe = Recipe(cfg.prune, p.metric, p.aggregate, cfg.head_mode, parse_attn_share(p.attn_share), cfg.round_to,
                    cfg.seed, 0.0 if p.allocation == "global" else float(p.ramp), p.allocation, repair,
                    notes=_notes(p, cfg))
    plan = prune_with(model, recipe, layer_ids, scores=scores, overrides=overrides, control=control, sink=sink)
    if repair is not None:
        cut = pruned_layer_ids(dense_shapes, plan.layers)
        dense_layers = {i: dense_layers[i] for i in cut}
        with Stage(sink, "reconstruct"):
            repair_from_moments(model, dense_layers, plan.layers, moments, repair.lam)
    return plan.to_dict(), once


def trial_repair(params: TrialParams, cfg: SearchConfig) -> Repair | None:
    """A trial's reconstruction, solved toward the sliced weights from the dense model's statistics on the
    first `repair_n` windows of the repair text's calibration pool (or, for more windows than the pool has, of
    a draw of their own with seed + 3)."""
    source, lam = params.repair, float(params.repair_lambda)
    if source == "none":
        return None
    if source == ALL:  # every window of every repair text's pool
        return pools_repair(repair_sources(cfg), cfg, lam)
    n = int(params.repair_n or cfg.pool_size)
    length = max(CALIB_LENS)
    if n <= cfg.pool_size:
        return pool_repair(source, cfg, lam, n)
    return Repair(f"{source}:{n}x{length}", lam, "dense", cfg.seed + 3, n)


def run_trial(dense: Loaded, data: SearchData, cfg: SearchConfig, params: TrialParams, report, control: Control,
              sink: Sink) -> TrialOutcome:
    """Prune a copy of the dense model with `params` and measure the objective."""
    t0 = time.perf_counter()
    model = shared_copy(dense.model)  # the dense weights are shared, never written: a trial holds what it cuts
    plan, once = prune_trial(model, data, cfg, params, control, sink)
    sets = data.objective_sets()
    t1 = time.perf_counter()
    accuracy = None
    try:
        value = progressive_objective(model, sets, control, report)
        state = "complete"
        if cfg.objective_tasks:  # only for trials that survive the PPL steps: the costlier part
            accuracy = data.objective_accuracy(model)
            value *= (data.dense_accuracy() / max(accuracy, 1e-3)) ** cfg.objective_task_weight
    except Pruned as p:
        value, state = p.value, "pruned"
        message = f"stopped early: objective over {p.done}/{p.steps} batches"
    else:
        message = f"zero-shot accuracy {accuracy:.3f}" if accuracy is not None else ""
    t2 = time.perf_counter()
    return TrialOutcome(value, state, plan, t2 - t0 - once, t2 - t1, count_params(model), accuracy, message)

