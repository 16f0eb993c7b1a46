"""Rendering engine events and results with Rich (the CLI's view of the engine)."""

from __future__ import annotations

from rich import box
from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column, Table

from engine import api
from engine.api import SessionRow, TrialRows
from engine.events import (
    BestChanged,
    Event,
    Log,
    Metric,
    RecoveryStep,
    SearchFinished,
    StageFinished,
    StageProgress,
    StageStarted,
    TrialFinished,
    TrialStarted,
)


class RichSink:
    """An engine sink drawing one progress bar per stage (count and ETA) and printing logs above them.

    On a terminal, a search's trials show as a live table above the bars (baseline and best pinned, the
    latest below); elsewhere (a log file, a pipe) each trial is one printed line.
    """

    def __init__(self, console: Console, live: bool | None = None, table_rows: int = 12) -> None:
        self.console = console
        self.board = TrialRows()
        self.table_rows = table_rows
        self.live = console.is_terminal if live is None else live
        self._live: Live | None = None
        self.progress = Progress(
            SpinnerColumn(),
            TextColumn("{task.description}", table_column=Column(width=28, no_wrap=True, overflow="ellipsis")),
            BarColumn(bar_width=20),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.tasks: dict[str, TaskID] = {}
        self.finished: dict[str, TaskID] = {}
        self.totals: dict[TaskID, int | None] = {}

    def __enter__(self) -> RichSink:
        if self.live:
            # one Live draws the trials table and the bars together; the Progress is only rendered by it
            self._live = Live(console=self.console, get_renderable=self._render, refresh_per_second=4,
                              transient=False)
            self._live.start()
        else:
            self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None
        else:
            self.progress.stop()

    def _render(self) -> RenderableType:
        if not self.board.rows:
            return self.progress
        return Group(trials_table(self.board, self.table_rows), self.progress)

    def __call__(self, event: Event) -> None:
        if self.board.apply(event) and self.live:
            if isinstance(event, BestChanged):
                self.console.print(f"[green]best so far: trial {event.number}, objective {event.value:.3f}[/]")
            return
        if isinstance(event, StageStarted):
            if event.stage in self.finished:  # a stage that repeats (every trial prunes): one row, the latest
                self.progress.remove_task(self.finished.pop(event.stage))
            self.tasks[event.stage] = self.progress.add_task(event.stage, total=event.total)
            self.totals[self.tasks[event.stage]] = event.total
        elif isinstance(event, StageProgress) and event.stage in self.tasks:
            self.totals[self.tasks[event.stage]] = event.total
            self.progress.update(self.tasks[event.stage], completed=event.done, total=event.total)
        elif isinstance(event, StageFinished) and event.stage in self.tasks:
            task = self.tasks.pop(event.stage)
            total = self.totals.pop(task, None) or 1
            if event.outcome == "done":
                self.progress.update(task, total=total, completed=total)
            else:  # the bar stays where the work stopped, and says why
                self.progress.update(task, description=f"{event.stage} ({event.outcome})")
            self.finished[event.stage] = task
        elif isinstance(event, Log):
            style = {"warning": "yellow", "error": "red"}.get(event.level, "dim")
            self.progress.console.print(f"[{style}]{escape(event.message)}[/]")
        elif isinstance(event, RecoveryStep):
            if "recovery" in self.tasks:
                self.progress.update(self.tasks["recovery"], description=f"recovery (loss {event.loss:.3f})")
            if event.valid_ppl is not None:
                self.progress.console.print(f"step {event.step}/{event.total}: loss {event.loss:.3f}, lr "
                                            f"{event.lr:.2g}, validation PPL {event.valid_ppl:.2f}")
        elif isinstance(event, Metric):
            self.progress.console.print(f"[dim]{escape(event.model)} {escape(event.name)} = "
                                        f"{metric_value(event.name, event.value)}[/]")
        elif isinstance(event, TrialStarted):
            self.progress.console.print(f"[cyan]trial {event.number}[/] {escape(describe(event.params))}")
        elif isinstance(event, TrialFinished):
            value = f"{event.value:.3f}" if event.value is not None else "-"
            extra = f" ({escape(event.message)})" if event.message else ""
            timing = f" in {event.seconds:.1f} s (objective {event.objective_seconds:.1f} s)" if event.seconds else ""
            self.progress.console.print(f"[cyan]trial {event.number}[/] {event.state}: objective {value}{timing}{extra}")
        elif isinstance(event, BestChanged):
            self.progress.console.print(f"[green]best so far: trial {event.number}, objective {event.value:.3f}[/]")
        elif isinstance(event, SearchFinished):
            best = f"; best trial {event.best_number} ({event.best_value:.3f})" if event.best_value is not None else ""
            self.progress.console.print(f"search {event.status}: {event.completed}/{event.total} trials{best}")


def calib_text(p: dict) -> str:
    calib = f"{p.get('calib_source')} {p.get('calib_n')}x{p.get('calib_len')} {p.get('calib_select')}"
    return calib + (f" #{p.get('calib_seed')}" if p.get("calib_select") == "random" else "")


def metric_text(p: dict) -> str:
    metric = p.get("metric")
    if p.get("metric2") not in (None, "none", metric):
        metric = f"{metric}+{p.get('mix')}*{p.get('metric2')}"
    return f"{metric}/{p.get('aggregate')}"


def layout_text(p: dict) -> str:
    spread = "global" if p.get("allocation") == "global" else f"ramp {p.get('ramp', 0)}"
    repair = "" if p.get("repair", "none") == "none" else \
        f", repair {p['repair']} λ{p.get('repair_lambda'):g}"
    return f"attn {p.get('attn_share')}, {spread}, keep {p.get('first_kept')}/{p.get('last_kept')}{repair}"


STATE_STYLE = {"complete": "", "pruned": "dim", "duplicate": "dim", "failed": "red", "running": "cyan"}


def trials_table(board: TrialRows, limit: int = 12) -> Table:
    """The trials so far: the baseline (LLM-Pruner's recipe) marked, the best in green, objective vs baseline."""
    t = Table(title=f"trials ({len(board.rows)} so far)", box=box.SIMPLE_HEAD, pad_edge=False, expand=True)
    # the numbers never shrink; on a narrow terminal the descriptions are cut short instead
    t.add_column("#", justify="right", no_wrap=True, min_width=6)
    for name in ("metric", "calibration", "layout"):
        t.add_column(name, no_wrap=True, overflow="ellipsis", ratio=1)
    t.add_column("objective", justify="right", no_wrap=True, min_width=9)
    t.add_column("vs base", justify="right", no_wrap=True, min_width=7)
    t.add_column("state", no_wrap=True, min_width=9)
    for r in board.shown(limit):
        gain = board.gain(r)
        number = f"{r.number}" + (" base" if board.is_baseline(r) else "")
        value = f"{r.value:.3f}" if r.value is not None else ""
        state = "best" if r.number == board.best else r.state
        style = "bold green" if r.number == board.best else STATE_STYLE.get(r.state, "")
        t.add_row(number, escape(metric_text(r.params)), escape(calib_text(r.params)), escape(layout_text(r.params)), value,
                  f"{-gain:+.1%}" if gain is not None and not board.is_baseline(r) else "", state, style=style)
    return t


def metric_value(name: str, value: float) -> str:
    """A measurement as the bench table prints it (PPL to 2 places, accuracy to 3), so live lines and the
    table agree."""
    return format(value, ".2f" if name.startswith("ppl:") else ".3f" if name.startswith("acc:") else ".4g")


def describe(params: dict) -> str:
    """A trial's configuration in one short line."""
    return f"{metric_text(params)} on {calib_text(params)}; {layout_text(params)}"


def cut(text: str, width: int, path: bool = False) -> str:
    """`text` in at most `width` columns: its start, or with `path` its end (a model folder's name)."""
    if len(text) <= width:
        return text
    return "…" + text[-(width - 1):] if path else text[: width - 1] + "…"


def when(t: float | None) -> str:
    """When a session last changed, in 5 columns: the time of day for today, the date before."""
    import datetime

    if not t:
        return ""
    at = datetime.datetime.fromtimestamp(t)
    return at.strftime("%H:%M" if at.date() == datetime.date.today() else "%m-%d")


def sessions_table(rows: list[SessionRow]) -> Table:
    # no side rules, narrow gaps, the LoRA recovery inside the status: 80 columns hold the table, and what is
    # too long wraps instead of being cut (only a model path loses its head)
    t = Table(title="sessions", box=box.SIMPLE_HEAD, pad_edge=False, padding=0)  # the box puts a space between
    for col in ("name", "model", "prune", "trials", "best", "status", "changed"):
        t.add_column(col, justify="right" if col in ("trials", "best") else "left",
                     no_wrap=col != "status", overflow="fold", ratio=1 if col == "status" else None)
    for r in rows:
        best = f"{r.best:.3f}" if r.best is not None else ""
        target = f"{r.prune:.0%}" if r.prune else ""
        status = r.status + (f"; LoRA {r.recovery}" if r.recovery else "")
        t.add_row(escape(r.name), escape(cut(r.model, 16, path=True)), target, f"{r.done}/{r.trials}",
                  best, escape(status), when(r.updated))
    return t


def _ratio(a: float | None, b: float | None) -> str:
    return f"{b / a:.2f}x" if a and b else ""


def result_table(r: api.PruneResult) -> Table:
    t = Table(title=f"{escape(r.config.model)}: {r.plan.removed:,} parameters removed "
                    f"({r.plan.removed / r.plan.params_before:.2%}, target {r.config.prune:.0%})")
    t.add_column("measure")
    t.add_column("dense", justify="right")
    t.add_column("pruned", justify="right")
    t.add_column("pruned/dense", justify="right")
    d, p = r.dense, r.pruned
    t.add_row("parameters", f"{d.params:,}", f"{p.params:,}", _ratio(d.params, p.params))
    for name in d.ppl:
        t.add_row(f"PPL {escape(name)} @{r.config.eval_seq_len}", f"{d.ppl[name]:.2f}", f"{p.ppl[name]:.2f}",
                  _ratio(d.ppl[name], p.ppl[name]))
    if d.speed and p.speed:
        s = d.speed
        t.add_row(f"prefill tokens/s ({s.batch}x{s.prompt_len})", f"{d.speed.prefill_tok_s:,.0f}",
                  f"{p.speed.prefill_tok_s:,.0f}", _ratio(d.speed.prefill_tok_s, p.speed.prefill_tok_s))
        t.add_row("decode tokens/s (batch 1)", f"{d.speed.decode_tok_s:,.1f}", f"{p.speed.decode_tok_s:,.1f}",
                  _ratio(d.speed.decode_tok_s, p.speed.decode_tok_s))
        t.add_row("time to first token (ms)", f"{d.speed.ttft_s * 1e3:,.0f}", f"{p.speed.ttft_s * 1e3:,.0f}",
                  _ratio(d.speed.ttft_s, p.speed.ttft_s))
    if d.peak_mib and p.peak_mib:
        t.add_row("peak memory (MiB)", f"{d.peak_mib:,.0f}", f"{p.peak_mib:,.0f}", _ratio(d.peak_mib, p.peak_mib))
    return t


def bench_table(results: dict) -> Table:
    """A session's comparison table (engine.bench.run.table) with numbers right-aligned."""

    header, body = api.table(results)
    t = Table(title="benchmark")
    for i, col in enumerate(header):
        t.add_column(col, justify="left" if i == 0 else "right")
    for line in body:
        t.add_row(*map(escape, line))
    return t
