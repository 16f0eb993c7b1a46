"""The `adaprune` command line. Subcommands are headless; with no subcommand the app will open (issue 4)."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import wraps
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from engine import api
from engine.config import (
    DEFAULT_CALIB,
    EMBEDDED,
    MAX_PRUNE,
    RECONSTRUCT_CALIB,
    RECONSTRUCT_LAMBDA,
    BenchConfig,
    PruneConfig,
    RecoverConfig,
    SearchConfig,
    parse_attn_share,
)
from engine.errors import AdapruneError, Cancelled

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Structured pruning of LLaMA-family models with searched calibration and metrics.")
STARTED = time.time()  # when this process began: an app that started it may ask to pause at once
err = Console(stderr=True, highlight=False, emoji=False)  # user text must print as typed (no :ten: emoji)


def clean_errors(fn: Callable) -> Callable:
    """User errors become one line on stderr and exit 2; Ctrl-C exits 130. No tracebacks for either."""

    @wraps(fn)
    def run(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except AdapruneError as e:
            err.print(f"[bold red]error:[/] {escape(str(e))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except (KeyboardInterrupt, Cancelled):
            err.print("cancelled at a safe point: nothing is half-written (a search or recovery resumes where it stopped)")
            raise typer.Exit(130) from None

    return run


@app.callback(invoke_without_command=True)
def root(ctx: typer.Context) -> None:
    """With no subcommand: the app on a terminal, this help elsewhere (a pipe, a script)."""
    if ctx.invoked_subcommand is None:
        if sys.stdin.isatty() and sys.stdout.isatty():
            _run_app(None, new=False, no_color=False)
        else:
            typer.echo(ctx.get_help())


def _run_app(sessions_dir: Path | None, new: bool, no_color: bool) -> None:
    import os

    if no_color:
        os.environ["NO_COLOR"] = "1"  # Textual renders without colour when this is set
    from tui.app import AdapruneApp

    AdapruneApp(sessions_dir=sessions_dir, new=new).run()


@app.command("prune")
@clean_errors
def prune_cmd(
    model: str = typer.Option(EMBEDDED, help=f"hub id, local HF folder, local .gguf, or {EMBEDDED} (embedded)"),
    prune: float = typer.Option(0.20, help=f"fraction of ALL parameters to remove, in (0, {MAX_PRUNE}]"),
    metric: str = typer.Option("taylor1", help="taylor1, taylor2, taylor-mix, vector, l1, l2, random, wanda, or obs "
                                               "(what --reconstruct cannot repair; give --calib a few thousand "
                                               "tokens, e.g. stdlib-docs:128x128)"),
    aggregate: str = typer.Option("sum", help="how a group's matrices combine: sum, mean, max, prod, last"),
    calib: str = typer.Option(DEFAULT_CALIB, help="calibration text SOURCE[/SPLIT]:NxL (N windows of L tokens)"),
    eval_: list[str] = typer.Option(["stdlib-docs"], "--eval", help="PPL text(s): stdlib-docs, a file, wikitext2, ..."),
    seq_len: int = typer.Option(128, help="PPL window length"),
    eval_windows: int = typer.Option(40, help="PPL windows per text (0: all)"),
    layers: str = typer.Option(None, help="layers to prune: A-B, A,B,C or all (default: LLM-Pruner's range)"),
    heads: str = typer.Option("query", help="query: heads inside every KV group; kv: whole KV groups"),
    attn_share: str = typer.Option(
        "auto", help="budget from attention: auto (MLP channels first), same (LLM-Pruner's ratio), or 0..1"),
    round_to: int = typer.Option(1, help="keep MLP widths a multiple of this (8, 64 for fast kernels)"),
    allocation: str = typer.Option("uniform", help="MLP cut per layer: uniform (same in every layer) or global "
                                                   "(one ranking of normalised channel scores over the range)"),
    ramp: float = typer.Option(0.0, help="with uniform: -0.9..0.9, > 0 prunes deeper layers more, same total"),
    seed: int = typer.Option(0),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:N"),
    dtype: str = typer.Option("auto", help="auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16"),
    trust_remote_code: bool = typer.Option(False, help="allow the model folder's own Python code to run"),
    speed: bool = typer.Option(True, help="measure prefill/decode speed"),
    memory: bool = typer.Option(True, help="measure peak memory (needs --out)"),
    out: Path = typer.Option(None, help="write the pruned model here (an HF folder)"),
    force: bool = typer.Option(False, help="replace --out if it exists"),
    json_out: Path = typer.Option(None, "--json", help="also write the full result as JSON here"),
    override: list[str] = typer.Option([], help="per-layer decision: L=lock, or L=K/C (remove K heads per KV "
                                                "group, C channels in layer L); the rest of the range shares the target"),
    reconstruct: bool = typer.Option(False, help="repair the kept o_proj/down_proj weights layer by layer (ridge "
                                                 "least squares toward the sliced weights, with an output bias)"),
    reconstruct_calib: str = typer.Option(RECONSTRUCT_CALIB, help="the repair's calibration text SOURCE:NxL "
                                                                  "(self: text sampled from the dense model)"),
    reconstruct_lambda: float = typer.Option(RECONSTRUCT_LAMBDA, help="ridge strength, relative to the inputs' "
                                                                      "mean variance (larger: closer to slicing)"),
) -> None:
    """Prune a model once with a fixed recipe, evaluate dense vs pruned, save it."""
    from tui.report import RichSink, result_table

    cfg = PruneConfig(model=model, prune=prune, metric=metric, aggregate=aggregate, calib=calib, evals=list(eval_),
                      eval_seq_len=seq_len, eval_windows=eval_windows or None, layers=layers, head_mode=heads,
                      attn_share=parse_attn_share(attn_share), round_to=round_to, allocation=allocation, ramp=ramp,
                      seed=seed, device=device, dtype=dtype,
                      trust_remote_code=trust_remote_code, measure_speed=speed, measure_memory=memory,
                      out=str(out) if out else None, force=force, overrides=_parse_overrides(override),
                      reconstruct=reconstruct, reconstruct_calib=reconstruct_calib,
                      reconstruct_lambda=reconstruct_lambda)
    console = Console(emoji=False)
    with RichSink(console) as sink:
        result = api.prune(cfg, sink=sink)
    console.print(result_table(result))
    if result.out:
        how = "plain transformers" if result.export_format == "uniform" else "trust_remote_code=True"
        console.print(f"saved to {escape(str(result.out))} ({result.export_format} widths; loads with {how})")
    if json_out:
        json_out.write_text(json.dumps(result.to_dict(), indent=2, default=str) + "\n", encoding="utf-8")


SESSIONS_DIR = typer.Option(None, "--sessions-dir", help="where sessions live (default ./sessions)")


def _root(sessions_dir: Path | None) -> Path:
    return sessions_dir or api.default_dir()


def _parse_overrides(items: list[str]) -> dict:
    out: dict = {}
    for item in items:
        layer, sep, value = item.partition("=")
        heads, slash, channels = value.partition("/")
        if value == "lock":
            out[layer.strip()] = "lock"
        elif sep and slash and heads.strip().isdigit() and channels.strip().isdigit():
            out[layer.strip()] = {"heads": int(heads), "channels": int(channels)}
        else:
            raise AdapruneError(f"--override {item!r}: use L=lock or L=K/C (heads per KV group / channels removed)")
    return out


def _parse_fixed(items: list[str]) -> dict:
    fixed = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise AdapruneError(f"--fix {item!r}: use NAME=VALUE, e.g. --fix metric=taylor2")
        value = value.strip()
        try:
            fixed[key.strip()] = int(value) if value.lstrip("-").isdigit() else float(value)
        except ValueError:
            fixed[key.strip()] = value
    return fixed


def _drive(session, worker: bool = False) -> None:
    from tui.report import RichSink

    console = Console(emoji=False)
    with RichSink(console) as sink:
        if worker:
            api.run_search(session, sink, worker=True)
        else:
            with session.lock():
                # requests made since this process began are for it (an app may ask before the lock is taken)
                result = api.run_search(session, sink, since=STARTED)
            if result.get("already_done"):
                n, (trial, value) = result["completed"], result["best"]
                console.print(f"{escape(session.name)}: all {n} trials are done (best: trial {trial}, objective "
                              f"{value:.3f}); nothing to resume. `adaprune search` with more --trials in a new "
                              f"session searches further")


@app.command("search")
@clean_errors
def search_cmd(
    session: str = typer.Option(..., help="session name (a folder under --sessions-dir)"),
    model: str = typer.Option(EMBEDDED, help=f"hub id, local HF folder, local .gguf, or {EMBEDDED}"),
    prune: float = typer.Option(0.20, help=f"fraction of ALL parameters to remove, in (0, {MAX_PRUNE}]"),
    trials: int = typer.Option(20, help="trials to evaluate (duplicates proposed by TPE are free)"),
    seed: int = typer.Option(0, help="sampler and data seed; the same seed proposes the same trials"),
    source: list[str] = typer.Option(["stdlib-docs", "self"], help="calibration sources to search over"),
    objective: list[str] = typer.Option(["stdlib-docs/valid", "self"], help="validation texts of the objective"),
    objective_windows: int = typer.Option(16, help="128-token windows per objective text"),
    objective_task: list[str] = typer.Option([], help="zero-shot task file in the objective: PPL x (dense acc / "
                                             "acc) ** weight; repeatable"),
    objective_task_rows: int = typer.Option(50, help="rows per objective task (benchmarks leave them out)"),
    objective_task_weight: float = typer.Option(1.0, help="weight of the zero-shot part of the objective"),
    fix: list[str] = typer.Option([], help="hold a dimension fixed: NAME=VALUE (e.g. metric=taylor2)"),
    heads: str = typer.Option("query", help="query: heads inside every KV group; kv: whole KV groups"),
    round_to: int = typer.Option(1, help="keep MLP widths a multiple of this"),
    device: str = typer.Option("auto"),
    dtype: str = typer.Option("auto"),
    storage: str = typer.Option(None, help="Optuna storage URL (default: SQLite in the session)"),
    early_stop: bool = typer.Option(True, help="stop trials early by successive halving over the objective's batches"),
    sampler: str = typer.Option("tpe", help="tpe (the method) or random (Optuna's RandomSampler, a yardstick)"),
    override: list[str] = typer.Option([], help="per-layer decision the search respects: L=lock or L=K/C"),
    grad_cache_gb: float = typer.Option(2.0, help="memory for gradient sums that taylor1/taylor-mix trials share "
                                        "(0: none; each is the size of the model's weights in fp32)"),
    repair_source: list[str] = typer.Option(None, help="texts the searched reconstruction may calibrate on "
                                            "(default: the --source list; `--fix repair=none` turns it off)"),
    repair_cache_gb: float = typer.Option(2.0, help="memory for the dense input statistics repaired trials "
                                          "share (one set per repair text and size)"),
    sessions_dir: Path = SESSIONS_DIR,
) -> None:
    """Search calibration data x importance metric x allocation x reconstruction with TPE, in a resumable
    session."""
    cfg = SearchConfig(model=model, prune=prune, trials=trials, seed=seed, sources=list(source),
                       objective=list(objective), objective_windows=objective_windows, fixed=_parse_fixed(fix),
                       head_mode=heads, round_to=round_to, device=device, dtype=dtype, storage=storage,
                       early_stop=early_stop, sampler=sampler, overrides=_parse_overrides(override),
                       objective_tasks=list(objective_task), objective_task_rows=objective_task_rows,
                       objective_task_weight=objective_task_weight, grad_cache_gb=grad_cache_gb,
                       repair_sources=list(repair_source) if repair_source else None,
                       repair_cache_gb=repair_cache_gb)
    _drive(api.create_session(_root(sessions_dir), session, cfg))


JOB_OPTION = typer.Option(None, "--job", help="search, recover or bench (default: the one running)")


def _steer(name: str, command: str, job: str | None, sessions_dir: Path) -> None:
    session = api.Session.open(_root(sessions_dir), name)
    job, holder = api.steer(session, command, job)
    what = {"pause": "pause at its next safe point", "resume": "go on", "cancel": "stop at its next safe point"}
    Console(emoji=False).print(f"asked the {api.JOBS[job]} of {escape(name)} (process {holder.get('pid')}) to "
                               f"{what[command]}" + (f"; `{escape(api.resume_command(name, job))}` goes on"
                                                     if command == "pause" else ""))


@app.command("pause")
@clean_errors
def pause_cmd(name: str, job: str | None = JOB_OPTION, sessions_dir: Path = SESSIONS_DIR) -> None:
    """Pause a session's running search, recovery or benchmark (any process, any terminal) at a safe point."""
    _steer(name, "pause", job, sessions_dir)


@app.command("cancel")
@clean_errors
def cancel_cmd(name: str, job: str | None = JOB_OPTION, sessions_dir: Path = SESSIONS_DIR) -> None:
    """Stop a session's running search, recovery or benchmark at a safe point (a search resumes later)."""
    _steer(name, "cancel", job, sessions_dir)


@app.command("resume")
@clean_errors
def resume_cmd(name: str, job: str | None = JOB_OPTION, sessions_dir: Path = SESSIONS_DIR) -> None:
    """Un-pause a session's running work, or continue its search after a crash, a kill or a closed SSH
    connection."""
    session = api.Session.open(_root(sessions_dir), name)
    running = api.running_jobs(session)
    if job in ("recover", "bench") and job not in running:
        how = f"`adaprune recover {name} --resume` continues a stopped recovery" if job == "recover" else \
            f"`adaprune bench {name} ...` measures again (the rows done are kept)"
        raise AdapruneError(f"no {api.JOBS[job]} of session {name!r} is running now: {how}")
    if running:
        target = job if job in running else next(iter(running)) if len(running) == 1 else None
        if target is not None and not api.pause_pending(session, target):
            holder = running[target]
            raise AdapruneError(f"the {api.JOBS[target]} of session {name!r} runs in pid {holder.get('pid')} on "
                                f"{holder.get('host')} and is not paused: nothing to resume (`adaprune pause "
                                f"{name}` pauses it" + (f", `adaprune worker {name}` adds a worker)"
                                                        if target == "search" else ")"))
        _steer(name, "resume", job, sessions_dir)
        return
    _drive(session)


@app.command("worker")
@clean_errors
def worker_cmd(name: str, sessions_dir: Path = SESSIONS_DIR) -> None:
    """Join a running session's study as one more worker (another GPU or machine)."""
    _drive(api.Session.open(_root(sessions_dir), name), worker=True)


@app.command("sessions")
@clean_errors
def sessions_cmd(sessions_dir: Path = SESSIONS_DIR) -> None:
    """List saved sessions."""
    from tui.report import sessions_table

    rows = [api.summary(s) for s in api.list_sessions(_root(sessions_dir))]
    if not rows:
        Console(emoji=False).print(f"no sessions in {escape(str(_root(sessions_dir)))}")
        return
    console = Console(emoji=False)
    console.print(sessions_table(rows))
    for r in rows:  # what each live process is doing: workers beside the search, a recovery, a benchmark
        for line in r.doing:
            console.print(f"{escape(r.name)}: {escape(line)}", soft_wrap=True)
    for r in rows:
        if r.problem:
            err.print(f"[yellow]warning:[/] {escape(r.name)}: {escape(r.problem)}", soft_wrap=True)


@app.command("export")
@clean_errors
def export_cmd(name: str, out: Path = typer.Option(..., help="folder to write"), force: bool = False,
               widths: str = typer.Option("plan", help="plan: the searched plan (per-layer widths, "
                                          "trust_remote_code); uniform: re-planned with the same cut in every "
                                          "layer, loads in plain transformers"),
               recovered: bool = typer.Option(False, "--recovered", help="the plan with the session's finished "
                                              "LoRA recovery merged in (adaprune recover)"),
               plan: str = typer.Option(None, "--plan", help="best (the best trial), or plan:NAME, a saved plan "
                                        "(plan:overrides: the app's re-evaluated edits); default best, or the "
                                        "recovery's plan with --recovered"),
               sessions_dir: Path = SESSIONS_DIR) -> None:
    """Export a session's plan (by default its best trial's) as a Hugging Face folder."""
    from tui.report import RichSink

    session_root = _root(sessions_dir)
    console = Console(emoji=False)
    with RichSink(console) as sink:
        fmt = api.export_session(session_root, name, out, force, sink, widths, recovered=recovered,
                                 plan_name=plan)
    how = "plain transformers" if fmt == "uniform" else "trust_remote_code=True"
    console.print(f"saved to {escape(str(out))} ({fmt} widths; loads with {how})")


@app.command("recover")
@clean_errors
def recover_cmd(
    name: str,
    data: list[str] = typer.Option(["stdlib-docs"], "--data", help="training text: stdlib-docs (its calibration "
                                   "split), a .txt/.jsonl/.parquet file, a hub name such as alpaca, or self:NxL "
                                   "(N sequences of L tokens sampled from the dense model, kept in the session); "
                                   "repeatable"),
    plan: str = typer.Option("best", help="the plan to recover: best, or plan:NAME (the app's overrides)"),
    steps: int = typer.Option(100, help="optimiser steps"),
    batch: int = typer.Option(4, help="sequences per step"),
    seq_len: int = typer.Option(256, help="tokens per sequence (LLM-Pruner: 256)"),
    lr: float = typer.Option(1e-4, help="peak learning rate (linear warm-up, then linear decay)"),
    warmup: int | None = typer.Option(None, help="warm-up steps [default: a tenth of --steps, at most 10]"),
    rank: int = typer.Option(8, help="LoRA rank"),
    alpha: int = typer.Option(16, help="LoRA alpha"),
    dropout: float = typer.Option(0.05, help="LoRA dropout"),
    targets: str = typer.Option(",".join(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                          "down_proj"]), help="projections that get adapters, comma-separated"),
    valid: list[str] = typer.Option(["stdlib-docs/valid"], "--valid", help="validation text; repeatable"),
    valid_windows: int = typer.Option(16, help="validation windows per text"),
    eval_every: int = typer.Option(25, help="measure validation PPL every N steps"),
    save_every: int = typer.Option(25, help="checkpoint the adapter every N steps"),
    seed: int = typer.Option(0),
    grad_checkpointing: bool = typer.Option(False, help="less activation memory, more compute (large models)"),
    distil: bool = typer.Option(False, "--distil", help="train on the KL divergence to the dense model's "
                                "next-token distributions (the dense model stays loaded as the teacher)"),
    distil_weight: float = typer.Option(1.0, help="with --distil: the KL term's weight; the rest of the loss is "
                                        "language modelling (1: KL only)"),
    resume: bool = typer.Option(False, "--resume", help="continue an interrupted recovery where it stopped"),
    restart: bool = typer.Option(False, "--restart", help="discard the session's recovery and train again"),
    sessions_dir: Path = SESSIONS_DIR,
) -> None:
    """Recover quality with LoRA fine-tuning of a session's pruned model (resumable; export merges it)."""
    from tui.report import RichSink

    cfg = RecoverConfig(data=list(data), plan=plan, steps=steps, batch_size=batch, seq_len=seq_len, lr=lr,
                        warmup=warmup, rank=rank, alpha=alpha, dropout=dropout,
                        targets=[t.strip() for t in targets.split(",") if t.strip()], valid=list(valid),
                        valid_windows=valid_windows, eval_every=eval_every, save_every=save_every, seed=seed,
                        grad_checkpointing=grad_checkpointing, distil=distil_weight if distil else 0.0)
    console = Console(emoji=False)
    try:
        with RichSink(console) as sink:
            state = api.run_recovery(_root(sessions_dir), name, cfg, sink, resume=resume, restart=restart,
                                     since=STARTED)
    except (KeyboardInterrupt, Cancelled):
        err.print(f"recovery stopped; every finished step is saved: `adaprune recover {name} --resume` goes on")
        raise typer.Exit(130) from None
    console.print(f"recovered: validation PPL {state.valid_ppl_before:.2f} -> {state.valid_ppl_after:.2f} "
                  f"after {state.step} steps; `adaprune export {name} --recovered --out DIR` writes the model")


@app.command("bench")
@clean_errors
def bench_cmd(
    name: str,
    tasks: list[str] = typer.Option([], "--tasks", help="zero-shot task: an lm-eval name (boolq, piqa, hellaswag, "
                                    "winogrande, arc_easy, arc_challenge, openbookqa; needs the hub) or a local "
                                    ".jsonl; repeatable"),
    limit: int = typer.Option(None, help="rows per task, drawn at random with --seed (default: all)"),
    seed: int = typer.Option(0, help="seed of the task subsets and of lm-eval"),
    ppl: list[str] = typer.Option([], "--ppl", help="PPL text: wikitext2, ptb, c4 (hub), stdlib-docs, or a file; "
                                  "repeatable"),
    seq_len: list[int] = typer.Option([128], "--seq-len", help="PPL window: 128 (LLM-Pruner), 2048 (SliceGPT, "
                                      "Wanda); repeatable"),
    ppl_windows: int = typer.Option(40, help="evenly spaced PPL windows per text (0: the whole text)"),
    speed: bool = typer.Option(False, "--speed", help="prefill, decode, time to first token and peak memory"),
    batch: list[int] = typer.Option([1, 4], "--batch", help="prefill batch sizes for --speed"),
    rows: str = typer.Option(None, help="comma-separated rows (default all): dense, best, baseline, oneshot, "
                             "oneshot-repaired, magnitude, random, recovered, plan:NAME"),
    markdown: Path = typer.Option(None, help="also write the table as Markdown here"),
    csv: Path = typer.Option(None, help="also write the table as CSV here"),
    json_out: Path = typer.Option(None, "--json", help="also write every number and its provenance as JSON here"),
    plot: Path = typer.Option(None, help="also draw accuracy and PPL vs parameters into this PNG"),
    sessions_dir: Path = SESSIONS_DIR,
) -> None:
    """Benchmark a session's models side by side; with no measure given, show the saved table."""
    from tui.report import RichSink, bench_table

    session = api.Session.open(_root(sessions_dir), name)
    cfg = BenchConfig(tasks=list(tasks), limit=limit, seed=seed, ppl=list(ppl), seq_lens=list(seq_len),
                      ppl_windows=ppl_windows or None, speed=speed, batches=list(batch),
                      rows=[r.strip() for r in rows.split(",") if r.strip()] if rows else None)
    console = Console(emoji=False)
    if cfg.tasks or cfg.ppl or cfg.speed:
        api.validate_bench(cfg)  # bad files and names fail before the model loads
        with RichSink(console) as sink:
            results = api.run_bench(session, cfg, sink)
    else:
        results = api.bench_results(session)
        if not results:
            raise AdapruneError(f"session {name!r} has no benchmark yet: give --tasks, --ppl or --speed")
    console.print(bench_table(results))
    if len(results.get("rows", {})) > 1 and console.is_terminal:
        console.print(api.plot_text(results, width=min(console.width, 100)), highlight=False, markup=False)
    for path, text in ((markdown, api.to_markdown), (csv, api.to_csv)):
        if path:
            path.write_text(text(results), encoding="utf-8")
    if json_out:
        json_out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if plot:
        api.plot_png(results, plot)


@app.command("app")
@clean_errors
def app_cmd(
    new: bool = typer.Option(False, "--new", help="open the new-session form, filled with the embedded defaults"),
    no_color: bool = typer.Option(False, "--no-color", help="render without colours (poor terminals, logs)"),
    sessions_dir: Path = SESSIONS_DIR,
) -> None:
    """Open the app (also what `adaprune` alone does on a terminal)."""
    _run_app(sessions_dir, new, no_color)


def main() -> None:
    app(prog_name="adaprune")


if __name__ == "__main__":
    sys.exit(main())
