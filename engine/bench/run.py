"""One comparison table per session: dense, the best searched plan, trial 0 (LLM-Pruner's recipe), magnitude and
random at the best's parameter count, and any plan the user saved — PPL, zero-shot accuracy, speed, memory.

Results live in the session (`bench.json`, written after every measurement, so an error later keeps what was
computed) with what made each number: package versions, seeds, limits, text and task-file hashes. Rows are
keyed by their plan's hash: when the search finds a new best, that row's old numbers are dropped, not mixed.
"""

from __future__ import annotations

import copy
import os
import platform
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, replace
from pathlib import Path

from engine.bench.outdated import row_identity
from engine.config import SELF, BenchConfig, SearchConfig
from engine.control import Control
from engine.data.text import load_text, parse_spec, text_hash
from engine.data.windows import eval_windows, tokenize
from engine.errors import AdapruneError
from engine.events import Log, Metric, Sink, null_sink
from engine.hub import hub_reachable
from engine.measure.evaluate import peak_memory, perplexity, speed
from engine.measure.zeroshot import TaskSpec, parse_task, zero_shot
from engine.model.export import export
from engine.model.load import Loaded, load_configured
from engine.model.structure import count_params, decoder_layers
from engine.oneshot import oneshot_config, plan_and_prune
from engine.prune.plan import Plan
from engine.prune.reconstruct import apply_stored_plan
from engine.recover.train import loss_name, recovered_model
from engine.search.data import SearchData, objective_task_indices
from engine.search.params import TrialParams
from engine.search.space import baseline_params
from engine.search.trial import prune_trial
from engine.session.layout import (
    RESULTS,
    best_record,
    recovery_state,
    saved_plans,
    session_plan,
)
from engine.session.requests import SessionControl
from engine.session.store import Session


def validate(cfg: BenchConfig) -> tuple[list[TaskSpec], dict[str, str]]:
    """Everything checkable before a model is loaded: task files row by row, PPL texts readable."""
    if cfg.limit is not None and cfg.limit < 1:
        raise AdapruneError(f"--limit {cfg.limit}: give a positive number of rows per task")
    if any(n < 2 for n in cfg.seq_lens):
        raise AdapruneError(f"--seq-len {min(cfg.seq_lens)}: give PPL windows of at least 2 tokens (128 or 2048 "
                            f"are the usual)")
    if cfg.ppl_windows is not None and cfg.ppl_windows < 1:
        raise AdapruneError(f"--ppl-windows {cfg.ppl_windows}: give a positive number of windows (0: the whole "
                            f"text)")
    if any(b < 1 for b in cfg.batches):
        raise AdapruneError(f"--batch {min(cfg.batches)}: give prefill batch sizes of at least 1")
    tasks = [parse_task(t) for t in cfg.tasks]
    hub_tasks = [t.name for t in tasks if t.path is None]
    if hub_tasks and os.environ.get("HF_DATASETS_OFFLINE") != "1" and not hub_reachable():
        # else lm-eval's datasets retry for a minute, after the model is loaded and the dense rows measured
        raise AdapruneError(f"task {hub_tasks[0]!r} needs the Hugging Face hub, which is unreachable: give a local "
                            f".jsonl task file (query/choices/gold rows), or set HF_DATASETS_OFFLINE=1 if its "
                            f"dataset is in your cache")
    texts = {}
    for spec in cfg.ppl:
        if parse_spec(spec).name == SELF:
            raise AdapruneError("'self' is sampled calibration text, not a benchmark: name a text or a file")
        texts[spec] = load_text(spec, "eval")
    return tasks, texts


def environment(loaded) -> dict:
    import torch
    import transformers

    try:
        import lm_eval

        lm = getattr(lm_eval, "__version__", "?")
    except ImportError:
        lm = None
    from importlib.metadata import version

    return {"adaprune": version("adaprune"), "torch": torch.__version__, "transformers": transformers.__version__,
            "lm_eval": lm, "python": platform.python_version(), "device": str(loaded.device),
            "dtype": str(loaded.dtype).removeprefix("torch."), "machine": platform.machine()}


def check_rows(session: Session, wanted: list[str] | None) -> list[str]:
    """The rows asked for (default: every row the session can make), refused by name before any work."""
    best = best_record(session)
    user = saved_plans(session)
    state = recovery_state(session)
    recovered = state is not None and state.status == "done"
    available = ["dense", *(["best", "magnitude", "random"] if best else []), "baseline", "oneshot",
                 "oneshot-repaired",
                 *[f"plan:{p}" for p in user], *(["recovered"] if recovered else [])]
    for n in wanted or []:
        if n not in available:
            hint = "" if best else " (the search has no completed trial yet)"
            raise AdapruneError(f"no row {n!r} in session {session.name!r}{hint}: choose from {', '.join(available)}")
    return available if wanted is None else list(wanted)


def row_models(session: Session, loaded, wanted: list[str] | None, windows_for, sink: Sink,
               control: Control) -> Iterator[tuple[str, dict | None, dict | None, object]]:
    """Each row in turn as (name, plan, the configuration a derived plan was made from, model), made only
    when its turn comes, so the first numbers arrive before the last plan is made. A derived plan (trial 0,
    oneshot, magnitude, random) is made once and kept in bench.json; the model it was made on is measured."""
    best = best_record(session)
    # derived rows keep the layers the best plan kept (its overrides), not edits the session took on later
    # (those are the row plan:overrides): every row answers "what if best had been made another way"
    made_with = (best.plan if best else {}).get("recipe", {}).get("overrides", {})
    cfg = replace(SearchConfig.from_dict(session.config()), overrides={
        i: "lock" if list(kc) == [0, 0] else {"heads": kc[0], "channels": kc[1]} for i, kc in made_with.items()})
    names = check_rows(session, wanted)
    n_layers = len(decoder_layers(loaded.model))
    derived = {"baseline": {**baseline_params(cfg, n_layers), **cfg.fixed}}
    oneshot = {"oneshot": oneshot_config(cfg), "oneshot-repaired": oneshot_config(cfg, repaired=True)}
    derived.update({name: asdict(c) for name, c in oneshot.items()})
    if best:
        derived["magnitude"] = {**best.params, "metric": "l2", "metric2": "none"}
        derived["random"] = {**best.params, "metric": "random", "metric2": "none"}
    saved = session.read_json(RESULTS) or {}
    data = SearchData(session, cfg, loaded, sink, control)
    dense = loaded.model  # never cut: every row works on a copy
    for name in names:
        control.checkpoint()
        params = derived.get(name)
        if name == "dense":
            yield name, None, None, dense
            continue
        if name == "recovered":
            plan = session_plan(session, recovery_state(session).plan)
            yield name, plan, None, recovered_model(session, copy.deepcopy(dense), windows_for)[0]
            continue
        if name == "best":
            plan = best.plan
        elif name.startswith("plan:"):
            plan = session_plan(session, name)
        else:
            old = saved.get("rows", {}).get(name, {})
            same = old.get("params_config") == params and old.get("plan") and \
                old["plan"].get("recipe", {}).get("overrides", {}) == made_with
            plan = old["plan"] if same else None
        model = copy.deepcopy(dense)
        if plan is not None:
            apply_stored_plan(model, Plan.from_dict(plan), windows_for, control, sink)
        elif name in oneshot:  # through `adaprune prune`'s own code: its windows, its sequential repair
            copied = Loaded(model, loaded.tokenizer, loaded.name, loaded.folder, loaded.device, loaded.dtype)
            plan = plan_and_prune(copied, oneshot[name], sink, control)[0].to_dict()
        else:
            plan, _ = prune_trial(model, data, cfg, TrialParams.from_dict(params), control, sink)
        yield name, plan, params, model


def _objective_rows(scfg: SearchConfig) -> dict[str, set[int]]:
    """Task rows the search's objective scored, by file hash: they are never benchmark rows."""
    seen: dict[str, set[int]] = {}
    for t in scfg.objective_tasks:
        o = parse_task(t)
        if o.path is not None:
            seen[o.sha256] = set(objective_task_indices(o, scfg))
    return seen


def _ppl_windows(tokenizer, texts: dict[str, str], cfg: BenchConfig) -> dict[str, tuple]:
    """'SPEC@LEN' -> (windows, text hash, spec, length) for every PPL text and window length."""
    windows = {}
    for spec, text in texts.items():
        ids = tokenize(tokenizer, text)
        for n in cfg.seq_lens:
            windows[f"{spec}@{n}"] = (eval_windows(ids, n, cfg.ppl_windows), text_hash(text), spec, n)
    return windows


def run_bench(session: Session, cfg: BenchConfig, sink: Sink = null_sink, control: Control | None = None,
              since: float | None = None) -> dict:
    """Measure the rows and merge the numbers into the session's bench.json; returns its contents.

    Its events go to the session's log too, and pause/cancel requests from any process made since `since`
    (default: now) are obeyed, so an app that started it in a process of its own follows and controls it."""
    tasks, texts = validate(cfg)
    check_rows(session, cfg.rows)
    sink = session.logged(sink, "bench")
    control = SessionControl(session, "bench", sink, control, since)
    with session.lock("bench"):
        return _measure(session, cfg, tasks, texts, sink, control)


def _measure(session: Session, cfg: BenchConfig, tasks, texts, sink: Sink, control: Control) -> dict:
    scfg = SearchConfig.from_dict(session.config())
    loaded = load_configured(scfg, sink, frozen=True)
    seen = _objective_rows(scfg)
    dense_params = count_params(loaded.model)
    results = session.read_json(RESULTS) or {"rows": {}}
    env = environment(loaded)
    windows = _ppl_windows(loaded.tokenizer, texts, cfg)

    def save() -> None:  # after every number: an interrupted run keeps what it measured
        session.write_json(RESULTS, results)

    dense_model = loaded.model
    windows_for = SearchData(session, scfg, loaded, sink, control).repair_windows  # for repaired plans
    for name, plan, params_config, model in row_models(session, loaded, cfg.rows, windows_for, sink, control):
        row = results["rows"].get(name, {})
        ident = row_identity(session, name, plan)
        if row.get("plan_id") != ident:
            row = {}  # a different plan now (e.g. a new best): its old numbers describe another model
        if name == "recovered":
            row["recovery_loss"] = loss_name(recovery_state(session).config)
        row.update(plan_id=ident, params=count_params(model), env=env,
                   recipe=(plan or {}).get("recipe", {}), plan=plan if params_config is not None else None,
                   params_config=params_config)
        results["rows"][name] = row
        save()
        for key, (w, digest, spec, n) in windows.items():
            value = perplexity(model, w, control=control, sink=sink, stage=f"PPL {key} ({name})")
            sink(Metric(f"ppl:{key}", value, name))
            row.setdefault("ppl", {})[key] = {"value": value, "text": spec, "sha256": digest, "seq_len": n,
                                              "windows": int(w.shape[0]), "tokens": int(w.numel())}
            save()
        for spec in tasks:
            skip = seen.get(spec.sha256, set()) if spec.path is not None else set()
            r = zero_shot(model, loaded.tokenizer, [spec], cfg.limit, cfg.seed, cfg.batch_size, control, sink,
                          name, exclude=skip)[spec.name]
            sink(Metric(f"acc:{spec.name}", r.acc, name))
            row.setdefault("zeroshot", {})[spec.name] = {**r.to_dict(), "objective_rows_left_out": len(skip)}
            save()
        if cfg.speed:
            row["speed"] = _speed(model, cfg, name, sink)
            save()
            row["memory_mib"] = _memory(loaded, model, name, sink, export)
            save()
        if model is not dense_model:
            del model
    results["dense_params"] = dense_params
    save()
    return results


def _speed(model, cfg: BenchConfig, name: str, sink: Sink) -> dict:
    runs = [speed(model, model.config.vocab_size, batch=b, sink=sink, stage=f"speed b{b} ({name})")
            for b in cfg.batches]
    return {"prefill_tok_s": {str(s.batch): s.prefill_tok_s for s in runs},
            "decode_tok_s": runs[0].decode_tok_s, "ttft_ms": runs[0].ttft_s * 1e3,
            "prompt_len": runs[0].prompt_len, "new_tokens": runs[0].new_tokens,
            "repeats": runs[0].repeats, "statistic": "median after one warm-up"}


def _memory(loaded, model, name: str, sink: Sink, export) -> float | None:
    """Peak memory in a fresh process (engine.measure.memprobe), from a saved copy of the row's model."""
    dt = str(loaded.dtype).removeprefix("torch.")
    tmp = Path(tempfile.mkdtemp(prefix="adaprune-mem-"))
    try:
        folder = loaded.folder
        if name != "dense" or folder is None:
            folder = tmp / "model"
            export(model, loaded.tokenizer, folder, True, None, null_sink)
        return peak_memory(folder, str(loaded.device), dt, sink=sink, stage=f"memory ({name})")
    except AdapruneError as e:
        sink(Log(f"{name}: {e}", "warning"))
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
