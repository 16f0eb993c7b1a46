"""The configurations of every job, as dataclasses: light to import (no torch), so the CLI and the forms can
build and check them before anything heavy loads."""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields

from engine.errors import AdapruneError

EMBEDDED = "smollm2-135m"  # the default model, shipped inside a PyPI package (engine.model.load)
SELF = "self"  # calibration text sampled from the dense model itself (engine.data.text)
PROJ_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
PROJ_MLP = ("gate_proj", "up_proj", "down_proj")
PROJ = PROJ_ATTN + PROJ_MLP  # the prunable projections of a LLaMA-family decoder layer
DEFAULT_CALIB = "stdlib-docs:10x64"  # `adaprune prune`'s calibration: LLM-Pruner's 10 windows of 64 tokens
# layer-wise reconstruction (engine.prune.reconstruct): the model's own sampled text, measured best across
# held-out domains (bench/RESULTS.md)
RECONSTRUCT_CALIB = "self:128x128"
RECONSTRUCT_LAMBDA = 1.0
SEARCH_METRICS = ["taylor1", "taylor2", "taylor-mix", "vector", "wanda", "obs"]  # the metrics a search explores by default
METRICS = ("taylor1", "taylor2", "taylor-mix", "vector", "l1", "l2", "random", "wanda", "obs")
AGGREGATES = ("sum", "mean", "max", "prod", "last")
ALLOCATIONS = ("uniform", "global")
REPAIR_METRICS = {"obs"}  # scored from the repair's input moments (engine.prune.obs), not from calibration passes
SAMPLE_METRICS = ("vector", "taylor2", "wanda", "l1", "l2", "random")  # sums over samples: decomposable
GRAD_METRICS = {"taylor1", "taylor2", "taylor-mix", "vector"}  # a backward over the calibration windows
FISHER_METRICS = {"taylor2", "taylor-mix"}  # and the squared per-window gradients
ACT_METRICS = {"wanda"}


def from_dict(cls: type, data: dict, what: str):
    """A stored configuration back as its dataclass; a key it does not know is an error that names it (a newer
    schema is refused before this, by the session's schema version), never silently dropped."""
    return cls(**stored_fields(cls, data, f"{what} setting(s)", "a stored configuration"))


def stored_fields(cls: type, data: object, keys: str, where: str) -> dict:
    """`data`, a dict read from a file, checked against the fields of the dataclass `cls`: a key it does not
    know, or a required one it lacks, is an error naming the key and `where` it was read."""
    if not isinstance(data, dict):
        raise AdapruneError(f"{where} is not a JSON object: the file was damaged; remove it to go on")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise AdapruneError(f"unknown {keys} {', '.join(unknown)} in {where}: the file was edited or written by "
                            f"another adaprune; remove them to go on")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(data))
    if missing:
        raise AdapruneError(f"{where} lacks {', '.join(missing)}: the file was damaged; remove it to go on")
    return data


# --- checks every job and form shares (one home per rule) -------------------------------------------------

MAX_PRUNE = 0.9  # beyond this a LLaMA-family model keeps too little to be worth measuring


def check_prune(fraction: float) -> float:
    if not isinstance(fraction, (int, float)) or not 0 < fraction <= MAX_PRUNE:
        raise AdapruneError(f"--prune {fraction} is outside (0, {MAX_PRUNE}]: give the fraction of all parameters "
                            f"to remove, e.g. 0.20")
    return float(fraction)


def parse_attn_share(value: float | str) -> float | str:
    """auto (MLP channels first), same (LLM-Pruner's ratio), or the attention's share of the cut in [0, 1]."""
    if value in ("auto", "same"):
        return value
    try:
        share = float(value)
    except (TypeError, ValueError):
        raise AdapruneError(f"--attn-share {value!r}: give auto, same, or a number in [0, 1]") from None
    if not 0 <= share <= 1:
        raise AdapruneError(f"--attn-share {value} is outside [0, 1]")
    return share


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
    overrides: dict = field(default_factory=dict)  # user per-layer decisions (engine.prune.plan.parse_overrides)
    # optional zero-shot part of the objective: PPL x (dense accuracy / pruned accuracy) ** weight
    objective_tasks: list[str] = field(default_factory=list)  # local task files (JSONL, see engine.measure.zeroshot)
    objective_task_rows: int = 50  # rows per task, drawn with seed + 2; benchmarks of the same file skip them
    objective_task_weight: float = 1.0
    # layer-wise reconstruction as a searched dimension: its text is one of these sources or none
    repair_sources: list[str] | None = None  # None: the calibration sources (self included by default)
    repair_cache_gb: float = 2.0  # memory for the dense model's input statistics that repaired trials share

    @classmethod
    def from_dict(cls, data: dict) -> SearchConfig:
        return from_dict(cls, data, "search")


@dataclass
class RecoverConfig:
    data: list[str] = field(default_factory=lambda: ["stdlib-docs"])  # training text (calibration splits)
    plan: str = "best"  # the session's best plan, or plan:NAME (the app's overrides)
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 256
    lr: float = 1e-4
    warmup: int | None = None  # steps of linear warm-up (None: a tenth of the steps, at most 10), then decay
    rank: int = 8
    alpha: int = 16
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: list(PROJ))
    valid: list[str] = field(default_factory=lambda: ["stdlib-docs/valid"])
    valid_windows: int = 16
    valid_len: int = 128
    eval_every: int = 25
    save_every: int = 25
    seed: int = 0
    grad_checkpointing: bool = False  # trade compute for activation memory (large models on one GPU)
    # distillation: the loss is distil x KL(dense || pruned) over next-token distributions + (1 - distil) x the
    # language-modelling loss; 0 is plain LM (LLM-Pruner's recipe). The dense model is kept as the teacher.
    distil: float = 0.0

    @classmethod
    def from_dict(cls, data: dict) -> RecoverConfig:
        return from_dict(cls, data, "recovery")


@dataclass
class BenchConfig:
    tasks: list[str] = field(default_factory=list)  # lm-eval names or local .jsonl files
    limit: int | None = None  # rows per task, drawn with `seed`
    seed: int = 0
    ppl: list[str] = field(default_factory=list)  # text specs: wikitext2, ptb, c4, stdlib-docs, a file
    seq_lens: list[int] = field(default_factory=lambda: [128])
    ppl_windows: int | None = 40  # evenly spaced windows per text (None: the whole text)
    speed: bool = False
    batches: list[int] = field(default_factory=lambda: [1, 4])  # prefill batch sizes
    rows: list[str] | None = None  # None: every row the session can make
    batch_size: int = 8  # lm-eval batch


@dataclass
class PruneConfig:
    model: str = EMBEDDED
    prune: float = 0.20
    metric: str = "taylor1"
    aggregate: str = "sum"
    calib: str = DEFAULT_CALIB
    evals: list[str] = field(default_factory=lambda: ["stdlib-docs"])
    eval_seq_len: int = 128
    eval_windows: int | None = 40
    layers: str | None = None  # "A-B" (inclusive), "A,B,...", "all"; None: LLM-Pruner's range scaled
    head_mode: str = "query"
    attn_share: float | str = "auto"  # auto: MLP channels first; same: LLM-Pruner's ratio; or a number in [0, 1]
    round_to: int = 1
    allocation: str = "uniform"  # uniform: the same cut in every layer; global: one ranking across the range
    ramp: float = 0.0  # with uniform: > 0 prunes deeper layers more, at the same total
    seed: int = 0
    device: str = "auto"
    dtype: str = "auto"
    trust_remote_code: bool = False
    calib_batch: int = 4
    measure_speed: bool = True
    measure_memory: bool = True
    out: str | None = None
    force: bool = False
    overrides: dict = field(default_factory=dict)  # {"7": "lock"} or {"7": {"heads": K, "channels": C}}
    # layer-wise reconstruction of the kept o_proj/down_proj weights after slicing (engine.prune.reconstruct)
    reconstruct: bool = False
    reconstruct_calib: str = RECONSTRUCT_CALIB
    reconstruct_lambda: float = RECONSTRUCT_LAMBDA


def default_layer_range(n_layers: int) -> tuple[int, int]:
    """LLM-Pruner's LLaMA-7B recipe prunes layers 4..29 of 32 (first 4, last 2 kept); scale that to depth."""
    first = round(4 * n_layers / 32)
    last = round(2 * n_layers / 32)
    if n_layers - first - last < 1:
        return 0, n_layers
    return first, n_layers - last
