"""Benchmarks: the session's comparison table (dense, best, trial 0, magnitude, random, overrides), and a key
to run or extend it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Header, Input, ProgressBar, Static

from engine import api
from engine.config import BenchConfig
from engine.errors import AdapruneError
from engine.events import StageProgress, StageStarted
from tui.jobs import EngineEvent, JobDone, start_job
from tui.screens.dialogs import field_row


class BenchForm(ModalScreen[BenchConfig | None]):
    BINDINGS = [Binding("ctrl+s", "run", "Run", priority=True, id="bench-form.run", tooltip="run the benchmark"),
                Binding("escape", "cancel", "Cancel", id="bench-form.cancel", tooltip="close the form")]

    def compose(self) -> ComposeResult:
        with Vertical(classes="dialog"):
            yield Static("Benchmark the dense model against the session's plans; results already measured are "
                         "kept and extended.", markup=False, classes="question")
            yield field_row("Tasks", Input("", id="tasks", placeholder="piqa, tasks/boolq.jsonl", compact=True))
            yield Static("zero-shot: lm-eval names (need the hub) or local .jsonl files, comma-separated",
                         markup=False, classes="dim hintline")
            yield field_row("Rows/task", Input("100", id="limit", placeholder="all", compact=True))
            yield field_row("PPL texts", Input("stdlib-docs", id="ppl", compact=True))
            yield Static("wikitext2, ptb, c4 (need the hub), stdlib-docs, or .txt/.jsonl/.parquet files",
                         markup=False, classes="dim hintline")
            yield Checkbox("speed and memory (prefill and decode; slow on a CPU)", value=False, id="speed",
                           compact=True)
            yield Static("", markup=False, id="problem", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Run (ctrl+s)", variant="primary", id="run", compact=True)

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_run()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()  # Enter moves on; the work starts on ctrl+s or the button, never by accident

    def action_run(self) -> None:

        items = [t.strip() for t in self.query_one("#tasks", Input).value.split(",") if t.strip()]
        ppl = [t.strip() for t in self.query_one("#ppl", Input).value.split(",") if t.strip()]
        limit = self.query_one("#limit", Input).value.strip()
        try:
            cfg = BenchConfig(tasks=items, ppl=ppl, limit=int(limit) if limit else None,
                              speed=self.query_one("#speed", Checkbox).value)
            if not (cfg.tasks or cfg.ppl or cfg.speed):
                raise AdapruneError("choose something to measure")
            api.validate_bench(cfg)
        except (AdapruneError, ValueError) as e:
            self.query_one("#problem", Static).update(str(e) if isinstance(e, AdapruneError) else "limit: a number")
            return
        self.dismiss(cfg)

    def action_cancel(self) -> None:
        self.dismiss(None)


class BenchScreen(Screen):
    BINDINGS = [Binding("r", "run", "Run / extend", id="bench.run", tooltip="run or extend the table (a form)"),
                Binding("escape", "back", "Back", id="bench.back", tooltip="back")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self.running = False

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"benchmarks of session {self.session_name}", markup=False, id="title")
        yield DataTable(id="bench", cursor_type="row", zebra_stripes=True)
        with Horizontal(classes="bars", id="stage-row"):
            yield Static("", markup=False, id="stage", classes="barlabel")
            yield ProgressBar(id="stage-bar", show_eta=True)
        yield Static("", markup=False, id="status", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#stage-row").display = False  # shown while a benchmark runs
        self.show_results()

    def show_results(self) -> None:
        try:
            results = self.app.backend.bench_results(self.session_name)
        except AdapruneError as e:
            self.query_one("#status", Static).update(f"error: {e}")
            return
        t = self.query_one(DataTable)
        t.clear(columns=True)
        if not results:
            self.query_one("#status", Static).update("no benchmark yet: r runs one")
            return
        header, body = api.table(results)
        for col in header:
            t.add_column(col)
        for line in body:
            t.add_row(*line)

    def action_run(self) -> None:
        if self.running:
            self.notify("a benchmark is running", severity="warning")
            return

        def go(cfg: BenchConfig | None) -> None:
            if cfg is None:
                return
            self.running = True
            name = self.session_name
            start_job(self, "bench", lambda sink, control: self.app.backend.run_bench(name, cfg, sink, control))

        self.app.push_screen(BenchForm(), go)

    def on_engine_event(self, message: EngineEvent) -> None:
        e = message.event
        if isinstance(e, StageStarted):
            self.query_one("#stage-row").display = True
            self.query_one("#stage", Static).update(e.stage[:40])
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=0)
        elif isinstance(e, StageProgress):
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=e.done)
        elif getattr(e, "kind", "") == "metric":
            self.show_results()  # every measurement is saved as it lands: show it

    def on_job_done(self, message: JobDone) -> None:
        if message.job != "bench":
            return
        self.running = False
        self.show_results()
        if message.error:
            self.query_one("#status", Static).update(f"error: {message.error} (results already measured are kept)")
            self.notify(message.error, severity="error")
        elif message.cancelled:
            self.notify("benchmark cancelled; results already measured are kept")
        else:
            self.notify("benchmark done")

    def action_back(self) -> None:
        self.app.pop_screen()
