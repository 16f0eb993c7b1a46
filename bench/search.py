"""A default search on the embedded model: trial cost against objective cost, and whether the best trial
beats trial 0 (LLM-Pruner's recipe) and `adaprune prune`'s defaults (oneshot, with and without its repair) at
the same parameter count on text the search never saw. Records its table in bench/RESULTS.md.

    .venv/bin/python bench/search.py [--trials 20] [--windows 40] [--sampler tpe|random] [--search-only]
    .venv/bin/python bench/search.py --workers 2 [--trials 6]
    .venv/bin/python bench/search.py --before REV [--trials 20]

`--workers N` measures what N `adaprune worker` processes started together on one session build: each one-time
stage (objective texts, self-sampled text, calibration pools, statistics) should appear once in the session's
events and cost about the CPU seconds it costs one worker alone (run first, on a session of its own).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prune_recipes import WIKITEXT, _record, cpu_name

from engine.config import SAMPLE_METRICS, PruneConfig, SearchConfig
from engine.control import Control
from engine.data.text import load_text
from engine.data.windows import eval_windows, tokenize
from engine.measure.evaluate import perplexity, speed
from engine.model.load import Loaded, load
from engine.oneshot import evaluation_sets, oneshot_config, plan_and_prune
from engine.prune.plan import Plan
from engine.prune.reconstruct import apply_stored_plan
from engine.search.data import SearchData
from engine.search.driver import create_session, run_search
from engine.search.params import TrialParams
from engine.search.study import open_study
from engine.search.trial import prune_trial
from engine.session.layout import best_record
from engine.session.store import Session
from engine.session.study import completed

ROOT = Path(__file__).resolve().parent.parent
# stages of each trial's own work, the stage that holds them all, and one nested in a per-session stage
PER_TRIAL = {"trials", "calibration statistics", "prune", "reconstruct", "per-sample statistics"}
OBS_RECIPE = "stdlib-docs:64x128+self:64x128"  # bench/obs.py's strongest fixed recipe: obs on this text, repaired from it


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--windows", type=int, default=40, help="held-out PPL windows per text")
    ap.add_argument("--long-windows", type=int, default=4, help="held-out PPL windows of 2048 tokens per text")
    ap.add_argument("--sampler", default="tpe", choices=["tpe", "random"])
    ap.add_argument("--search-only", action="store_true", help="time the search; skip the held-out rows")
    ap.add_argument("--workers", type=int, default=0, help="N worker processes on one session against one")
    ap.add_argument("--threads", type=int, default=0, help="with --workers: torch threads per worker process "
                    "(OMP_NUM_THREADS; 1 keeps N workers from oversubscribing the cores, which inflates CPU time)")
    ap.add_argument("--before", metavar="REV", help="time the same search by the code at git revision REV, "
                    "then by this tree, and compare their bests on held-out text")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "RESULTS.md")
    args = ap.parse_args()
    if args.workers:
        workers(args)
        return
    if args.before:
        before(args)
        return

    cfg = SearchConfig(trials=args.trials, sampler=args.sampler)
    # how fast this machine is today (shared machines vary): prefill of 4x128 tokens by the dense model
    probe = load(cfg.model)
    tok_s = speed(probe.model, probe.model.config.vocab_size, batch=4, prompt_len=128, new_tokens=1).prefill_tok_s
    del probe
    root = Path(tempfile.mkdtemp(prefix="adaprune-bench-"))
    t0 = time.perf_counter()
    session = create_session(root, "bench", cfg)
    prepared = {}

    computed: dict[int, int] = {}  # gradient windows each trial computed (stage "calibration statistics")
    current = [None]
    once: dict[str, float] = {}  # seconds of the per-session work (caches trials share), by stage

    def sink(event) -> None:
        if event.kind == "stage_finished" and event.stage not in PER_TRIAL:
            name = unsized(event.stage)
            once[name] = once.get(name, 0.0) + event.seconds
        if event.kind == "trial_started":
            current[0] = event.number
            prepared.setdefault("first_trial", time.perf_counter() - t0)
        if event.kind == "stage_started" and event.stage == "calibration statistics" and current[0] is not None:
            computed[current[0]] = computed.get(current[0], 0) + (event.total or 0)
        if event.kind in ("trial_finished", "best_changed", "log"):
            print({k: v for k, v in event.to_dict().items() if k != "t"}, flush=True)

    run_search(session, sink)
    wall = time.perf_counter() - t0
    study = open_study(session, cfg)
    trials = [t for t in study.get_trials() if t.state.name in ("COMPLETE", "PRUNED") and "duplicate_of" not in t.user_attrs]
    ratios = [t.user_attrs["seconds"] / t.user_attrs["objective_seconds"] for t in trials
              if t.state.name == "COMPLETE" and t.user_attrs.get("objective_seconds")]
    trial_s = [t.user_attrs["seconds"] for t in trials if "seconds" in t.user_attrs]
    obj_s = [t.user_attrs["objective_seconds"] for t in trials if t.state.name == "COMPLETE"]
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    split = []
    for label, grad in (("decomposable metrics (vector, taylor2, wanda: cached per-sample statistics)", False),
                        ("taylor1 / taylor-mix (gradient sums shared between trials)", True)):
        group = [t for t in complete if (t.params["metric"] not in SAMPLE_METRICS) == grad
                 and t.user_attrs.get("objective_seconds")]
        if not group:
            continue
        r = sorted(t.user_attrs["seconds"] / t.user_attrs["objective_seconds"] for t in group)
        line = f"  - {label}: {len(group)} complete trials, ratio median {statistics.median(r):.2f}x " \
               f"(range {r[0]:.2f}-{r[-1]:.2f}x)"
        if grad:
            asked = sum(t.params["calib_n"] for t in group)
            done = sum(computed.get(t.number, 0) for t in group)
            line += f"; they asked for {asked} calibration windows and computed {done} gradient windows"
        split.append(line)
    best = min(complete, key=lambda t: t.value)
    base = next(t for t in trials if t.number == 0 or t.user_attrs.get("baseline"))

    if args.search_only:  # the wall time and where it goes, without the held-out rows (about 20 more minutes)
        machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu, float32"
        key = "search.py --search-only"
        body = (f"## {key} — {datetime.date.today()}\n\nMachine: {machine}. The default search "
                f"(`--trials {args.trials} --sampler {args.sampler}`), timed alone on the machine.\n\n"
                f"- this machine's speed at the time: dense prefill {tok_s:.0f} tokens/s (4x128, fp32)\n"
                f"- wall time of the whole search: {wall / 60:.1f} min ({prepared.get('first_trial', 0):.0f} s "
                f"before trial 0 started)\n"
                f"- trials: {len(trials)} ({len(complete)} complete); median trial {statistics.median(trial_s):.1f} s, "
                f"median objective {statistics.median(obj_s):.1f} s\n"
                f"- best trial {best.number}: objective {best.value:.2f} (trial 0 {base.value:.2f})\n"
                f"- one-time work (s, nested stages overlap): "
                f"{', '.join(f'{k} {v:.0f}' for k, v in sorted(once.items(), key=lambda kv: -kv[1]))}\n")
        print(body)
        _record(args.out, key, body)
        return

    dense = load(cfg.model)
    sets = heldout_sets(dense, args.windows, args.long_windows)
    rows = []
    data = SearchData(session, cfg, dense, lambda e: None, Control())

    def heldout(model) -> dict[str, float]:
        return {k: perplexity(model, v) for k, v in sets.items()}

    def built(params: dict):
        model = copy.deepcopy(dense.model)
        prune_trial(model, data, cfg, TrialParams.from_dict(params), Control(), lambda e: None)
        return model

    rows.append(("dense", "", heldout(dense.model), None))
    for label, trial in (("trial 0: LLM-Pruner recipe", base), (f"best: trial {best.number}", best)):
        model = copy.deepcopy(dense.model)
        plan = Plan.from_dict(_plan_of(session, trial, cfg, dense))
        apply_stored_plan(model, plan, data.repair_windows)
        rows.append((label, f"{trial.value:.2f}" if trial.value else "", heldout(model), plan.params_after))
    obs_recipe = replace(oneshot_config(cfg, True), metric="obs", calib=OBS_RECIPE, reconstruct_calib=OBS_RECIPE)
    for label, pcfg in (("oneshot: adaprune prune's defaults", oneshot_config(cfg)),
                        ("oneshot-repaired: prune's defaults + --reconstruct", oneshot_config(cfg, True)),
                        (f"obs-recipe: prune --metric obs --calib {OBS_RECIPE} --reconstruct --reconstruct-calib "
                         f"(the same)", obs_recipe)):
        copied = Loaded(copy.deepcopy(dense.model), dense.tokenizer, dense.name, None, dense.device, dense.dtype)
        plan_and_prune(copied, pcfg, lambda e: None, Control())
        rows.append((label, "", heldout(copied.model), sum(p.numel() for p in copied.model.parameters())))
    # magnitude and random with the best trial's configuration otherwise (layers, split, allocation, count)
    for metric in ("l2", "random"):
        model = built({**best.params, "metric": metric, "metric2": "none"})
        rows.append((f"{metric}, best trial's configuration", "", heldout(model), None))

    names = list(sets)
    lines = ["| model | params | search objective | " + " | ".join(f"PPL {n}" for n in names) + " |",
             "|---|---|---|" + "---|" * len(names)]
    for label, obj, ppl, params in rows:
        lines.append(f"| {label} | {'' if params is None else f'{params:,}'} | {obj} | " +
                     " | ".join(f"{ppl[n]:.2f}" for n in names) + " |")
    by = {label.split(":")[0]: ppl for label, _, ppl, _ in rows}
    best_ppl = rows[2][2]

    def gains(ref: dict) -> str:
        return ", ".join(f"{n} {1 - best_ppl[n] / ref[n]:+.0%}" for n in names)

    dense_x = ", ".join(f"{n} {best_ppl[n] / rows[0][2][n]:.2f}x" for n in names)
    machine = (f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, transformers "
               f"{transformers.__version__}, cpu, float32")
    key = "search.py" if args.sampler == "tpe" else "sampler-random: search.py --sampler random"
    body = (f"## {key} — {datetime.date.today()}\n\nMachine: {machine}.\n"
            f"Default search (`adaprune search --trials {args.trials} --sampler {args.sampler}`) on the embedded model at 20%: objective = "
            f"geometric mean PPL on stdlib-docs/valid and text sampled from the dense model, 16 windows of 128 "
            f"tokens each. Held-out PPL: {args.windows} windows of 128 tokens of texts the search never saw.\n\n"
            f"- this machine's speed at the time: dense prefill {tok_s:.0f} tokens/s (4x128, fp32)\n"
            f"- wall time of the whole search: {wall / 60:.1f} min ({prepared.get('first_trial', 0):.0f} s before "
            f"trial 0 started: loading, calibration pools, objective texts)\n"
            f"- trials evaluated: {len(trials)} ({len(complete)} complete, {len(trials) - len(complete)} stopped "
            f"early); median trial {statistics.median(trial_s):.1f} s against a median objective evaluation of "
            f"{statistics.median(obj_s):.1f} s; median ratio {statistics.median(ratios):.2f}x (per-session caches of "
            f"per-sample statistics excluded, they are built once)\n" + "\n".join(split) + "\n"
            f"- best trial {best.number}: {best.params}\n"
            f"- best, lower PPL on held-out text than trial 0: {gains(rows[1][2])}\n"
            f"- than oneshot (prune's defaults): {gains(by['oneshot'])}\n"
            f"- than oneshot-repaired (prune's defaults + --reconstruct): {gains(by['oneshot-repaired'])}\n"
            f"- than obs-recipe (the strongest fixed recipe measured, bench/obs.py): {gains(by['obs-recipe'])}\n"
            f"- one-time work (s, nested stages overlap): "
            f"{', '.join(f'{k} {v:.0f}' for k, v in sorted(once.items(), key=lambda kv: -kv[1]))}\n"
            f"- best against dense: {dense_x}\n\n" + "\n".join(lines) + "\n")
    print(body)
    _record(args.out, key, body)


def heldout_sets(dense: Loaded, windows: int, long_windows: int) -> dict[str, torch.Tensor]:
    """Held-out texts the search never saw: stdlib-docs test split and WikiText-2 test, at 128 tokens
    (`windows` windows) and 2048 (`long_windows`), keyed e.g. "WikiText-2@128"."""
    evals = ["stdlib-docs"] + ([str(WIKITEXT)] if WIKITEXT.exists() else [])
    sets, _ = evaluation_sets(dense.tokenizer, PruneConfig(evals=evals, eval_windows=windows))
    short = {n: ("WikiText-2" if n == str(WIKITEXT) else "stdlib-docs") for n in sets}
    sets = {f"{short[n]}@128": w for n, w in sets.items()}
    if long_windows:
        for n in evals:
            ids = tokenize(dense.tokenizer, load_text(n, "eval"))
            sets[f"{short[n]}@2048"] = eval_windows(ids, 2048, long_windows)
    return sets


def spearman(a: list[float], b: list[float]) -> float:
    """Rank correlation (no ties expected: objective values are floats)."""
    ra, rb = (sorted(range(len(x)), key=x.__getitem__) for x in (a, b))
    rank_a, rank_b = [0] * len(a), [0] * len(b)
    for r, i in enumerate(ra):
        rank_a[i] = r
    for r, i in enumerate(rb):
        rank_b[i] = r
    n = len(a)
    return 1 - 6 * sum((x - y) ** 2 for x, y in zip(rank_a, rank_b, strict=True)) / (n * (n * n - 1))


def before(args) -> None:
    """The same default search by the code at `args.before` (a git revision) and by this tree, one after the
    other on this machine, each in its own process through the CLI: wall time, trial and objective seconds,
    how far trials ran, and the best of each on held-out text."""
    import subprocess

    root = Path(tempfile.mkdtemp(prefix="adaprune-before-"))
    old = root / "code"
    old.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.before], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(old)], input=archive.stdout, check=True)
    rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", args.before], check=True,
                         capture_output=True, text=True).stdout.strip()
    cfg = SearchConfig(trials=args.trials, sampler=args.sampler)
    # what the user's cache holds after a first run (the built-in corpus, the converted model): neither side
    # builds it inside its timing
    load_text("stdlib-docs", "calib")
    load(cfg.model)
    runs = {}
    for label, code in ((f"before ({rev})", old), ("after (this tree)", ROOT)):
        env = {**os.environ, "PYTHONPATH": str(code)}
        where = subprocess.run([sys.executable, "-c", "import engine; print(engine.__file__)"], env=env, cwd=code,
                               check=True, capture_output=True, text=True).stdout.strip()
        assert where.startswith(str(code)), f"{label} would run {where}"
        name = "before" if code == old else "after"
        cmd = [sys.executable, "-c", "from tui.cli import main; main()", "search", "--session", name,
               "--sessions-dir", str(root), "--trials", str(args.trials), "--sampler", args.sampler]
        t = time.perf_counter()
        with open(root / f"{name}.log", "w") as log:
            subprocess.run(cmd, env=env, cwd=code, check=True, stdout=log, stderr=subprocess.STDOUT)
        wall = time.perf_counter() - t
        session = Session.open(root, name)
        trials = [t for t in open_study(session, cfg).get_trials() if t.state.name in ("COMPLETE", "PRUNED")]
        runs[label] = (wall, session, trials, code == old)
        print(label, f"{wall:.0f} s", flush=True)

    dense = load(cfg.model)
    sets = heldout_sets(dense, args.windows, args.long_windows)
    names = list(sets)
    ppl = {"dense": {k: perplexity(dense.model, v) for k, v in sets.items()}}
    lines = []
    for label, (wall, session, trials, old_code) in runs.items():
        complete = [t for t in trials if t.state.name == "COMPLETE"]
        own = [t for t in trials if "duplicate_of" not in t.user_attrs]
        trial_s = [t.user_attrs["seconds"] for t in own if "seconds" in t.user_attrs]
        obj_s = [t.user_attrs["objective_seconds"] for t in own if t.state.name == "COMPLETE"
                 and "objective_seconds" in t.user_attrs]
        ratios = [t.user_attrs["seconds"] / t.user_attrs["objective_seconds"] for t in own
                  if t.state.name == "COMPLETE" and t.user_attrs.get("objective_seconds")]
        # batches each trial read: the median pruner was told every batch, successive halving all but the last
        ran = [len(t.intermediate_values) + (t.state.name == "COMPLETE" and not old_code) for t in own if t.number > 0]
        record = best_record(session)
        model = copy.deepcopy(dense.model)
        apply_stored_plan(model, Plan.from_dict(record.plan), SearchData(session, cfg, dense, lambda e: None,
                                                                         Control()).repair_windows)
        ppl[label] = {k: perplexity(model, v) for k, v in sets.items()}
        del model
        # how well the first batch ranks trials against the whole objective (complete trials; first batch is
        # step 0 in the median pruner's reports, 1 in successive halving's)
        first = [(t.intermediate_values.get(0, t.intermediate_values.get(1)), t.value) for t in complete
                 if t.intermediate_values]
        rho = spearman([a for a, _ in first], [b for _, b in first]) if len(first) > 2 else float("nan")
        lines.append(f"- {label}: wall {wall / 60:.1f} min; {len(trials)} trials ({len(complete)} complete); "
                     f"median trial {statistics.median(trial_s):.1f} s, median objective "
                     f"{statistics.median(obj_s):.1f} s, median ratio {statistics.median(ratios):.2f}x; "
                     f"objective batches read per trial after trial 0: {sum(ran)} in all "
                     f"({', '.join(f'{ran.count(k)}x{k}' for k in sorted(set(ran)))}); best trial {record.trial} "
                     f"objective {record.value:.2f} ({record.params['metric']}, repair {record.params['repair']}); "
                     f"first batch against the whole objective, rank correlation {rho:.2f} over {len(first)} trials")
    (w0, *_), (w1, *_) = runs.values()
    labels = list(runs)
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu, float32"
    table = ["| model | " + " | ".join(f"PPL {n}" for n in names) + " |", "|---|" + "---|" * len(names)]
    for label, row in ppl.items():
        table.append(f"| {label} | " + " | ".join(f"{row[n]:.2f}" for n in names) + " |")
    gain = ", ".join(f"{n} {1 - ppl[labels[1]][n] / ppl[labels[0]][n]:+.1%}" for n in names)
    key = "search.py --before"
    body = (f"## {key} — {datetime.date.today()}\n\nMachine: {machine}. The default search (`adaprune search "
            f"--trials {args.trials} --sampler {args.sampler}`) on the embedded model, run by the code at {rev} and "
            f"by this tree, one after the other in one run of `bench/search.py --before {args.before}`, each "
            f"through the CLI in its own process (wall: the whole command, loading included). Held-out PPL of "
            f"each best: {args.windows} windows of 128 tokens and {args.long_windows} of 2048 per text.\n\n"
            + "\n".join(lines) + f"\n- wall time: {w1 / w0 - 1:+.0%}\n"
            f"- the best's held-out PPL, after against before (lower is better): {gain}\n\n" + "\n".join(table) + "\n")
    print(body)
    _record(args.out, key, body)


def unsized(stage: str) -> str:
    """A stage's name without its sizes ('per-sample statistics self x64' -> 'per-sample statistics self')."""
    return " ".join(w for w in stage.split() if not w[-1].isdigit())


def one_time(events: list[dict]) -> tuple[dict[str, int], dict[str, float], int]:
    """Per one-time stage (sizes dropped): how often it was built and the CPU seconds it took over all processes
    (only the outermost one-time stage of each process counts: nested ones are inside its seconds); and how
    many processes wrote the log."""
    builds: dict[str, int] = {}
    cpu: dict[str, float] = {}
    open_: dict[str, list[str]] = {}
    for e in events:
        if not e["kind"].startswith("stage_") or e["stage"] in PER_TRIAL or e["kind"] == "stage_progress":
            continue
        stack = open_.setdefault(e.get("by", ""), [])
        name = unsized(e["stage"])
        if e["kind"] == "stage_started":
            builds[name] = builds.get(name, 0) + 1
            stack.append(e["stage"])
        elif e["stage"] in stack:
            del stack[stack.index(e["stage"]):]
            if not stack:
                cpu[name] = cpu.get(name, 0.0) + e.get("cpu", 0.0)
    return builds, cpu, len(open_)


def workers(args) -> None:
    """One worker alone on a session, then N started together on another: one-time builds and their CPU."""
    import subprocess

    cfg = SearchConfig(trials=args.trials, sampler=args.sampler)
    root = Path(tempfile.mkdtemp(prefix="adaprune-workers-"))
    env = {**os.environ, "ADAPRUNE_SESSIONS": str(root),
           **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {})}
    runs = {}
    for n in (1, args.workers):
        session = create_session(root, f"w{n}", cfg)
        cmd = [sys.executable, "-c", "from tui.cli import main; main()", "worker", f"w{n}"]
        t = time.perf_counter()
        procs = [subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL) for _ in range(n)]
        if any(p.wait() for p in procs):
            raise SystemExit(f"a worker of w{n} failed")
        wall = time.perf_counter() - t
        events, _ = session.read_events()
        runs[n] = (wall, *one_time(events), completed(open_study(session, cfg)))
        print(n, runs[n], flush=True)
    body = workers_report(runs, args.workers, args.trials, args.threads)
    print(body)
    _record(args.out, f"search.py --workers {args.workers}", body)


def workers_report(runs: dict, workers: int, trials: int, threads: int = 0) -> str:
    (w1, b1, c1, _, d1), (wn, bn, cn, pn, dn) = runs[1], runs[workers]
    names = sorted(set(b1) | set(bn), key=lambda k: -c1.get(k, 0.0))
    rows = [f"| {k} | {b1.get(k, 0)} | {bn.get(k, 0)} | {c1.get(k, 0.0):.0f} | {cn.get(k, 0.0):.0f} |" for k in names]
    shared = [k for k in names if not k.startswith("load ")]  # each process loads its own model
    fixed = [k for k in shared if not k.startswith("per-sample")]  # the rest depends on the windows trials ask
    s1, sn = sum(c1.get(k, 0.0) for k in fixed), sum(cn.get(k, 0.0) for k in fixed)
    # per-sample statistics are computed per window as trials ask for them (several times even alone)
    twice = [k for k in shared if bn.get(k, 0) > b1.get(k, 0)]
    machine = f"{cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__}, cpu, float32"
    key = f"search.py --workers {workers}"
    body = (f"## {key} — {datetime.date.today()}\n\nMachine: {machine}. A default search (`--trials "
            f"{trials}`) on the embedded model driven by `adaprune worker` processes only: one alone on a "
            f"session, then {workers} started together on another (same configuration, same draws)"
            f"{f', {threads} torch thread(s) per process' if threads else ''}. "
            f"CPU seconds are each process's own (`time.process_time`) over the outermost one-time stages, "
            f"summed over the processes.\n\n"
            f"- wall: one worker {w1 / 60:.1f} min ({d1} trials), {workers} workers {wn / 60:.1f} min ({dn} "
            f"trials, {pn} processes in the log)\n"
            f"- CPU seconds of the files built once per session (objective texts, self-sampled text, pools, obs "
            f"scores; not loading, which each process does, nor per-sample statistics, computed for the windows "
            f"the trials ask): one worker {s1:.0f}, {workers} workers together {sn:.0f} ({sn / s1 - 1:+.0%})\n"
            f"- one-time stages built more often by {workers} workers than by one: {', '.join(twice) or 'none'}\n\n"
            f"| one-time stage | builds, 1 worker | builds, {workers} workers | CPU s, 1 worker | CPU s, "
            f"{workers} workers |\n|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    return body


def _plan_of(session, trial, cfg, dense) -> dict:
    """The plan a trial applied: re-run its recipe (deterministic) unless plan.json holds it."""
    best = session.read_json("plan.json")
    if best and best["trial"] == trial.number:
        return best["plan"]
    from engine.search.data import SearchData
    from engine.search.trial import run_trial

    data = SearchData(session, cfg, dense, lambda e: None, Control())
    out = run_trial(dense, data, cfg, TrialParams.from_dict(trial.params), None, Control(), lambda e: None)
    return out.plan


if __name__ == "__main__":
    main()
