"""One comparison table per session: dense, the best searched plan, trial 0 (LLM-Pruner's recipe), magnitude and
random at the best's parameter count, and any plan the user saved — PPL, zero-shot accuracy, speed, memory.

Results live in the session (`bench.json`, written after every measurement, so an error later keeps what was
computed) with what made each number: package versions, seeds, limits, text and task-file hashes. Rows are
keyed by their plan's hash: when the search finds a new best, that row's old numbers are dropped, not mixed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

from engine.control import Control
from engine.errors import AdapruneError
from engine.evaluate import peak_memory, perplexity, speed
from engine.events import Log, Metric, Sink, null_sink
from engine.plan import Plan
from engine.reconstruct import apply_stored_plan
from engine.recover import RecoverConfig, adapter_id, loss_name, recovered_model, recovery_state, session_plan
from engine.session import Session
from engine.structure import count_params
from engine.text import SELF, eval_windows, load_text, parse_spec, text_hash, tokenize
from engine.zeroshot import TaskSpec, parse_task, zero_shot

ROWS = ["dense", "best", "recovered", "baseline", "oneshot", "oneshot-repaired", "magnitude", "random"]
RESULTS = "bench.json"
PLANS = "plans"  # user plans (the app's overrides) as <name>.json Plan dicts; rows named plan:<name>


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


def validate(cfg: BenchConfig) -> tuple[list[TaskSpec], dict[str, str]]:
    """Everything checkable before a model is loaded: task files row by row, PPL texts readable."""
    if cfg.limit is not None and cfg.limit < 1:
        raise AdapruneError(f"--limit {cfg.limit}: give a positive number of rows per task")
    if any(n < 2 for n in cfg.seq_lens) or (cfg.ppl_windows is not None and cfg.ppl_windows < 1):
        raise AdapruneError("PPL needs windows of at least 2 tokens and at least one window")
    if any(b < 1 for b in cfg.batches):
        raise AdapruneError("prefill batch sizes must be positive")
    tasks = [parse_task(t) for t in cfg.tasks]
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


def plan_id(plan: dict | None) -> str:
    return "dense" if plan is None else hashlib.sha1(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:12]


def check_rows(session: Session, wanted: list[str] | None) -> list[str]:
    """The rows asked for (default: every row the session can make), refused by name before any work."""
    best = session.read_json("plan.json")
    user = sorted((session.path / PLANS).glob("*.json")) if (session.path / PLANS).is_dir() else []
    recovered = (recovery_state(session) or {}).get("status") == "done"
    available = ["dense", *(["best", "magnitude", "random"] if best else []), "baseline", "oneshot",
                 "oneshot-repaired",
                 *[f"plan:{p.stem}" for p in user], *(["recovered"] if recovered else [])]
    for n in wanted or []:
        if n not in available:
            hint = "" if best else " (the search has no completed trial yet)"
            raise AdapruneError(f"no row {n!r} in session {session.name!r}{hint}: choose from {', '.join(available)}")
    return available if wanted is None else list(wanted)


def row_plans(session: Session, loaded, wanted: list[str] | None, sink: Sink,
              control: Control) -> tuple[dict[str, dict | None], dict[str, dict]]:
    """Each row's plan (None for dense): saved ones read, derived ones (trial 0, magnitude, random) made."""
    from engine.api import oneshot_config, plan_and_prune
    from engine.models import Loaded
    from engine.search import SearchConfig, SearchData, baseline_params, prune_trial
    from engine.structure import decoder_layers

    cfg = SearchConfig.from_dict(session.config())
    best = session.read_json("plan.json")
    names = check_rows(session, wanted)
    n_layers = len(decoder_layers(loaded.model))
    derived = {"baseline": {**baseline_params(cfg, n_layers), **cfg.fixed}}
    oneshot = {"oneshot": oneshot_config(cfg), "oneshot-repaired": oneshot_config(cfg, repaired=True)}
    derived.update({name: asdict(c) for name, c in oneshot.items()})
    if best:
        derived["magnitude"] = {**best["params"], "metric": "l2", "metric2": "none"}
        derived["random"] = {**best["params"], "metric": "random", "metric2": "none"}
    saved = session.read_json(RESULTS) or {}
    data = SearchData(session, cfg, loaded, sink, control)
    plans: dict[str, dict | None] = {}
    for name in names:
        if name == "dense":
            plans[name] = None
        elif name == "best":
            plans[name] = best["plan"]
        elif name.startswith("plan:"):
            plans[name] = json.loads((session.path / PLANS / f"{name[5:]}.json").read_text(encoding="utf-8"))
        elif name == "recovered":
            plans[name] = session_plan(session, recovery_state(session)["plan"])
        else:
            params = derived[name]
            old = saved.get("rows", {}).get(name, {})
            if old.get("params_config") == params and old.get("plan"):
                plans[name] = old["plan"]  # made before from the same configuration: same plan
                continue
            model = copy.deepcopy(loaded.model)
            if name in oneshot:  # through `adaprune prune`'s own code: its windows, its sequential repair
                copied = Loaded(model, loaded.tokenizer, loaded.name, loaded.folder, loaded.device, loaded.dtype)
                plans[name] = plan_and_prune(copied, oneshot[name], sink, control)[0].to_dict()
            else:
                plans[name], _ = prune_trial(model, data, cfg, params, control, sink)
            del model
    return plans, derived


def run_bench(session: Session, cfg: BenchConfig, sink: Sink = null_sink, control: Control | None = None) -> dict:
    """Measure the rows and merge the numbers into the session's bench.json; returns its contents."""
    from engine.export import export
    from engine.models import load
    from engine.search import SearchConfig, SearchData, objective_task_indices

    control = control or Control()
    tasks, texts = validate(cfg)
    check_rows(session, cfg.rows)
    scfg = SearchConfig.from_dict(session.config())
    loaded = load(scfg.model, scfg.device, scfg.dtype, scfg.trust_remote_code, sink=sink)
    loaded.model.requires_grad_(False)
    # task rows the search's objective scored are never benchmark rows (the same file, by its hash)
    seen: dict[str, set[int]] = {}
    for t in scfg.objective_tasks:
        o = parse_task(t)
        if o.path is not None:
            seen[o.sha256] = set(objective_task_indices(o, scfg))
    dense_params = count_params(loaded.model)
    plans, derived = row_plans(session, loaded, cfg.rows, sink, control)
    results = session.read_json(RESULTS) or {"rows": {}}
    env = environment(loaded)
    windows = {}
    for spec, text in texts.items():
        ids = tokenize(loaded.tokenizer, text)
        for n in cfg.seq_lens:
            windows[f"{spec}@{n}"] = (eval_windows(ids, n, cfg.ppl_windows), text_hash(text), spec, n)

    def save() -> None:
        session.write_json(RESULTS, results)

    dense_model = loaded.model
    windows_for = SearchData(session, scfg, loaded, sink, control).repair_windows  # for repaired plans
    for name, plan in plans.items():
        row = results["rows"].get(name, {})
        ident = plan_id(plan) + (f"+lora-{adapter_id(session)}" if name == "recovered" else "")
        if row.get("plan_id") != ident:
            row = {}  # a different plan now (e.g. a new best): its old numbers describe another model
        model = dense_model
        if name == "recovered":
            model, _ = recovered_model(session, copy.deepcopy(dense_model), windows_for)
        elif plan is not None:
            model = copy.deepcopy(dense_model)
            apply_stored_plan(model, Plan.from_dict(plan), windows_for, control, sink)
        if name == "recovered":
            row["recovery_loss"] = loss_name(RecoverConfig.from_dict(recovery_state(session)["config"]))
        row.update(plan_id=ident, params=count_params(model), env=env,
                   recipe=(plan or {}).get("recipe", {}), plan=plan if name in derived else None,
                   params_config=derived.get(name))
        results["rows"][name] = row
        save()
        label = name
        for key, (w, digest, spec, n) in windows.items():
            value = perplexity(model, w, control=control, sink=sink, stage=f"PPL {key} ({label})")
            sink(Metric(f"ppl:{key}", value, label))
            row.setdefault("ppl", {})[key] = {"value": value, "text": spec, "sha256": digest, "seq_len": n,
                                              "windows": int(w.shape[0]), "tokens": int(w.numel())}
            save()
        for spec in tasks:
            skip = seen.get(spec.sha256, set()) if spec.path is not None else set()
            r = zero_shot(model, loaded.tokenizer, [spec], cfg.limit, cfg.seed, cfg.batch_size, control, sink,
                          label, exclude=skip)[spec.name]
            sink(Metric(f"acc:{spec.name}", r.acc, label))
            row.setdefault("zeroshot", {})[spec.name] = {**r.to_dict(), "objective_rows_left_out": len(skip)}
            save()
        if cfg.speed:
            runs = [speed(model, model.config.vocab_size, batch=b, sink=sink, stage=f"speed b{b} ({label})")
                    for b in cfg.batches]
            row["speed"] = {"prefill_tok_s": {str(s.batch): s.prefill_tok_s for s in runs},
                            "decode_tok_s": runs[0].decode_tok_s, "ttft_ms": runs[0].ttft_s * 1e3,
                            "prompt_len": runs[0].prompt_len, "new_tokens": runs[0].new_tokens,
                            "repeats": runs[0].repeats, "statistic": "median after one warm-up"}
            save()
            row["memory_mib"] = _memory(loaded, model, name, sink, export)
            save()
        if model is not dense_model:
            del model
    results["dense_params"] = dense_params
    save()
    return results


def _memory(loaded, model, name: str, sink: Sink, export) -> float | None:
    """Peak memory in a fresh process (engine.memprobe), from a saved copy of the row's model."""
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


# --- the table ------------------------------------------------------------------------------------------


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the comparison, as strings (Markdown, CSV and the terminal share it)."""
    rows = results.get("rows", {})
    order = [n for n in ROWS if n in rows] + sorted(n for n in rows if n not in ROWS)
    ppl_keys = sorted({k for r in rows.values() for k in r.get("ppl", {})})
    task_keys = sorted({k for r in rows.values() for k in r.get("zeroshot", {})})
    batches = sorted({b for r in rows.values() for b in r.get("speed", {}).get("prefill_tok_s", {})}, key=int)
    has_speed = any("speed" in r for r in rows.values())
    has_mem = any(r.get("memory_mib") for r in rows.values())
    dense = rows.get("dense", {})
    header = ["row", "params", "params %"] + [f"PPL {_label(k)}" for k in ppl_keys] + [f"acc {k}" for k in task_keys]
    if task_keys:
        header += ["acc avg", "retention"]
    if has_speed:
        header += [f"prefill tok/s b{b}" for b in batches] + ["decode tok/s", "TTFT ms"]
    if has_mem:
        header += ["peak MiB"]
    body = []
    total = results.get("dense_params") or dense.get("params")
    for name in order:
        r = rows[name]
        shown = f"{name} ({r['recovery_loss']})" if r.get("recovery_loss") else name
        line = [shown, f"{r['params']:,}", f"{r['params'] / total:.1%}" if total else ""]
        line += [_f(r.get("ppl", {}).get(k, {}).get("value"), ".2f") for k in ppl_keys]
        accs = {k: r.get("zeroshot", {}).get(k, {}).get("acc") for k in task_keys}
        line += [_f(accs[k], ".3f") for k in task_keys]
        if task_keys:
            avg, ret = average_and_retention(r, dense, task_keys)
            line += [_f(avg, ".3f"), _f(ret, ".1%")]
        if has_speed:
            sp = r.get("speed", {})
            line += [_f(sp.get("prefill_tok_s", {}).get(b), ",.0f") for b in batches]
            line += [_f(sp.get("decode_tok_s"), ",.1f"), _f(sp.get("ttft_ms"), ",.0f")]
        if has_mem:
            line += [_f(r.get("memory_mib"), ",.0f")]
        body.append(line)
    return header, body


def average_and_retention(row: dict, dense: dict, task_keys: list[str]) -> tuple[float | None, float | None]:
    """Mean accuracy over the tasks the row has; retention = that mean over dense's on the same tasks."""
    mine = {k: row.get("zeroshot", {}).get(k, {}).get("acc") for k in task_keys}
    mine = {k: v for k, v in mine.items() if v is not None}
    if not mine:
        return None, None
    avg = sum(mine.values()) / len(mine)
    base = [dense.get("zeroshot", {}).get(k, {}).get("acc") for k in mine]
    if any(b is None for b in base) or not base or not sum(base):
        return avg, None
    return avg, avg / (sum(base) / len(base))


def _f(value, fmt: str) -> str:
    return "" if value is None else format(value, fmt)


def _label(key: str) -> str:
    """A PPL column's short name: a file's name rather than its whole path (the provenance has the path)."""
    text, _, n = key.rpartition("@")
    return f"{Path(text).name if '/' in text else text}@{n}"


def provenance(results: dict) -> list[str]:
    """How the numbers were made, each fact once: environments, text and task sources, and each row's plan."""
    rows = results.get("rows", {})
    envs, sources = {}, {}
    for name, r in rows.items():
        env = ", ".join(f"{k} {v}" for k, v in r.get("env", {}).items() if v)
        envs.setdefault(env, []).append(name)
        for key, p in r.get("ppl", {}).items():
            sources[f"PPL {key}: {p['windows']} windows x {p['seq_len']} tokens, text sha256 {p['sha256']}"] = 1
        for key, z in r.get("zeroshot", {}).items():
            limit = f"{z['n']} rows (seed {z['seed']})" if z.get("limit") else f"all {z['n']} rows"
            left = z.get("objective_rows_left_out")
            extra = f", {left} rows the search objective used left out" if left else ""
            sources[f"{key}: lm-eval {z['lm_eval_version']}, {limit}{extra}, {z['source']}"] = 1
    lines = [f"{', '.join(names) if len(envs) > 1 else 'all rows'}: {env}" for env, names in envs.items()]
    lines += list(sources)
    lines.append("plans: " + ", ".join(f"{n} {r.get('plan_id')}" for n, r in rows.items()))
    return lines


def to_markdown(results: dict) -> str:
    header, body = table(results)
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    out += ["| " + " | ".join(line) + " |" for line in body]
    return "\n".join(out) + "\n\n" + "\n".join(f"- {ln.strip()}" for ln in provenance(results)) + "\n"


def to_csv(results: dict) -> str:
    import csv
    import io

    header, body = table(results)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(header)
    w.writerows([[c.replace(",", "") if i and c[:1].isdigit() else c for i, c in enumerate(line)] for line in body])
    return buf.getvalue()


def plot_points(results: dict) -> dict[str, list[tuple[str, int, float]]]:
    """Per measure (average accuracy, each PPL text): (row, parameters, value) for the rows that have it."""
    rows = results.get("rows", {})
    dense = rows.get("dense", {})
    task_keys = sorted({k for r in rows.values() for k in r.get("zeroshot", {})})
    points: dict[str, list[tuple[str, int, float]]] = {}
    for name, r in rows.items():
        avg, _ = average_and_retention(r, dense, task_keys)
        if avg is not None:
            points.setdefault("accuracy (avg)", []).append((name, r["params"], avg))
        for key, p in r.get("ppl", {}).items():
            points.setdefault(f"PPL {key}", []).append((name, r["params"], p["value"]))
    return points


def plot_png(results: dict, path: Path) -> None:
    """Accuracy vs parameters and PPL vs parameters, one panel per measure."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on a server
    import matplotlib.pyplot as plt

    points = plot_points(results)
    if not points:
        raise AdapruneError("nothing to plot yet: run the benchmark with --tasks or --ppl first")
    fig, axes = plt.subplots(1, len(points), figsize=(5 * len(points), 4), squeeze=False)
    for ax, (measure, pts) in zip(axes[0], points.items(), strict=True):
        for name, params, value in pts:
            ax.scatter(params / 1e6, value)
            ax.annotate(name, (params / 1e6, value), textcoords="offset points", xytext=(4, 4), fontsize=8)
        ax.set_xlabel("parameters (M)")
        ax.set_ylabel(measure)
        if measure.startswith("PPL"):
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def plot_text(results: dict, width: int = 78, height: int = 14) -> str:
    """The same plots for the terminal (plotext), plain characters: each row drawn with its own digit."""
    import plotext as plt

    out = []
    for measure, pts in plot_points(results).items():
        plt.clear_figure()
        plt.plotsize(width, height)
        plt.theme("clear")
        for i, (name, params, value) in enumerate(pts):
            plt.scatter([params / 1e6], [value], label=f"{name}", marker=str(i % 10))
        plt.title(f"{measure} vs parameters (M)")
        out.append(plt.uncolorize(plt.build()))
    return "\n".join(out)
