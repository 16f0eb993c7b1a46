"""`adaprune prune`: load, score, plan, prune physically, repair, evaluate dense against pruned, export."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.config import ALLOCATIONS, REPAIR_METRICS, SELF, PruneConfig, check_prune, default_layer_range
from engine.control import Control
from engine.data.text import check_calib, check_source, load_text, parse_spec, text_hash
from engine.data.windows import draw_windows, eval_windows, tokenize
from engine.errors import AdapruneError
from engine.events import Log, Metric, Sink, null_sink
from engine.measure.evaluate import Speed, peak_memory, perplexity, speed
from engine.model.export import check_out_dir, export
from engine.model.load import Loaded, announce_memory, load_configured
from engine.model.spec import check_model
from engine.model.structure import count_params, layer_shapes
from engine.prune.importance import check_metric
from engine.prune.plan import Plan, check_attn_share, parse_overrides, removal_of, solve_uniform
from engine.prune.recipe import Recipe, prune_with
from engine.prune.reconstruct import (
    Repair,
    check_repair,
    pruned_layer_ids,
    reconstruct,
    repair_windows,
    snapshot_layers,
)


@dataclass
class ModelReport:
    params: int
    ppl: dict[str, float] = field(default_factory=dict)
    speed: Speed | None = None
    peak_mib: float | None = None


@dataclass
class PruneResult:
    config: PruneConfig
    plan: Plan
    dense: ModelReport
    pruned: ModelReport
    export_format: str | None
    out: str | None
    prune_seconds: float
    texts: dict[str, str]  # spec -> sha256 prefix of the text used

    def to_dict(self) -> dict:
        return asdict(self)


def parse_layers(spec: str | None, n_layers: int) -> list[int]:
    if spec is None:
        a, b = default_layer_range(n_layers)
        return list(range(a, b))
    s = spec.strip().lower()
    try:
        if s == "all":
            ids = list(range(n_layers))
        elif "-" in s and "," not in s:
            a, b = (int(x) for x in s.split("-"))
            ids = list(range(a, b + 1))
        else:
            ids = sorted({int(x) for x in s.split(",") if x.strip()})
    except ValueError:
        raise AdapruneError(f"cannot read --layers {spec!r}: use A-B (inclusive), A,B,C or all") from None
    if not ids or ids[0] < 0 or ids[-1] >= n_layers:
        raise AdapruneError(f"--layers {spec!r} is outside the model's layers 0..{n_layers - 1}")
    return ids


def validate(cfg: PruneConfig) -> None:
    """Everything that can be checked before the model is loaded, so a typo costs no time."""
    check_prune(cfg.prune)
    check_metric(cfg.metric, cfg.aggregate)
    if cfg.head_mode not in ("query", "kv"):
        raise AdapruneError(f"--heads {cfg.head_mode!r}: choose 'query' (heads inside each KV group) or 'kv'")
    check_attn_share(cfg.attn_share)
    if cfg.allocation not in ALLOCATIONS:
        raise AdapruneError(f"--allocation {cfg.allocation!r}: choose {' or '.join(ALLOCATIONS)}")
    if not -1 < cfg.ramp < 1 or (cfg.ramp and cfg.allocation == "global"):
        raise AdapruneError(f"--ramp {cfg.ramp}: a slope in (-1, 1), and only with --allocation uniform")
    if cfg.round_to < 1:
        raise AdapruneError(f"--round-to {cfg.round_to} must be a positive integer (1, 8, 64, ...)")
    check_calib(cfg.calib)
    for e in cfg.evals:
        if check_source(e, "eval").name == SELF:
            raise AdapruneError(f"--eval {e}: 'self' is sampled calibration text, not an evaluation text")
    if cfg.reconstruct:
        check_repair(cfg.reconstruct_calib, cfg.reconstruct_lambda)
    elif cfg.metric in REPAIR_METRICS:
        raise AdapruneError(f"--metric {cfg.metric} scores what the repair cannot compensate: add --reconstruct")
    if cfg.eval_seq_len < 2 or (cfg.eval_windows is not None and cfg.eval_windows < 1):
        raise AdapruneError("evaluation needs windows of at least 2 tokens and at least one window")
    if cfg.out:
        check_out_dir(Path(cfg.out), cfg.force)
    check_model(cfg.model)  # last: the options above are refused even when the model is missing too


def oneshot_config(scfg, repaired: bool = False) -> PruneConfig:
    """`adaprune prune`'s defaults (with `repaired`, plus `--reconstruct`'s) for a search session's model and
    target: the strongest fixed recipes, which a searched result must beat at the same parameter count."""
    return PruneConfig(model=scfg.model, prune=scfg.prune, head_mode=scfg.head_mode, round_to=scfg.round_to,
                       device=scfg.device, dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code,
                       seed=scfg.seed, measure_speed=False, measure_memory=False, reconstruct=repaired)


def calibration_windows(loaded: Loaded, spec_text: str, seed: int, sink: Sink, control: Control):
    return draw_windows(loaded.model, loaded.tokenizer, spec_text, seed, sink, control=control)


def evaluate_texts(loaded: Loaded, texts: dict[str, object], label: str, sink: Sink,
                   control: Control) -> dict[str, float]:
    out = {}
    for name, windows in texts.items():
        ppl = perplexity(loaded.model, windows, control=control, sink=sink, stage=f"PPL {name} ({label})")
        sink(Metric(f"ppl:{name}", ppl, label))
        out[name] = ppl
    return out


def evaluation_sets(tokenizer, cfg: PruneConfig) -> tuple[dict[str, object], dict[str, str]]:
    """Token windows per evaluation text, and each text's hash (texts change, e.g. between Python versions)."""
    sets, hashes = {}, {}
    for e in cfg.evals:
        spec = parse_spec(e)
        text = load_text(spec, "eval")
        hashes[str(spec)] = text_hash(text)
        sets[str(spec)] = eval_windows(tokenize(tokenizer, text), cfg.eval_seq_len, cfg.eval_windows)
    return sets, hashes


def measure(loaded: Loaded, sets: dict[str, object], cfg: PruneConfig, label: str, sink: Sink,
            control: Control) -> ModelReport:
    model = loaded.model
    report = ModelReport(count_params(model))
    report.ppl = evaluate_texts(loaded, sets, label, sink, control)
    if cfg.measure_speed:
        report.speed = speed(model, model.config.vocab_size, sink=sink, stage=f"speed ({label})")
    return report


def plan_and_prune(loaded: Loaded, cfg: PruneConfig, sink: Sink = null_sink,
                   control: Control | None = None) -> tuple[Plan, str]:
    """Score with the recipe in `cfg`, choose per-layer removals for the target, and prune in place.

    Returns the plan and the hash of the calibration text.
    """
    control = control or Control()
    layer_ids = parse_layers(cfg.layers, len(layer_shapes(loaded.model)))
    repair = Repair(cfg.reconstruct_calib, cfg.reconstruct_lambda, seed=cfg.seed) if cfg.reconstruct else None
    # drawn from the dense model (self text is sampled from it), before anything is sliced
    repair_win = repair_windows(loaded, repair, sink, control) if repair else None
    windows, calib_hash = calibration_windows(loaded, cfg.calib, cfg.seed, sink, control)
    shapes = layer_shapes(loaded.model)
    overrides = parse_overrides(cfg.overrides, len(shapes), shapes, cfg.head_mode)
    dense_layers = snapshot_layers(loaded.model, sorted(set(layer_ids) | set(overrides))) if repair else {}
    recipe = Recipe(cfg.prune, cfg.metric, cfg.aggregate, cfg.head_mode, cfg.attn_share, cfg.round_to, cfg.seed,
                    cfg.ramp, cfg.allocation, repair, cfg.calib_batch, {"calib": cfg.calib})
    plan = prune_with(loaded.model, recipe, layer_ids, windows, overrides=overrides, control=control, sink=sink)
    if repair:
        cut = pruned_layer_ids(shapes, plan.layers)
        reconstruct(loaded.model, {i: dense_layers[i] for i in cut}, plan.layers, repair_win, repair.lam,
                    control=control, sink=sink)
        del dense_layers
    return plan, calib_hash


def prune(cfg: PruneConfig, sink: Sink = null_sink, control: Control | None = None) -> PruneResult:
    """Load, score, plan, prune physically, evaluate dense vs pruned, export."""
    control = control or Control()
    validate(cfg)
    announce_memory(cfg, "prune", {cfg.metric}, cfg.reconstruct, sink, batch=cfg.calib_batch)
    loaded = load_configured(cfg, sink)
    # fail on an impossible target before any evaluation time is spent
    shapes = layer_shapes(loaded.model)
    overrides = parse_overrides(cfg.overrides, len(shapes), shapes, cfg.head_mode)
    layer_ids = [i for i in parse_layers(cfg.layers, len(shapes)) if i not in overrides]
    solve_uniform(shapes, layer_ids, count_params(loaded.model), cfg.prune, cfg.head_mode, cfg.attn_share,
                  cfg.round_to, removal_of(shapes, overrides, cfg.head_mode))
    sets, hashes = evaluation_sets(loaded.tokenizer, cfg)
    dense = measure(loaded, sets, cfg, "dense", sink, control)
    t0 = time.perf_counter()
    plan, hashes[cfg.calib] = plan_and_prune(loaded, cfg, sink, control)
    prune_seconds = time.perf_counter() - t0
    pruned = measure(loaded, sets, cfg, "pruned", sink, control)

    fmt = None
    if cfg.out:
        out = Path(cfg.out)
        card = {"title": f"{cfg.model} pruned by {plan.removed / plan.params_before:.1%}",
                "recipe": {"base model": cfg.model, "target": f"{cfg.prune:.0%} of all parameters", **plan.recipe},
                "results": _card_results(dense, pruned)}
        fmt = export(loaded.model, loaded.tokenizer, out, cfg.force, card, sink)
        (out / "adaprune_plan.json").write_text(json.dumps(plan.to_dict()) + "\n", encoding="utf-8")
        if cfg.measure_memory and loaded.folder is not None:
            dt = str(loaded.dtype).removeprefix("torch.")
            try:
                dense.peak_mib = peak_memory(loaded.folder, str(loaded.device), dt, sink=sink, stage="memory (dense)")
                pruned.peak_mib = peak_memory(out, str(loaded.device), dt, sink=sink, stage="memory (pruned)")
            except AdapruneError as e:  # the model is saved already; a failed measurement must not lose it
                sink(Log(str(e), "warning"))
    return PruneResult(cfg, plan, dense, pruned, fmt, cfg.out, prune_seconds, hashes)


def _card_results(dense: ModelReport, pruned: ModelReport) -> dict[str, tuple[str, str]]:
    rows = {"parameters": (f"{dense.params:,}", f"{pruned.params:,}")}
    for name in dense.ppl:
        rows[f"PPL {name}"] = (f"{dense.ppl[name]:.2f}", f"{pruned.ppl[name]:.2f}")
    if dense.speed and pruned.speed:
        rows["prefill tokens/s"] = (f"{dense.speed.prefill_tok_s:.0f}", f"{pruned.speed.prefill_tok_s:.0f}")
        rows["decode tokens/s"] = (f"{dense.speed.decode_tok_s:.1f}", f"{pruned.speed.decode_tok_s:.1f}")
    return rows
