"""The engine's small public face: one call per job, reporting through events and obeying a Control."""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.control import Control
from engine.errors import AdapruneError
from engine.evaluate import Speed, peak_memory, perplexity, speed
from engine.events import Log, Metric, Sink, Stage, null_sink
from engine.export import check_out_dir, export
from engine.importance import check_metric
from engine.models import EMBEDDED, Loaded, load
from engine.plan import ALLOCATIONS, Plan, check_attn_share, parse_overrides, removal_of, solve_uniform
from engine.recipe import prune_with
from engine.reconstruct import DEFAULT_CALIB as RECONSTRUCT_CALIB
from engine.reconstruct import DEFAULT_LAMBDA as RECONSTRUCT_LAMBDA
from engine.reconstruct import (
    Repair,
    check_repair,
    pruned_layer_ids,
    reconstruct,
    repair_windows,
    snapshot_layers,
)
from engine.structure import count_params, default_layer_range, layer_shapes
from engine.text import (
    draw_windows,
    eval_windows,
    load_text,
    parse_spec,
    text_hash,
    tokenize,
)

DEFAULT_CALIB = "stdlib-docs:10x64"  # LLM-Pruner's recipe: 10 windows of 64 tokens


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
    # layer-wise reconstruction of the kept o_proj/down_proj weights after slicing (engine.reconstruct)
    reconstruct: bool = False
    reconstruct_calib: str = RECONSTRUCT_CALIB
    reconstruct_lambda: float = RECONSTRUCT_LAMBDA


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
    if not 0 < cfg.prune <= 0.9:
        raise AdapruneError(f"--prune {cfg.prune} is outside (0, 0.9]: give the fraction of all parameters to remove")
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
    spec = parse_spec(cfg.calib)
    if spec.n is None:
        raise AdapruneError(f"--calib {cfg.calib!r} needs a size: add :NxL, e.g. {spec.name}:10x64")
    for e in cfg.evals:
        parse_spec(e)
    if cfg.reconstruct:
        check_repair(cfg.reconstruct_calib, cfg.reconstruct_lambda)
    if cfg.eval_seq_len < 2 or (cfg.eval_windows is not None and cfg.eval_windows < 1):
        raise AdapruneError("evaluation needs windows of at least 2 tokens and at least one window")
    if cfg.out:
        check_out_dir(Path(cfg.out), cfg.force)


def oneshot_config(scfg, repaired: bool = False) -> PruneConfig:
    """`adaprune prune`'s defaults (with `repaired`, plus `--reconstruct`'s) for a search session's model and
    target: the strongest fixed recipes, which a searched result must beat at the same parameter count."""
    return PruneConfig(model=scfg.model, prune=scfg.prune, head_mode=scfg.head_mode, round_to=scfg.round_to,
                       device=scfg.device, dtype=scfg.dtype, trust_remote_code=scfg.trust_remote_code,
                       seed=scfg.seed, measure_speed=False, measure_memory=False, reconstruct=repaired)


def calibration_windows(loaded: Loaded, spec_text: str, seed: int, sink: Sink, control: Control):
    return draw_windows(loaded.model, loaded.tokenizer, spec_text, seed, sink)


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
    repair_win = repair_windows(loaded, repair, sink) if repair else None
    windows, calib_hash = calibration_windows(loaded, cfg.calib, cfg.seed, sink, control)
    shapes = layer_shapes(loaded.model)
    overrides = parse_overrides(cfg.overrides, len(shapes), shapes, cfg.head_mode)
    dense_layers = snapshot_layers(loaded.model, sorted(set(layer_ids) | set(overrides))) if repair else {}
    plan = prune_with(loaded.model, windows, layer_ids, cfg.prune, cfg.metric, cfg.aggregate, cfg.head_mode,
                      cfg.attn_share, cfg.round_to, cfg.seed, cfg.calib_batch, control, sink, {"calib": cfg.calib},
                      overrides=overrides, ramp=cfg.ramp, allocation=cfg.allocation, repair=repair)
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
    loaded = load(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, sink=sink)
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


WIDTHS = ("plan", "uniform")


def export_session(root: Path, name: str, out: Path, force: bool = False, sink: Sink = null_sink,
                   widths: str = "plan", control: Control | None = None, recovered: bool = False) -> str:
    """Export a session's best model as a Hugging Face folder.

    widths="plan": the best plan as searched (per-layer widths unless every layer came out equal);
    "uniform": re-planned from the best configuration with the same cut in every layer (no protected layers,
    no ramp or global ranking, no overrides), so a standard config describes it and plain `transformers`
    loads it — a different, usually slightly worse, model, whose objective is reported in the card.
    """
    from engine.plan import Plan
    from engine.reconstruct import apply_stored_plan
    from engine.search import SearchConfig, SearchData, progressive_objective, prune_trial
    from engine.session import Session

    if widths not in WIDTHS:
        raise AdapruneError(f"--widths {widths!r}: choose plan or uniform")
    session = Session.open(root, name)
    check_out_dir(out, force)
    best = session.read_json("plan.json")
    if best is None:
        raise AdapruneError(f"session {name!r} has no completed trial yet: run or resume its search first")
    cfg = SearchConfig.from_dict(session.config())
    if recovered and widths != "plan":
        raise AdapruneError("--recovered exports the plan its adapter was trained on: leave --widths at plan")
    loaded = load(cfg.model, cfg.device, cfg.dtype, cfg.trust_remote_code, sink=sink)
    plan = Plan.from_dict(best["plan"])
    if plan.params_before != count_params(loaded.model):
        raise AdapruneError(f"session {name!r}: its model {cfg.model!r} no longer matches the plan (parameter count)")
    recipe = {"base model": cfg.model, "session": name, "trial": best["trial"],
              "objective": f"{best['value']:.4f}"}
    if recovered:
        from engine.recover import RecoverConfig, loss_name, recovered_model, session_plan

        windows_for = SearchData(session, cfg, loaded, sink, control or Control()).repair_windows
        loaded.model, state = recovered_model(session, loaded.model, windows_for)
        plan = Plan.from_dict(session_plan(session, state["plan"]))
        c = state["config"]
        recipe["recovery"] = (f"LoRA r={c['rank']} alpha={c['alpha']} on {', '.join(c['targets'])}, {state['step']} "
                              f"steps of {c['batch_size']}x{c['seq_len']} tokens at lr {c['lr']:g} on "
                              f"{', '.join(c['data'])}, loss {loss_name(RecoverConfig.from_dict(c))}; merged; "
                              f"validation PPL {state['valid_ppl_before']:.2f} -> "
                              f"{state['valid_ppl_after']:.2f}")
        best = {**best, "plan": plan.to_dict(), "recovery": {k: v for k, v in state.items() if k != "history"}}
    elif widths == "uniform":
        control = control or Control()
        if cfg.overrides:
            sink(Log("uniform widths ignore the session's per-layer overrides", "warning"))
        cfg.overrides = {}
        loaded.model.requires_grad_(False)
        params = {**best["params"], "first_kept": 0, "last_kept": 0, "allocation": "uniform", "ramp": 0.0}
        data = SearchData(session, cfg, loaded, sink, control)
        uniform, _ = prune_trial(loaded.model, data, cfg, params, control, sink)
        plan = Plan.from_dict(uniform)
        with Stage(sink, "objective (uniform widths)"):
            value = progressive_objective(loaded.model, data.objective_sets(), control)
        sink(Log(f"uniform widths: objective {value:.3f} (the searched plan: {best['value']:.3f})"))
        recipe.update(objective=f"{value:.4f} (uniform re-plan; searched plan {best['value']:.4f})")
        best = {**best, "plan": uniform, "value": value, "widths": "uniform"}
    else:
        windows_for = SearchData(session, cfg, loaded, sink, control or Control()).repair_windows
        apply_stored_plan(loaded.model, plan, windows_for, control, sink)
    how = " and LoRA-recovered" if recovered else ""
    card = {"title": f"{cfg.model} pruned by {plan.removed / plan.params_before:.1%}{how} (adaprune search)",
            "recipe": {**recipe, **plan.recipe}}
    fmt = export(loaded.model, loaded.tokenizer, out, force, card, sink)
    (out / "adaprune_plan.json").write_text(json.dumps(best) + "\n", encoding="utf-8")
    return fmt


def _card_results(dense: ModelReport, pruned: ModelReport) -> dict[str, tuple[str, str]]:
    rows = {"parameters": (f"{dense.params:,}", f"{pruned.params:,}")}
    for name in dense.ppl:
        rows[f"PPL {name}"] = (f"{dense.ppl[name]:.2f}", f"{pruned.ppl[name]:.2f}")
    if dense.speed and pruned.speed:
        rows["prefill tokens/s"] = (f"{dense.speed.prefill_tok_s:.0f}", f"{pruned.speed.prefill_tok_s:.0f}")
        rows["decode tokens/s"] = (f"{dense.speed.decode_tok_s:.1f}", f"{pruned.speed.decode_tok_s:.1f}")
    return rows
