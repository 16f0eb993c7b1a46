"""Adaptive search (AdaPruner): TPE over calibration data x importance metric x allocation, in a session.

Each trial prunes a copy of the dense model with one configuration and scores it by the objective: the
geometric mean of the pruned model's PPL over several validation domains (held-out built-in text and text
sampled from the dense model by default), evaluated progressively so Optuna's median pruner can stop a
hopeless trial early. Trial 0 is LLM-Pruner's recipe, enqueued, so every later trial is read against it.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import math
import os
import socket
import threading
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from engine.control import Control
from engine.errors import AdapruneError, Cancelled
from engine.events import (
    BestChanged,
    Log,
    SearchFinished,
    Sink,
    Stage,
    StageFinished,
    StageProgress,
    StageStarted,
    TrialFinished,
    TrialStarted,
    null_sink,
)
from engine.gradsums import GradientCache, sum_bytes
from engine.importance import (
    FISHER_METRICS,
    SAMPLE_METRICS,
    CalibStats,
    collect_sample_stats,
    mix_scores,
    score_layers,
    scores_from_samples,
)
from engine.models import EMBEDDED, Loaded, load
from engine.plan import ALLOCATIONS, check_attn_share, parse_overrides
from engine.recipe import prune_with
from engine.reconstruct import Repair, dense_moments, pruned_layer_ids, repair_from_moments, snapshot_layers
from engine.recover import recovery_state
from engine.session import Session, pid_alive
from engine.structure import count_params, decoder_layers, default_layer_range, layer_shapes
from engine.text import SELF, eval_windows, load_text, parse_spec, random_windows, sample_self, tokenize
from engine.zeroshot import TaskSpec, parse_task, sample_indices, zero_shot

CALIB_NS = [10, 16, 32]
CALIB_LENS = [64, 128]
SELECTIONS = ["random", "low-loss", "high-loss", "typical", "spread"]
SEARCH_METRICS = ["taylor1", "taylor2", "taylor-mix", "vector", "wanda"]
AGGREGATES = ["sum", "mean", "max", "prod", "last"]
ATTN_SHARES = ["auto", "same", "0.1", "0.25"]
MIX_METRICS = ["none", "vector", "taylor2", "wanda"]  # second metrics: decomposable, so mixing costs no backward
MIX_WEIGHTS = [0.25, 0.5, 0.75]
RAMPS = [-0.5, -0.25, 0.0, 0.25, 0.5]  # depth ramp of the MLP cut: > 0 prunes deeper layers more
REPAIR_LAMBDAS = [0.3, 1.0, 3.0]  # ridge strength of the reconstruction, relative to mean input variance
SAMPLERS = ("tpe", "random")
CALIB_BATCH = 4  # windows per calibration forward/backward (the same as prune_with's default)
SEEDS = 10  # random draws per (source, n, len) the search may pick from
MAX_DUPLICATES_IN_A_ROW = 25


@dataclass
class SearchConfig:
    model: str = EMBEDDED
    prune: float = 0.20
    trials: int = 20
    seed: int = 0
    sources: list[str] = field(default_factory=lambda: ["stdlib-docs", SELF])
    objective: list[str] = field(default_factory=lambda: ["stdlib-docs/valid", SELF])
    objective_windows: int = 16
    objective_len: int = 128
    metrics: list[str] | None = None  # the metrics to search (None: SEARCH_METRICS)
    pool_size: int = 48  # windows per calibration source to select from (per-sample statistics cost one backward each)
    grad_cache_gb: float = 2.0  # memory for gradient sums that taylor1/taylor-mix trials share (0: none)
    fixed: dict = field(default_factory=dict)
    head_mode: str = "query"
    round_to: int = 1
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    storage: str | None = None
    sampler: str = "tpe"  # tpe (the method) or random (Optuna's RandomSampler: the yardstick TPE must beat)
    early_stop: bool = True
    overrides: dict = field(default_factory=dict)  # user per-layer decisions (engine.plan.parse_overrides)
    # optional zero-shot part of the objective: PPL x (dense accuracy / pruned accuracy) ** weight
    objective_tasks: list[str] = field(default_factory=list)  # local task files (JSONL, see engine.zeroshot)
    objective_task_rows: int = 50  # rows per task, drawn with seed + 2; benchmarks of the same file skip them
    objective_task_weight: float = 1.0
    # layer-wise reconstruction as a searched dimension: its text is one of these sources or none
    repair_sources: list[str] | None = None  # None: the calibration sources (self included by default)
    repair_cache_gb: float = 2.0  # memory for the dense model's input statistics that repaired trials share

    @classmethod
    def from_dict(cls, data: dict) -> SearchConfig:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})


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
        "repair": ["none", *repair_sources(cfg)],
        "repair_lambda": REPAIR_LAMBDAS,
        # the repair text's pool, already drawn: a larger draw of self text costs minutes of sampling on a CPU
        # (on the embedded model 48 windows gave most of 128's gain; bench/RESULTS.md)
        "repair_n": [cfg.pool_size],
    }


def repair_sources(cfg: SearchConfig) -> list[str]:
    return list(cfg.sources if cfg.repair_sources is None else cfg.repair_sources)


def baseline_params(cfg: SearchConfig, n_layers: int) -> dict:
    """Trial 0: LLM-Pruner's recipe (taylor1, 10 random 64-token windows, sum, same ratio, its layer range)."""
    first, end = default_layer_range(n_layers)
    source = "stdlib-docs" if "stdlib-docs" in cfg.sources else cfg.sources[0]
    return {"calib_source": source, "calib_n": 10, "calib_len": 64, "calib_select": "random", "calib_seed": 0,
            "metric": "taylor1", "aggregate": "sum", "metric2": "none", "mix": 0.5, "attn_share": "same",
            "allocation": "uniform", "ramp": 0.0,
            "first_kept": first,
            "last_kept": n_layers - end,
            "repair": "none", "repair_lambda": 1.0, "repair_n": cfg.pool_size}


def validate(cfg: SearchConfig, n_layers: int | None = None) -> None:
    if cfg.trials < 1:
        raise AdapruneError(f"--trials {cfg.trials}: a search needs at least one trial")
    if not 0 < cfg.prune <= 0.9:
        raise AdapruneError(f"--prune {cfg.prune} is outside (0, 0.9]: give the fraction of all parameters to remove")
    if not cfg.sources:
        raise AdapruneError("no calibration sources to search: give at least one --source")
    if not cfg.objective:
        raise AdapruneError("no objective text: give at least one --objective")
    if not cfg.grad_cache_gb >= 0:
        raise AdapruneError(f"--grad-cache-gb {cfg.grad_cache_gb}: give zero or more GiB")
    if not cfg.repair_cache_gb >= 0:
        raise AdapruneError(f"--repair-cache-gb {cfg.repair_cache_gb}: give zero or more GiB")
    for s in repair_sources(cfg):
        if parse_spec(s).n is not None:
            raise AdapruneError(f"--repair-source {s!r}: sizes are searched (repair_n); give the source without :NxL")
    for s in [*cfg.sources, *cfg.objective]:
        if parse_spec(s).n is not None:
            raise AdapruneError(f"{s!r}: sizes are searched (calib_n, calib_len); give the source without :NxL")
    if cfg.head_mode not in ("query", "kv"):
        raise AdapruneError(f"--heads {cfg.head_mode!r}: choose 'query' or 'kv'")
    if cfg.sampler not in SAMPLERS:
        raise AdapruneError(f"--sampler {cfg.sampler!r}: choose {' or '.join(SAMPLERS)}")
    if cfg.metrics is not None:
        from engine.importance import METRICS

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
    from engine.importance import AGGREGATES as ALL_AGGREGATES
    from engine.importance import METRICS

    choices = {"metric": METRICS, "aggregate": ALL_AGGREGATES, "calib_select": SELECTIONS,
               "metric2": ["none", *SAMPLE_METRICS], "allocation": ALLOCATIONS}
    if key == "repair_lambda" and not (isinstance(value, (int, float)) and value > 0):
        raise AdapruneError(f"--fix repair_lambda={value}: a positive ridge strength (1 is typical)")
    if key == "repair_n" and not (isinstance(value, int) and value >= 1):
        raise AdapruneError(f"--fix repair_n={value}: a positive number of windows")
    if key == "repair" and value != "none":
        parse_spec(str(value))
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
            check_attn_share(value if value in ("auto", "same") else float(value))
        except (TypeError, ValueError):
            raise AdapruneError(f"--fix attn_share={value}: give auto, same, or a number in [0, 1]") from None
    if key == "calib_source":
        parse_spec(str(value))


def canonical(params: dict) -> str:
    """A configuration's identity: settings that cannot change the result are normalised away."""
    p = dict(params)
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
    return json.dumps(p, sort_keys=True)


# --- cached data: calibration pools and objective windows -----------------------------------------------


def _slug(spec: str) -> str:
    return hashlib.sha1(spec.encode()).hexdigest()[:12]


class SearchData:
    """Token windows the trials draw from, built once per session and cached in its stats/ folder."""

    def __init__(self, session: Session, cfg: SearchConfig, loaded: Loaded, sink: Sink, control: Control) -> None:
        self.session, self.cfg, self.loaded, self.sink, self.control = session, cfg, loaded, sink, control
        self.pools: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.objective: dict[str, torch.Tensor] = {}
        self.samples: dict[tuple[str, int], dict[str, torch.Tensor]] = {}
        self.grads = GradientCache(int(cfg.grad_cache_gb * 2**30))
        self.moments: dict[tuple[str, int, int | None], dict[str, torch.Tensor]] = {}  # oldest first

    def _cached(self, name: str, build) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file, save_file

        path = self.session.stats_dir / f"{name}.safetensors"
        if path.exists():
            return load_file(path)
        tensors = build()
        self.session.stats_dir.mkdir(exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
        os.replace(tmp, path)
        return tensors

    def _windows(self, spec: str, role: str, n: int, length: int, seed: int) -> torch.Tensor:
        model, tok = self.loaded.model, self.loaded.tokenizer
        if parse_spec(spec).name == SELF:
            with Stage(self.sink, f"sample self text ({role})", n, "samples") as st:
                return sample_self(model, tok, n, length, seed, on_batch=st.advance)
        ids = tokenize(tok, load_text(spec, "calib" if role == "calibration" else "eval"))
        if role == "calibration":
            return random_windows(ids, n, length, seed)
        return eval_windows(ids, length, n)

    def pool(self, source: str) -> tuple[torch.Tensor, torch.Tensor]:
        """pool_size windows of the longest calibration length, with the dense model's loss on each."""
        if source not in self.pools:
            cfg = self.cfg

            def build() -> dict[str, torch.Tensor]:
                ids = self._windows(source, "calibration", cfg.pool_size, max(CALIB_LENS), cfg.seed)
                return {"ids": ids, "loss": window_losses(self.loaded.model, ids, self.control)}

            with Stage(self.sink, f"calibration pool {source}"):
                data = self._cached(f"pool-{_slug(source)}-{cfg.seed}", build)
            self.pools[source] = (data["ids"], data["loss"])
        return self.pools[source]

    def sample_stats(self, source: str, length: int) -> dict[str, torch.Tensor]:
        """Per-window statistics of a pool at one window length: one backward per window, once per session."""
        key = (source, length)
        if key not in self.samples:
            ids, _ = self.pool(source)
            model = self.loaded.model

            def build() -> dict[str, torch.Tensor]:
                # the pass computes every window's gradient anyway: their sum serves later taylor1 trials
                pool_sum = self.grads.pool_accumulator(key, ids.shape[0], model)
                return collect_sample_stats(model, ids[:, :length], self.control, self.sink, pool_sum)

            with Stage(self.sink, f"per-sample statistics {source} x{length}"):
                self.samples[key] = self._cached(f"samples-{_slug(source)}-{length}-{self.cfg.seed}", build)
        return self.samples[key]

    def gradient_stats(self, model, source: str, length: int, subset: torch.Tensor, layer_ids: list[int],
                       squares: bool) -> CalibStats:
        """Mean gradient (and Fisher diagonal) of a subset of a pool, from the nearest gradient sum kept."""
        ids, _ = self.pool(source)
        return self.grads.stats(model, (source, length), ids[:, :length], subset.tolist(), layer_ids, squares,
                                CALIB_BATCH, self.control, self.sink)

    def repair_windows(self, repair: Repair) -> torch.Tensor:
        """A repair's calibration windows, drawn from the dense model once per session (stats/); the draw a
        calibration pool is made of is that pool."""
        spec = parse_spec(repair.calib)
        if (spec.n, spec.seq_len, repair.seed) == (self.cfg.pool_size, max(CALIB_LENS), self.cfg.seed):
            return self.pool(spec.name)[0][: repair.take]
        with Stage(self.sink, f"reconstruction text {spec.name}"):
            data = self._cached(f"repair-{_slug(repair.calib)}-{repair.seed}", lambda: {
                "ids": self._windows(spec.name, "calibration", spec.n, spec.seq_len, repair.seed)})
        return data["ids"][: repair.take]

    def repair_moments(self, repair: Repair) -> dict[str, torch.Tensor]:
        """The dense model's o_proj/down_proj input moments on a repair's windows, every layer, kept in memory
        under `repair_cache_gb` (the oldest dropped first) so repaired trials only solve."""
        key = (repair.calib, repair.seed, repair.take)
        if key in self.moments:
            self.moments[key] = self.moments.pop(key)  # most recently used last
            return self.moments[key]
        model = self.loaded.model
        layers = list(range(len(decoder_layers(model))))
        windows = self.repair_windows(repair)
        moments = {k: v.float() if k.endswith(".m2") else v
                   for k, v in dense_moments(model, layers, windows, CALIB_BATCH, self.control, self.sink).items()}
        size = sum(v.numel() * v.element_size() for v in moments.values())
        budget = int(self.cfg.repair_cache_gb * 2**30)
        while self.moments and size + sum(sum(v.numel() * v.element_size() for v in m.values())
                                          for m in self.moments.values()) > budget:
            self.moments.pop(next(iter(self.moments)))
        if size <= budget:
            self.moments[key] = moments
        return moments

    def prepare(self) -> None:
        """Build every pool and objective text before the first trial, so trial times are trial times."""
        self.objective_sets()
        self.dense_accuracy()
        for source in self.cfg.sources:
            self.pool(source)

    def objective_accuracy(self, model) -> float | None:
        """Mean zero-shot accuracy of `model` on the objective's task rows (None without objective tasks)."""
        if not self.cfg.objective_tasks:
            return None
        accs = []
        for t in self.cfg.objective_tasks:
            spec = parse_task(t)
            r = zero_shot(model, self.loaded.tokenizer, [spec], seed=self.cfg.seed, control=self.control,
                          indices=objective_task_indices(spec, self.cfg))
            accs.append(r[spec.name].acc)
        return sum(accs) / len(accs)

    def dense_accuracy(self) -> float | None:
        if not self.cfg.objective_tasks:
            return None
        with Stage(self.sink, "objective tasks (dense)"):
            data = self._cached(f"objective-acc-{_slug(json.dumps(self.cfg.objective_tasks))}-{self.cfg.seed}",
                                lambda: {"acc": torch.tensor([self.objective_accuracy(self.loaded.model)])})
        acc = float(data["acc"][0])
        self.sink(Log(f"dense model's zero-shot accuracy on the objective's task rows: {acc:.3f}"))
        return acc

    def objective_sets(self) -> dict[str, torch.Tensor]:
        if not self.objective:
            cfg = self.cfg
            for spec in cfg.objective:
                def build(spec: str = spec) -> dict[str, torch.Tensor]:
                    # seed + 1: text sampled for the objective is a different draw from any calibration pool
                    return {"ids": self._windows(spec, "objective", cfg.objective_windows, cfg.objective_len,
                                                 cfg.seed + 1)}

                with Stage(self.sink, f"objective text {spec}"):
                    self.objective[spec] = self._cached(f"objective-{_slug(spec)}-{cfg.seed}", build)["ids"]
        return self.objective


@torch.inference_mode()
def window_losses(model, ids: torch.Tensor, control: Control, batch_size: int = 8) -> torch.Tensor:
    device = next(model.parameters()).device
    out = []
    for b in range(0, ids.shape[0], batch_size):
        control.checkpoint()
        x = ids[b : b + batch_size].to(device)
        logits = model(input_ids=x).logits[:, :-1].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none").mean(1)
        out.append(nll.cpu())
    return torch.cat(out)


def pick_windows(ids: torch.Tensor, loss: torch.Tensor, n: int, length: int, select: str, seed: int) -> torch.Tensor:
    """Sample-aware selection from a pool: by seed, or by the dense model's loss on each window."""
    return ids[pick_indices(loss, n, select, seed), :length]


def pick_indices(loss: torch.Tensor, n: int, select: str, seed: int) -> torch.Tensor:
    ids = loss
    n = min(n, ids.shape[0])
    if select == "random":
        idx = torch.randperm(ids.shape[0], generator=torch.Generator().manual_seed(seed))[:n]
    elif select == "low-loss":
        idx = torch.argsort(loss)[:n]
    elif select == "high-loss":
        idx = torch.argsort(loss, descending=True)[:n]
    elif select == "typical":
        idx = torch.argsort((loss - loss.median()).abs())[:n]
    elif select == "spread":
        order = torch.argsort(loss)
        idx = order[torch.linspace(0, len(order) - 1, n).round().long()]
    else:
        raise AdapruneError(f"unknown calibration selection {select!r}: {', '.join(SELECTIONS)}")
    return idx


def objective_task_indices(spec: TaskSpec, cfg: SearchConfig) -> list[int]:
    """The task rows the objective scores: a seeded draw that benchmarks of the same file leave out."""
    return sample_indices(spec.rows, cfg.objective_task_rows, cfg.seed + 2) or list(range(spec.rows))


# --- the objective --------------------------------------------------------------------------------------


@torch.inference_mode()
def progressive_objective(model, sets: dict[str, torch.Tensor], control: Control, report=None,
                          batch_size: int = 4) -> float:
    """Geometric mean of per-domain PPL, computed a batch of every domain at a time.

    `report(step, value)` gets the running value after each step and returns True to stop (trial pruned).
    """
    device = next(model.parameters()).device
    nll = {k: 0.0 for k in sets}
    count = {k: 0 for k in sets}
    steps = max((v.shape[0] + batch_size - 1) // batch_size for v in sets.values())
    value = float("inf")
    for step in range(steps):
        control.checkpoint()
        for name, windows in sets.items():
            batch = windows[step * batch_size : (step + 1) * batch_size]
            if not batch.shape[0]:
                continue
            x = batch.to(device)
            logits = model(input_ids=x).logits[:, :-1].float()
            nll[name] += torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum").item()
            count[name] += x[:, 1:].numel()
        mean_log = sum(nll[k] / count[k] for k in sets if count[k]) / sum(1 for k in sets if count[k])
        value = math.exp(min(mean_log, 700))
        if report is not None and report(step, value):
            raise _Pruned(value)
    return value


class _Pruned(Exception):
    def __init__(self, value: float) -> None:
        self.value = value


# --- the study ------------------------------------------------------------------------------------------


def storage_url(session: Session, cfg: SearchConfig) -> str:
    return cfg.storage or f"sqlite:///{(session.path / 'study.db').resolve()}"


HEARTBEAT_S = 20  # a running trial's owner records a heartbeat this often (database storages)
GRACE_S = 120  # a running trial without a heartbeat this long belongs to a dead process, on any host


def _storage(url: str):
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
        with _quiet_optuna():
            return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=HEARTBEAT_S,
                                              grace_period=GRACE_S, heartbeat_stale_trial_callback=_requeue)
    except Exception as e:
        raise AdapruneError(f"cannot open the study storage {url!r} ({type(e).__name__}): check the URL") from None


@contextlib.contextmanager
def _quiet_optuna():
    """Heartbeats are experimental in Optuna and it warns when they are used with ask/tell, as we do."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Hh]eartbeat.*")
        warnings.filterwarnings("ignore", category=optuna_experimental_warning())
        yield


def optuna_experimental_warning() -> type[Warning]:
    from optuna.exceptions import ExperimentalWarning

    return ExperimentalWarning


def _rerun_attrs(trial) -> dict:
    """A re-queued trial remembers what it reruns, and stays the baseline if it was (trial 0 may be rerun)."""
    return {"rerun_of": trial.number, **({"baseline": True} if trial.user_attrs.get("baseline") else {})}


def _requeue(study, trial) -> None:
    # a trial stopped before it drew its parameters still holds what the queue gave it (e.g. the baseline)
    params = trial.params or trial.system_attrs.get("fixed_params")
    if params and "duplicate_of" not in trial.user_attrs:
        study.enqueue_trial(params, user_attrs=_rerun_attrs(trial))


@contextlib.contextmanager
def _ask_lock(session: Session):
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


def _beat_once(study, trial) -> None:
    storage = study._storage
    if hasattr(storage, "record_heartbeat") and storage.get_heartbeat_interval() is not None:
        storage.record_heartbeat(trial._trial_id)


@contextlib.contextmanager
def heartbeat(study, trial):
    """Record the trial's heartbeat in the background while this process works on it."""
    storage = study._storage
    if not hasattr(storage, "record_heartbeat") or storage.get_heartbeat_interval() is None:
        yield
        return
    stop = threading.Event()

    def beat() -> None:
        while True:
            with contextlib.suppress(Exception):  # a missed beat is retried; the trial must not fail for it
                storage.record_heartbeat(trial._trial_id)
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
    storage = _storage(storage_url(session, cfg))
    seed = cfg.seed if sampler_seed is None else sampler_seed
    sampler = (optuna.samplers.RandomSampler(seed=seed) if cfg.sampler == "random" else
               optuna.samplers.TPESampler(seed=seed, n_startup_trials=max(3, min(8, cfg.trials // 3)),
                                          multivariate=True))
    # the first step (one batch per text) is too noisy to judge on: stop trials from the second step on
    pruner = (optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=1) if cfg.early_stop
              else optuna.pruners.NopPruner())
    return optuna.create_study(study_name=session.study_name, storage=storage, sampler=sampler, pruner=pruner,
                               direction="minimize", load_if_exists=True)


def _counts_toward_budget(t) -> bool:
    from optuna.trial import TrialState

    return t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING) and \
        "duplicate_of" not in t.user_attrs


def completed(study) -> int:
    from optuna.trial import TrialState

    return sum(1 for t in study.get_trials(deepcopy=False)
               if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and "duplicate_of" not in t.user_attrs)


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
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
        _requeue(study, t)
        n += 1
    running = [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    with _quiet_optuna():
        optuna.storages.fail_stale_trials(study)  # requeues through the storage's callback
    n += sum(1 for tid in running if study._storage.get_trial(tid).state == TrialState.FAIL)
    if n:
        sink(Log(f"{n} trial(s) left running by a stopped process were marked failed and will run again"))
    return n


def _suggest(trial, sp: dict, fixed: dict) -> dict:
    params = {}
    for key, dim in sp.items():
        if key in fixed:
            params[key] = fixed[key]
        elif isinstance(dim, tuple):
            params[key] = trial.suggest_int(key, dim[0], dim[1])
        else:
            params[key] = trial.suggest_categorical(key, dim)
    return params


def _attn(value: str) -> float | str:
    return value if value in ("auto", "same") else float(value)


@dataclass
class TrialOutcome:
    value: float
    state: str
    plan: dict | None
    seconds: float
    objective_seconds: float
    params_after: int
    accuracy: float | None = None  # the objective's zero-shot accuracy, when it has tasks


def _recipe(params: dict, mixing: bool) -> dict:
    calib = (f"{params['calib_source']}:{params['calib_n']}x{params['calib_len']} "
             f"({params['calib_select']}, seed {params['calib_seed']})")
    extra = {"metric2": params["metric2"], "mix": params["mix"]} if mixing else {}
    return {"calib": calib, **extra}


def prune_trial(model, data: SearchData, cfg: SearchConfig, params: dict, control: Control,
                sink: Sink) -> tuple[dict, float]:
    """Prune `model` (a copy of the dense one) in place with a trial's configuration.

    Returns the plan and the seconds spent building per-session caches (not the trial's own work).
    """
    n_layers = len(decoder_layers(model))
    overrides = parse_overrides(cfg.overrides, n_layers, layer_shapes(model), cfg.head_mode)
    layer_ids = [i for i in range(params["first_kept"], n_layers - params["last_kept"]) if i not in overrides]
    if not layer_ids:
        raise AdapruneError("the protected first and last layers and the overrides leave nothing to prune")
    scored = sorted(set(layer_ids) | {i for i, kc in overrides.items() if kc != (0, 0)})
    _, loss = data.pool(params["calib_source"])
    idx = pick_indices(loss, params["calib_n"], params["calib_select"], params["calib_seed"])
    once = 0.0
    metric2 = params.get("metric2", "none")
    allocation = params.get("allocation", "uniform")
    mixing = metric2 != "none" and metric2 != params["metric"]

    def sample_stats() -> dict:
        nonlocal once
        tc = time.perf_counter()
        cache = data.sample_stats(params["calib_source"], params["calib_len"])
        once += time.perf_counter() - tc  # built once per session: not this trial's own work
        return cache

    def cached_scores(metric: str) -> dict:
        return scores_from_samples(model, sample_stats(), idx, scored, metric, params["aggregate"],
                                   params["calib_len"], cfg.seed)

    repair = trial_repair(params, cfg)
    if repair is not None:  # the dense model's statistics, before `model` (which may be the dense one) is cut
        tc = time.perf_counter()
        moments = data.repair_moments(repair)
        once += time.perf_counter() - tc  # built once per session (per text and size)
    second = cached_scores(metric2) if mixing else None
    if params["metric"] not in SAMPLE_METRICS and data.grads.fits(sum_bytes(model, squares=True)):
        # the per-sample pass, which most trials need sooner or later, also sums the whole pool's gradients:
        # from that sum a large subset's gradient costs only the windows it leaves out
        sample_stats()
    if params["metric"] in SAMPLE_METRICS:  # decomposable: scores from cached per-sample statistics
        scores = cached_scores(params["metric"])
    else:  # taylor1 / taylor-mix: from gradient sums shared between trials
        stats = data.gradient_stats(model, params["calib_source"], params["calib_len"], idx, scored,
                                    params["metric"] in FISHER_METRICS)
        scores = score_layers(model, scored, params["metric"], params["aggregate"], stats, cfg.seed)
        del stats
    if second is not None:
        scores = mix_scores(scores, second, float(params["mix"]))
    if repair is not None:  # the repair's targets: the dense layers (copied first when `model` is the dense one)
        dense_shapes = layer_shapes(model)
        dense_layers = (snapshot_layers(model, range(n_layers)) if model is data.loaded.model
                        else dict(enumerate(decoder_layers(data.loaded.model))))
    plan = prune_with(model, None, layer_ids, cfg.prune, params["metric"], params["aggregate"], cfg.head_mode,
                      _attn(params["attn_share"]), cfg.round_to, cfg.seed, control=control, sink=sink,
                      scores=scores, overrides=overrides, allocation=allocation,
                      ramp=0.0 if allocation == "global" else float(params.get("ramp", 0.0)),
                      recipe=_recipe(params, mixing), repair=repair)
    if repair is not None:
        cut = pruned_layer_ids(dense_shapes, plan.layers)
        dense_layers = {i: dense_layers[i] for i in cut}
        with Stage(sink, "reconstruct"):
            repair_from_moments(model, dense_layers, plan.layers, moments, repair.lam)
    return plan.to_dict(), once


def trial_repair(params: dict, cfg: SearchConfig) -> Repair | None:
    """A trial's reconstruction, solved toward the sliced weights from the dense model's statistics on the
    first `repair_n` windows of the repair text's calibration pool (or, for more windows than the pool has, of
    a draw of their own with seed + 3)."""
    source = params.get("repair", "none")
    if source == "none":
        return None
    n = int(params.get("repair_n", cfg.pool_size))
    length = max(CALIB_LENS)
    if n <= cfg.pool_size:
        return Repair(f"{source}:{cfg.pool_size}x{length}", float(params["repair_lambda"]), "dense", cfg.seed, n)
    return Repair(f"{source}:{n}x{length}", float(params["repair_lambda"]), "dense", cfg.seed + 3, n)


def run_trial(dense: Loaded, data: SearchData, cfg: SearchConfig, params: dict, report, control: Control,
              sink: Sink) -> TrialOutcome:
    """Prune a copy of the dense model with `params` and measure the objective."""
    t0 = time.perf_counter()
    model = copy.deepcopy(dense.model)
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
    except _Pruned as p:
        value, state = p.value, "pruned"
    t2 = time.perf_counter()
    return TrialOutcome(value, state, plan, t2 - t0 - once, t2 - t1, count_params(model), accuracy)


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
            if sum(1 for t in trials if _counts_toward_budget(t)) >= cfg.trials:
                break
            fail_orphans(study, sink)
            with _ask_lock(session), _quiet_optuna():
                current = study.ask()
                current.set_user_attr("worker", me)  # owned from the first moment: orphans are found by owner
                _beat_once(study, current)  # a worker killed before its first trial heartbeat is still found
            earlier = [t for t in study.get_trials(deepcopy=False) if t.number < current.number]
            if sum(1 for t in earlier if _counts_toward_budget(t)) >= cfg.trials:
                # another worker took the last slot between our count and our ask
                current.set_user_attr("over_budget", True)
                study.tell(current, state=TrialState.FAIL)
                current = None
                break
            params = _suggest(current, sp, cfg.fixed)
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
            if state == TrialState.COMPLETE and _best(study) == (current.number, out.value):
                session.write_json("plan.json", {"trial": current.number, "value": out.value, "params": params,
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
                study.enqueue_trial(current.params, user_attrs=_rerun_attrs(current))
            except Exception:
                pass
        done = completed(study)
        if not worker:
            session.update(status=status if status != "done" or done >= cfg.trials else "stopped")
        b = _best(study)
        sink(StageFinished("trials", time.perf_counter() - started))
        sink(SearchFinished(status, done, cfg.trials, b[0] if b else None, b[1] if b else None))
    return {"completed": done, "best": b}


def _best(study) -> tuple[int, float] | None:
    from optuna.trial import TrialState

    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    if not done:
        return None
    t = min(done, key=lambda t: t.value)
    return t.number, t.value


def create_session(root: Path, name: str, cfg: SearchConfig, sink: Sink = null_sink) -> Session:
    """Create the session folder and its study, with trial 0 (the LLM-Pruner baseline) queued."""
    from engine.models import num_layers

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


def summary(session: Session) -> dict:
    """One row of the sessions table; a session whose files are damaged still gets a row saying so."""
    try:
        m = session.manifest()
    except AdapruneError as e:
        return {"name": session.name, "model": "?", "prune": 0.0, "trials": 0, "status": "unreadable",
                "updated": None, "done": 0, "best": None, "problem": str(e)}
    cfg = SearchConfig.from_dict(m["config"])
    row = {"name": session.name, "model": cfg.model, "prune": cfg.prune, "trials": cfg.trials,
           "status": m.get("status", "?"), "updated": m.get("updated"), "done": 0, "best": None}
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
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.ERROR)
        study = optuna.load_study(study_name=session.study_name, storage=_storage(storage_url(session, cfg)))
        row["done"] = completed(study)
        b = _best(study)
        row["best"] = b[1] if b else None
    except Exception as e:  # a session whose study cannot be read still lists
        row["status"] = f"{row['status']} (study unreadable: {type(e).__name__})"
    return row
