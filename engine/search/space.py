"""What the search explores: its dimensions, trial 0 (LLM-Pruner's recipe), the checks on a configuration,
and a configuration's identity (so a repeated proposal is not evaluated twice)."""

from __future__ import annotations

import json

from engine.config import AGGREGATES as ALL_AGGREGATES
from engine.config import (
    ALLOCATIONS,
    METRICS,
    REPAIR_METRICS,
    SAMPLE_METRICS,
    SEARCH_METRICS,
    SearchConfig,
    check_prune,
    default_layer_range,
    parse_attn_share,
)
from engine.data.text import check_source
from engine.errors import AdapruneError
from engine.measure.zeroshot import parse_task
from engine.model.spec import check_model

CALIB_NS = [10, 16, 32]


CALIB_LENS = [64, 128]


SELECTIONS = ["random", "low-loss", "high-loss", "typical", "spread"]




AGGREGATES = ["sum", "mean", "max", "prod", "last"]


ATTN_SHARES = ["auto", "same", "0.1", "0.25"]


MIX_METRICS = ["none", "vector", "taylor2", "wanda"]  # second metrics: decomposable, so mixing costs no backward


MIX_WEIGHTS = [0.25, 0.5, 0.75]


RAMPS = [-0.5, -0.25, 0.0, 0.25, 0.5]  # depth ramp of the MLP cut: > 0 prunes deeper layers more


REPAIR_LAMBDAS = [0.3, 1.0, 3.0]  # ridge strength of the reconstruction, relative to mean input variance


ALL = "all"  # every source's pool together: a repair's text, and what obs scores read (engine.search.data)


SAMPLERS = ("tpe", "random")


SEEDS = 10  # random draws per (source, n, len) the search may pick from


def space(cfg: SearchConfig, n_layers: int) -> dict[str, list | tuple[int, int]]:
    """The searched dimensions: categorical lists, or inclusive (low, high) integer ranges."""
    first, end = default_layer_range(n_layers)
    last = n_layers - end
    return {
        "calib_source": list(cfg.sources),
        "calib_n": CALIB_NS,
        "calib_len": CALIB_LENS,
        "calib_select": SELECTIONS,
        "calib_seed": (0, SEEDS - 1),
        "metric": list(cfg.metrics or SEARCH_METRICS),
        "aggregate": AGGREGATES,
        "metric2": MIX_METRICS,
        "mix": MIX_WEIGHTS,
        "attn_share": ATTN_SHARES,
        "allocation": list(ALLOCATIONS),
        "ramp": RAMPS,
        "first_kept": (0, max(1, 2 * first)),
        "last_kept": (0, max(1, 2 * last)),
        "repair": ["none", *repair_sources(cfg), *([ALL] if len(repair_sources(cfg)) > 1 else [])],
        "repair_lambda": REPAIR_LAMBDAS,
        # the repair text's pool, already drawn: a larger draw of self text costs minutes of sampling on a CPU
        # (on the embedded model 48 windows gave most of 128's gain; bench/RESULTS.md)
        "repair_n": [cfg.pool_size],
    }


def repair_sources(cfg: SearchConfig) -> list[str]:
    return list(cfg.sources if cfg.repair_sources is None else cfg.repair_sources)


def baseline_params(cfg: SearchConfig, n_layers: int) -> dict:
    """Trial 0: LLM-Pruner's recipe (taylor1, 10 random 64-token windows, sum, same ratio, its layer range),
    kept inside the searched space: where the user left a choice out (e.g. searching wanda and vector only),
    the space's first choice stands in for it, since Optuna cannot run a trial outside its own choices."""
    first, end = default_layer_range(n_layers)
    source = "stdlib-docs" if "stdlib-docs" in cfg.sources else cfg.sources[0]
    recipe = {"calib_source": source, "calib_n": 10, "calib_len": 64, "calib_select": "random", "calib_seed": 0,
            "metric": "taylor1", "aggregate": "sum", "metric2": "none", "mix": 0.5, "attn_share": "same",
            "allocation": "uniform", "ramp": 0.0,
            "first_kept": first,
            "last_kept": n_layers - end,
            "repair": "none", "repair_lambda": 1.0, "repair_n": cfg.pool_size}
    for key, choices in space(cfg, n_layers).items():
        if isinstance(choices, tuple):
            recipe[key] = min(max(recipe[key], choices[0]), choices[1])
        elif recipe[key] not in choices:
            recipe[key] = choices[0]
    return recipe


def warm_start_params(cfg: SearchConfig, n_layers: int) -> dict | None:
    """Trial 1: the strongest fixed recipe measured (bench/RESULTS.md, obs.py) — obs scores and a repair from
    every pool together, MLP channels first, the same cut in every layer of LLM-Pruner's range — so a search
    starts from it rather than hoping to sample it. None when the space leaves obs out."""
    sp = space(cfg, n_layers)
    if "obs" not in sp["metric"]:
        return None
    base = baseline_params(cfg, n_layers)
    repair = ALL if ALL in sp["repair"] else next(r for r in sp["repair"] if r != "none")
    recipe = {**base, "metric": "obs", "aggregate": "sum", "metric2": "none", "attn_share": "auto",
              "allocation": "uniform", "ramp": 0.0, "repair": repair, "repair_lambda": 1.0}
    return {k: v if _inside(v, sp[k]) else base[k] for k, v in recipe.items()}


def _inside(value, choices) -> bool:
    return choices[0] <= value <= choices[1] if isinstance(choices, tuple) else value in choices


def validate(cfg: SearchConfig, n_layers: int | None = None) -> None:
    if cfg.trials < 1:
        raise AdapruneError(f"--trials {cfg.trials}: a search needs at least one trial")
    check_model(cfg.model)
    check_prune(cfg.prune)
    if not cfg.sources:
        raise AdapruneError("no calibration sources to search: give at least one --source")
    if not cfg.objective:
        raise AdapruneError("no objective text: give at least one --objective")
    if not cfg.grad_cache_gb >= 0:
        raise AdapruneError(f"--grad-cache-gb {cfg.grad_cache_gb}: give zero or more GiB")
    if not cfg.repair_cache_gb >= 0:
        raise AdapruneError(f"--repair-cache-gb {cfg.repair_cache_gb}: give zero or more GiB")
    for s in repair_sources(cfg):
        if check_source(s, "calib").n is not None:
            raise AdapruneError(f"--repair-source {s!r}: sizes are searched (repair_n); give the source without :NxL")
    for s, role in [*((s, "calib") for s in cfg.sources), *((s, "eval") for s in cfg.objective)]:
        if check_source(s, role).n is not None:
            raise AdapruneError(f"{s!r}: sizes are searched (calib_n, calib_len); give the source without :NxL")
    if cfg.head_mode not in ("query", "kv"):
        raise AdapruneError(f"--heads {cfg.head_mode!r}: choose 'query' or 'kv'")
    if cfg.sampler not in SAMPLERS:
        raise AdapruneError(f"--sampler {cfg.sampler!r}: choose {' or '.join(SAMPLERS)}")
    if cfg.metrics is not None:
        unknown = [m for m in cfg.metrics if m not in METRICS]
        if unknown or not cfg.metrics:
            raise AdapruneError(f"metrics to search {cfg.metrics}: choose among {', '.join(METRICS)}")
    if cfg.objective_tasks:
        if cfg.objective_task_rows < 1 or cfg.objective_task_weight < 0:
            raise AdapruneError("the objective's zero-shot part needs --objective-task-rows >= 1 and a weight >= 0")
        for t in cfg.objective_tasks:
            if parse_task(t).path is None:
                raise AdapruneError(f"--objective-task {t}: give a local task file (its objective rows are then "
                                    f"left out of benchmarks of that file), not a task name")
    sp = space(cfg, n_layers or 32)
    for key, value in cfg.fixed.items():
        if key not in sp:
            raise AdapruneError(f"--fix {key}: not a search dimension ({', '.join(sp)})")
        _check_fixed(key, value)
    free = [k for k, d in sp.items() if k not in cfg.fixed and (isinstance(d, tuple) and d[0] < d[1] or
                                                                   not isinstance(d, tuple) and len(d) > 1)]
    if not free:
        raise AdapruneError("every search dimension is fixed: nothing left to search (use `adaprune prune`)")


def _check_fixed(key: str, value: object) -> None:
    """A fixed value may lie outside the searched choices (any metric, any size), but must be valid."""
    choices = {"metric": METRICS, "aggregate": ALL_AGGREGATES, "calib_select": SELECTIONS,
               "metric2": ["none", *SAMPLE_METRICS], "allocation": ALLOCATIONS}
    if key == "repair_lambda" and not (isinstance(value, (int, float)) and value > 0):
        raise AdapruneError(f"--fix repair_lambda={value}: a positive ridge strength (1 is typical)")
    if key == "repair_n" and not (isinstance(value, int) and value >= 1):
        raise AdapruneError(f"--fix repair_n={value}: a positive number of windows")
    if key == "repair" and value not in ("none", ALL):
        check_source(str(value), "calib")
    if key == "ramp" and not (isinstance(value, (int, float)) and -1 < value < 1):
        raise AdapruneError(f"--fix ramp={value}: a slope in (-1, 1)")
    if key == "mix" and not (isinstance(value, (int, float)) and 0 <= value <= 1):
        raise AdapruneError(f"--fix mix={value}: a weight in [0, 1] for the second metric")
    if key in choices and value not in choices[key]:
        raise AdapruneError(f"--fix {key}={value}: choose one of {', '.join(choices[key])}")
    minimum = {"calib_n": 1, "calib_len": 2, "calib_seed": 0, "first_kept": 0, "last_kept": 0}
    if key in minimum and (not isinstance(value, int) or value < minimum[key]):
        raise AdapruneError(f"--fix {key}={value}: must be an integer >= {minimum[key]}")
    if key == "attn_share":
        try:
            parse_attn_share(value)
        except AdapruneError:
            raise AdapruneError(f"--fix attn_share={value}: give auto, same, or a number in [0, 1]") from None
    if key == "calib_source":
        check_source(str(value), "calib")


def canonical(params: dict, overrides: dict | None = None) -> str:
    """A configuration's identity: settings that cannot change the result are normalised away. The user's
    per-layer overrides are part of it (a configuration run before a layer was locked is another model)."""
    p = dict(params)
    if overrides:
        p["overrides"] = overrides  # absent without overrides: the keys of earlier sessions still match
    if p.get("calib_select") != "random":
        p["calib_seed"] = 0  # a deterministic selection ignores the seed
    if p.get("metric2") in ("none", None) or p.get("metric2") == p.get("metric"):
        p["metric2"], p["mix"] = "none", None  # no second metric: its weight cannot matter
    if p.get("allocation") == "global":
        p["ramp"] = None  # the ranking decides the per-layer widths
    if p.get("repair", "none") == "none":
        p["repair"], p["repair_lambda"], p["repair_n"] = "none", None, None  # no repair: its settings cannot matter
    if p.get("metric") in ("l1", "l2", "random"):
        for k in ("calib_source", "calib_n", "calib_len", "calib_select", "calib_seed"):
            p[k] = None  # data-free metrics
    if p.get("repair") == ALL:
        p["repair_n"] = None  # every window of every pool
    if p.get("metric") in REPAIR_METRICS:
        for k in ("calib_source", "calib_n", "calib_len", "calib_select", "calib_seed", "aggregate"):
            p[k] = None  # obs reads every source's whole pool, each group in its output projection
    return json.dumps(p, sort_keys=True)


def suggest(trial, sp: dict, fixed: dict) -> dict:
    params = {}
    for key, dim in sp.items():
        if key in fixed:
            params[key] = fixed[key]
        elif isinstance(dim, tuple):
            params[key] = trial.suggest_int(key, dim[0], dim[1])
        else:
            params[key] = trial.suggest_categorical(key, dim)
    return params

