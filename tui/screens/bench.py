"""Benchmarks: the session's comparison table (dense, best, trial 0, magnitude, random, overrides), and a key
to run or extend it."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import Button, Checkbox, DataTable, Footer, Header, Input, ProgressBar, Static

from engine import api
from engine.config import BenchConfig
from engine.errors import AdapruneError
from engine.events import Log, Metric, StageProgress, StageStarted
from tui.report import metric_value
from tui.screens.dialogs import field_row
from tui.screens.follow import FollowsProcess, Remote
from tui.widgets import Check, RowTable


class BenchForm(ModalScreen[BenchConfig | None]):
    BINDINGS = [Binding("ctrl+s", "run", "Run", priority=True, id="bench-form.run", tooltip="run the benchmark"),
                Binding("escape", "cancel", "Cancel", id="bench-form.cancel", tooltip="close the form")]

    FIELDS = {"tasks": "", "limit": "100", "ppl": "stdlib-docs", "windows": "40", "rows": ""}

    def __init__(self, values: dict | None = None) -> None:
        """`values`: the fields as the last run had them (the form opens with them)."""
        super().__init__()
        self.values = {**self.FIELDS, **(values or {})}

    def compose(self) -> ComposeResult:
        v = self.values
        with VerticalScroll(classes="dialog", can_focus=False):  # a long refusal must not push Run off screen
            yield Static("Benchmark the dense model against the session's plans; results already measured are "
                         "kept and extended.", markup=False, classes="question")
            yield field_row("Tasks", Input(v["tasks"], id="tasks", placeholder="none (e.g. piqa or my.jsonl)", compact=True))
            yield Static("zero-shot: lm-eval names (need the hub) or local .jsonl files, comma-separated",
                         markup=False, classes="dim hintline")
            yield field_row("Rows/task", Input(v["limit"], id="limit", placeholder="all", compact=True))
            yield field_row("PPL texts", Input(v["ppl"], id="ppl", compact=True))
            yield Static(f"{', '.join(api.HUB_TEXTS)} (need the hub), {api.BUILTIN_TEXT}, or .txt/.jsonl/.parquet "
                         f"files", markup=False, classes="dim hintline")
            yield field_row("Windows", Input(v["windows"], id="windows", placeholder="0: the whole text", compact=True))
            yield field_row("Rows", Input(v["rows"], id="rows", placeholder="all", compact=True))
            yield Static("dense, best, baseline, oneshot, oneshot-repaired, magnitude, random, recovered, "
                         "plan:NAME", markup=False, classes="dim hintline")
            yield Check("speed and memory (prefill and decode; slow on a CPU)", value=bool(v.get("speed")), id="speed",
                           compact=True)
            yield Static("", markup=False, id="problem", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Run (ctrl+s)", variant="primary", id="run", compact=True)
        yield Footer(compact=True)  # this form's keys, not the screen's behind it

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_run()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()  # Enter moves on; the work starts on ctrl+s or the button, never by accident

    def config(self) -> BenchConfig:
        """The form as a benchmark configuration; AdapruneError names the first problem (no file is read)."""
        def items(field: str) -> list[str]:
            return [t.strip() for t in self.query_one(f"#{field}", Input).value.split(",") if t.strip()]

        def whole(field: str, what: str) -> int | None:
            text = self.query_one(f"#{field}", Input).value.strip()
            if text and not text.isdigit():
                raise AdapruneError(f"{what} {text!r}: a whole number, e.g. 40")
            return int(text) if text else None

        rows = items("rows")
        cfg = BenchConfig(tasks=items("tasks"), ppl=items("ppl"), limit=whole("limit", "Rows/task"),
                          ppl_windows=whole("windows", "Windows") or None, rows=rows or None,
                          speed=self.query_one("#speed", Checkbox).value)
        if not (cfg.tasks or cfg.ppl or cfg.speed):
            raise AdapruneError("nothing to measure: give tasks or PPL texts, or tick speed")
        known = ("dense", "best", "baseline", "oneshot", "oneshot-repaired", "magnitude", "random", "recovered")
        bad = [r for r in rows if r not in known and not r.startswith("plan:")]
        if bad:
            raise AdapruneError(f"no row {bad[0]!r}: choose among those listed under Rows")
        return cfg

    field_error = False  # the problem line shows a field's error (cleared when fixed), not Run's refusal

    def check(self, typing: bool = False) -> BenchConfig | None:
        """The form's configuration, or None with its problem shown. While typing, a refusal Run showed (a
        file that is not there) stays until the next Run: keys typed fast must not wipe it."""
        try:
            cfg, problem = self.config(), ""
        except AdapruneError as e:
            cfg, problem = None, str(e)
        if problem or self.field_error or not typing:
            self.query_one("#problem", Static).update(problem)
            self.field_error = bool(problem)
        return cfg

    def on_input_changed(self, event: Input.Changed) -> None:
        self.check(typing=True)  # files and task names are read once, on Run

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        self.check(typing=True)

    def action_run(self) -> None:
        cfg = self.check()
        if cfg is None:
            return
        try:
            api.validate_bench(cfg)
        except AdapruneError as e:
            self.query_one("#problem", Static).update(str(e))
            self.call_after_refresh(self.query_one("#run", Button).scroll_visible, animate=False)  # and its error
            return
        self.values = {**{k: self.query_one(f"#{k}", Input).value for k in self.FIELDS},
                       "speed": self.query_one("#speed", Checkbox).value}  # the next form opens with them
        self.dismiss(cfg)

    def action_cancel(self) -> None:
        self.dismiss(None)


class BenchScreen(FollowsProcess, Screen):
    JOB, WHAT = "bench", "benchmark"
    PAUSE_NOTE = "pausing at the next measurement (p resumes)"
    IDLE_NOTE = "no benchmark is running: r runs one (the rows measured are kept)"

    BINDINGS = [Binding("r", "run", "Run / extend", id="bench.run", tooltip="run or extend the table (a form)"),
                Binding("p", "pause", "Pause", id="bench.pause", tooltip="pause or resume at the next measurement"),
                Binding("p", "resume", "Resume", id="bench.resume", tooltip="go on from where it paused"),
                Binding("c", "cancel", "Cancel", id="bench.cancel",
                        tooltip="stop (what is measured is kept; r runs the rest)"),
                Binding("p", "idle", show=False, id="bench.idle-pause"),
                Binding("c", "idle", show=False, id="bench.idle-cancel"),
                Binding("escape", "back", "Back", id="bench.back", tooltip="back (the benchmark keeps running)")]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self._control = None
        self.process = None  # the benchmark process this app started, when it did
        self.log_offset = 0
        self.cancel_seen = False  # the run followed here said it stops at a safe point
        self.skipped = ""  # what the run started here does not measure, in words
        self.form_values: dict | None = None  # the form as the last run here had it

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"benchmarks of session {self.session_name}", markup=False, id="title")
        yield RowTable(id="bench", cursor_type="row", zebra_stripes=True)
        with Horizontal(classes="bars", id="stage-row"):
            yield Static("", markup=False, id="stage", classes="barlabel")
            yield ProgressBar(id="stage-bar", show_eta=True)
        yield Static("", markup=False, id="status", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        self.query_one("#stage-row").display = False  # shown while a benchmark runs
        self.show_results()
        try:  # the benchmark's events from now on (what came before is in bench.json)
            _, self.log_offset = self.app.backend.follow(self.session_name, 0)
        except AdapruneError:
            self.log_offset = 0
        self.process = self.app.searches("bench").get(self.session_name)
        self.poll()
        self.set_interval(0.5, self.poll)

    def attached(self) -> None:
        if self.process is None:  # a benchmark this screen did not start: say whose it is
            holder = self.app.backend.holder(self.session_name, "bench") or {}
            self.say(f"a benchmark runs in process {holder.get('pid', '?')}: following it (c stops it)")

    def ended(self) -> None:
        self.show_results()
        self.query_one("#stage-row").display = False
        code = self.process.poll() if self.process is not None else None
        if code not in (None, 0, 130):
            error = self.app.backend.last_error(self.session_name, "bench") or f"the benchmark exited with {code}"
            self.query_one("#status", Static).update(f"{error} (results already measured are kept)")
            self.notify(error, severity="error")
        elif code == 130 or self.cancel_seen:
            self.query_one("#status", Static).update("stopped: what was measured is kept; r runs the rest")
        else:
            self.query_one("#status", Static).update(f"benchmark done{self.skipped}")
            self.notify("benchmark done")

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
        old = {n: r["outdated"] for n, r in results.get("rows", {}).items() if r.get("outdated")}
        odd = [f"* {n}'s PPL {key}: {why}" for (n, key), why in api.mismatched(results).items()]
        if (old or odd) and self.control is None:
            self.query_one("#status", Static).update("; ".join(
                [*(f"{n} outdated: {why}" for n, why in old.items()), *odd]) + " — r measures it again")

    def action_run(self) -> None:
        if self.running():
            self.notify("a benchmark is running", severity="warning")
            return

        def go(cfg: BenchConfig | None) -> None:
            if cfg is None:
                return
            try:  # its own process, like a search: it keeps measuring if the app quits or the connection drops
                self.process = self.app.backend.start_bench(self.session_name, cfg)
            except (AdapruneError, OSError) as e:
                self.query_one("#status", Static).update(f"cannot start the benchmark: {e}")
                return
            self.app.background["bench", self.session_name] = self.process
            self.cancel_seen = False
            self.control = Remote(self.app.backend, self.session_name, "bench")
            skipped = [what for what, given in (("zero-shot (no tasks given)", cfg.tasks), ("PPL (no texts given)",
                       cfg.ppl), ("speed", cfg.speed)) if not given]
            self.skipped = f" (not measured: {', '.join(skipped)})" if skipped else ""  # said at start and end
            self.query_one("#status", Static).update(f"starting the benchmark in process {self.process.pid}…"
                                                     f"{self.skipped}")

        form = BenchForm(self.form_values)

        def went(cfg: BenchConfig | None) -> None:
            if cfg is not None:
                self.form_values = form.values
            go(cfg)

        self.app.push_screen(form, went)

    def apply(self, e) -> None:
        if isinstance(e, StageStarted):
            self.query_one("#stage-row").display = True
            self.query_one("#stage", Static).update(e.stage)
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=0)
        elif isinstance(e, StageProgress):  # also the first sign of a stage that began before this screen
            self.query_one("#stage-row").display = True
            self.query_one("#stage", Static).update(e.stage)
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=e.done)
        elif isinstance(e, Metric):
            self.show_results()  # every measurement is saved as it lands: show it
            self.query_one("#status", Static).update(f"{e.model}: {e.name} {metric_value(e.name, e.value)} (its own process: it "
                                                     f"keeps measuring if the app quits)")
        elif isinstance(e, Log) and e.level != "debug":
            self.query_one("#status", Static).update(e.message)
            if "stopping at a safe point" in e.message:
                self.cancel_seen = True  # this run said it stops: not a cancel left in the requests file

    def action_back(self) -> None:
        self.app.pop_screen()
