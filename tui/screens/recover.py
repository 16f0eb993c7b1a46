"""Recovery: LoRA fine-tuning of the session's pruned model, live (loss, validation PPL), pausable, resumable."""

from __future__ import annotations

from dataclasses import replace

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen, Screen
from textual.widgets import (
    Button,
    Checkbox,
    DataTable,
    Footer,
    Header,
    Input,
    Label,
    ProgressBar,
    RadioSet,
    Sparkline,
    Static,
)

from engine import api
from engine.config import RecoverConfig
from engine.errors import AdapruneError
from engine.events import Log, RecoveryStep, StageProgress, StageStarted
from tui.screens.dialogs import field_row
from tui.screens.follow import FollowsProcess, Remote
from tui.widgets import Check, Radio, RowTable


class RecoverForm(ModalScreen[tuple[RecoverConfig, bool, bool] | None]):
    """What to train on and for how long; (config, resume, restart) or None."""

    BINDINGS = [Binding("ctrl+s", "run", "Start", priority=True, id="recover-form.start", tooltip="start the recovery"),
                Binding("escape", "cancel", "Cancel", id="recover-form.cancel", tooltip="close the form")]

    def __init__(self, state: api.RecoveryState | None, choices: list | None = None) -> None:
        super().__init__()
        self.state = state
        self.choices = choices or []  # api.PlanChoice: the plans it can train (best first)

    def compose(self) -> ComposeResult:
        stopped = self.state is not None and self.state.status != "done"
        # training again starts from the last run's settings
        d = self.state.config if self.state is not None else RecoverConfig()
        # it scrolls: with a new run's fields it is taller than 24 rows (focus scrolls the field into view)
        with VerticalScroll(classes="dialog", can_focus=False):
            if stopped:
                yield Static(f"the recovery stopped at step {self.state.step} of "
                             f"{self.state.config.steps}: continue it, or train again", markup=False)
                yield Check("continue where it stopped (its own settings)", value=True, id="resume")
                yield Static(f"training again discards the {self.state.step} steps done", markup=False,
                             classes="error", id="discards")
            elif self.state is not None:
                yield Static("a finished recovery exists: starting discards it", markup=False, classes="error")
            self.base = d  # what the form does not show (distillation, dropout, …) is the last run's
            with Vertical(id="fresh"):  # a new run's settings: hidden while "continue" is ticked
                yield from self.fresh_fields(d)
            yield Static("", markup=False, id="problem", classes="error")
            with Horizontal(classes="buttons"):
                yield Button("Start (ctrl+s)", variant="primary", id="run", compact=True)
        yield Footer(compact=True)  # this form's keys, not the screen's behind it

    def fresh_fields(self, d: RecoverConfig) -> ComposeResult:
        yield Static("LoRA fine-tuning of the pruned model (LLM-Pruner's recipe), resumable; export merges "
                     "it in.", markup=False, classes="question")
        if self.choices:
            yield Label("Plan to train", classes="field")
            with RadioSet(id="plan", compact=True):
                trained = next((i for i, c in enumerate(self.choices) if c.name == d.plan), 0)
                for i, c in enumerate(self.choices):
                    value = f", objective {c.value:.3f}" if c.value is not None else ""
                    yield Radio(f"{c.label}{value}", value=i == trained, id=f"plan-{i}", compact=True)
        yield field_row("Text", Input(", ".join(d.data), id="data", compact=True))
        yield Static("stdlib-docs, self:NxL (sampled from the dense model), files or hub names; comma-separated", markup=False,
                     classes="dim hintline")
        yield field_row("Steps", Input(str(d.steps), id="steps", compact=True))
        yield field_row("LR", Input(f"{d.lr:g}", id="lr", compact=True))
        yield field_row("LoRA rank", Input(str(d.rank), id="rank", compact=True))
        yield field_row("Batch", Input(f"{d.batch_size}x{d.seq_len}", id="shape", compact=True))
        yield Static("sequences x tokens per step", markup=False, classes="dim hintline")

    def on_mount(self) -> None:
        self.show_fresh()

    def on_checkbox_changed(self, event: Checkbox.Changed) -> None:
        if event.checkbox.id == "resume":
            self.show_fresh()

    def show_fresh(self) -> None:
        resume = self.query("#resume") and self.query_one("#resume", Checkbox).value
        self.query_one("#fresh").display = not resume
        for note in self.query("#discards"):
            note.display = not resume

    def on_button_pressed(self, event: Button.Pressed) -> None:
        self.action_run()

    def on_input_submitted(self, event: Input.Submitted) -> None:
        self.focus_next()  # Enter moves on; the work starts on ctrl+s or the button, never by accident

    def field_problem(self) -> str:
        """The first field that is not what it should be, named in the form's words ("" when none)."""
        value = {k: self.query_one(f"#{k}", Input).value.strip() for k in ("data", "steps", "lr", "rank", "shape")}
        return next((f"{label} {value[k]!r}: {want}" for k, label, want, ok in (
            ("steps", "Steps", "a whole number", value["steps"].isdigit()),
            ("lr", "LR", "a number, e.g. 1e-4", _is_float(value["lr"])),
            ("rank", "LoRA rank", "a whole number", value["rank"].isdigit()),
            ("shape", "Batch", "sequences x tokens, e.g. 4x256",
             all(p.isdigit() for p in value["shape"].split("x")) and value["shape"].count("x") == 1)) if not ok), "")

    field_error = False  # the problem line shows a field's error (cleared when fixed), not Start's refusal

    def on_input_changed(self, event: Input.Changed) -> None:
        if not self.is_mounted or event.input.id not in ("steps", "lr", "rank", "shape"):
            return
        problem = self.field_problem()  # as typed; a refusal from Start stays until the next Start
        if problem or self.field_error:
            self.query_one("#problem", Static).update(problem)
            self.field_error = bool(problem)

    def action_run(self) -> None:
        resume = self.query("#resume") and self.query_one("#resume", Checkbox).value
        if resume:
            self.dismiss((RecoverConfig(), True, False))
            return
        value = {k: self.query_one(f"#{k}", Input).value.strip() for k in ("data", "steps", "lr", "rank", "shape")}
        problem = self.field_problem()
        self.query_one("#problem", Static).update(problem)
        self.field_error = bool(problem)
        if problem:
            return
        try:
            batch, _, seq = value["shape"].partition("x")
            plan = "best"
            if self.choices:
                plan = self.choices[max(self.query_one("#plan", RadioSet).pressed_index, 0)].name
            steps, warmup = int(value["steps"]), self.base.warmup
            cfg = replace(self.base, plan=plan, data=[t.strip() for t in value["data"].split(",") if t.strip()],
                          steps=steps, lr=float(value["lr"]), rank=int(value["rank"]), alpha=2 * int(value["rank"]),
                          batch_size=int(batch), seq_len=int(seq),
                          warmup=warmup if warmup is not None and warmup < steps else None)
            api.validate_recover(cfg)
        except (AdapruneError, ValueError) as e:
            self.query_one("#problem", Static).update(str(e))
            return
        self.dismiss((cfg, False, self.state is not None))

    def action_cancel(self) -> None:
        self.dismiss(None)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


class RecoverScreen(FollowsProcess, Screen):
    JOB, WHAT, LOCK_WHAT = "recover", "recovery", "recovery"
    PAUSE_NOTE = "pausing at the next step (p resumes)"
    IDLE_NOTE = "no recovery is running: r starts or continues one"
    CANCEL_NOTE = "stopping at the next safe point (a step in progress finishes first)…"

    BINDINGS = [
        Binding("r", "train", "Recover", id="recover.train", tooltip="start or continue the recovery (a form)"),
        Binding("p", "pause", "Pause", id="recover.pause", tooltip="pause or resume at the next step"),
        Binding("p", "resume", "Resume", id="recover.resume", tooltip="go on from where it paused"),
        Binding("c", "cancel", "Cancel", id="recover.cancel", tooltip="stop (finished steps are kept; r continues)"),
        Binding("p", "idle", show=False, id="recover.idle-pause"),
        Binding("c", "idle", show=False, id="recover.idle-cancel"),
        Binding("x", "export", "Export", id="recover.export", tooltip="export with the adapter merged in"),
        Binding("escape", "back", "Back", id="recover.back", tooltip="back (the recovery keeps running)"),
    ]

    def __init__(self, name: str) -> None:
        super().__init__()
        self.session_name = name
        self._control = None
        self.process = None  # the recovery process this app started, when it did
        self.log_offset = 0
        self.losses: list[float] = []
        self.step_text = "starting"
        self.paused = False  # the running recovery said it has paused

    def compose(self) -> ComposeResult:
        yield Header()
        yield Static(f"recovery (LoRA) of session {self.session_name}", markup=False, id="title")
        yield Static("", markup=False, id="summary")
        yield Sparkline([], id="loss")
        with Horizontal(classes="bars", id="stage-row"):
            yield Static("", markup=False, id="stage", classes="barlabel")
            yield ProgressBar(id="stage-bar", show_eta=True)
        yield RowTable(id="validation", cursor_type="row", zebra_stripes=True)
        yield Static("", markup=False, id="status", classes="dim")
        yield Footer(compact=True)

    def on_mount(self) -> None:
        t = self.query_one(DataTable)
        for col in ("step", "loss", "lr", "validation PPL"):
            t.add_column(col)
        self.query_one("#stage-row").display = False  # shown while a recovery runs
        self.query_one(Sparkline).display = False  # shown once there is a loss to draw
        self.show_state()
        try:  # the recovery's events from now on (what came before is in its saved state)
            _, self.log_offset = self.app.backend.follow(self.session_name, 0)
        except AdapruneError:
            self.log_offset = 0
        self.process = self.app.searches("recover").get(self.session_name)
        self.poll()
        self.set_interval(0.5, self.poll)
        # the saved state when nothing runs here (the events show a running one live)
        self.set_interval(3, lambda: None if self.control is not None else self.show_state())

    def attached(self) -> None:
        self.show_state()

    def ended(self) -> None:
        self.show_state()
        self.query_one("#stage-row").display = False
        code = self.process.poll() if self.process is not None else None
        try:
            state = self.app.backend.recovery_state(self.session_name)
        except AdapruneError:  # show_state above has put the reason on screen
            state = None
        if state is not None and state.status == "done":
            self.query_one("#status", Static).update("done: x exports the model with the adapter merged in")
            self.notify("recovery done")
        elif code not in (None, 0, 130):
            error = self.app.backend.last_error(self.session_name, "recover") or f"the recovery exited with {code}"
            self.query_one("#status", Static).update(error)
            self.notify(error, severity="error")
        elif state is None or not state.step:
            self.query_one("#status", Static).update("stopped before the first step: nothing to keep; r starts it")
        else:
            self.query_one("#status", Static).update(f"stopped at step {state.step}: the steps done are saved; "
                                                     f"r continues from there")

    def show_state(self) -> None:
        try:
            state = self.app.backend.recovery_state(self.session_name)
        except AdapruneError as e:
            self.query_one("#summary", Static).update(f"error: {e}")
            return
        summary = self.query_one("#summary", Static)
        if state is None and self.control is not None:
            summary.update("preparing the recovery (loading, text, dense PPL) in its own process: it keeps going "
                           "if the app quits")
            return
        if state is None:
            summary.update("no recovery yet: r starts one (LLM-Pruner's LoRA recipe on the built-in corpus)")
            return
        c, history = state.config, state.history
        before, after = state.valid_ppl_before, state.valid_ppl_after
        if after is None:  # stopped or running: the last validation so far
            after, at = next(((h["valid_ppl"], h["step"]) for h in reversed(history) if "valid_ppl" in h), (None, 0))
            last = f" -> {after:.2f} at step {at}" if after is not None else ""
        else:
            last = f" -> {after:.2f}"
        ppl = f"validation PPL {before:.2f}{last}" if before else ""
        summary.update(f"{state.status} on {state.plan}: step {state.step} of {c.steps}, rank {c.rank}, lr {c.lr:g}, "
                       f"{c.batch_size}x{c.seq_len} tokens per step; {ppl}")
        self.losses = [h["loss"] for h in history]
        self.query_one(Sparkline).data = self.losses
        self.query_one(Sparkline).display = bool(self.losses)
        t = self.query_one(DataTable)
        t.clear()
        for h in history:
            if "valid_ppl" in h:
                t.add_row(str(h["step"]), f"{h['loss']:.3f}", f"{h['lr']:.2g}", f"{h['valid_ppl']:.2f}")

    def action_train(self) -> None:
        if self.running():
            self.notify("a recovery is running", severity="warning")
            return
        try:
            state = self.app.backend.recovery_state(self.session_name)
            choices = self.app.backend.plans(self.session_name)
        except AdapruneError as e:
            self.query_one("#status", Static).update(f"error: {e}")
            return

        def go(choice: tuple[RecoverConfig, bool, bool] | None) -> None:
            if choice is None:
                return
            cfg, resume, restart = choice
            try:  # its own process, like a search: it keeps training if the app quits or the connection drops
                self.process = self.app.backend.start_recovery(self.session_name, cfg, resume, restart)
            except (AdapruneError, OSError) as e:
                self.query_one("#status", Static).update(f"cannot start the recovery: {e}")
                return
            self.app.background["recover", self.session_name] = self.process
            self.control = Remote(self.app.backend, self.session_name, "recover")
            if resume:
                self.show_state()
            else:  # a new run: what the discarded one showed goes (its state file is replaced when it starts)
                self.losses, self.paused, self.step_text = [], False, "starting"
                self.query_one(DataTable).clear()
                self.query_one(Sparkline).display = False
                self.query_one("#summary", Static).update(f"preparing a new recovery on {cfg.plan} (loading, text, "
                                                          f"dense PPL) in its own process")
            self.query_one("#status", Static).update(f"starting the recovery in process {self.process.pid}…")

        self.app.push_screen(RecoverForm(state, choices), go)

    def apply(self, e) -> None:
        if isinstance(e, StageStarted):
            self.query_one("#stage-row").display = True
            self.query_one("#stage", Static).update(e.stage)
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=0)
        elif isinstance(e, StageProgress):  # also the first sign of a stage that began before this screen
            self.query_one("#stage-row").display = True
            self.query_one("#stage", Static).update(e.stage)
            self.query_one("#stage-bar", ProgressBar).update(total=e.total, progress=e.done)
        elif isinstance(e, RecoveryStep):
            self.losses.append(e.loss)
            self.query_one(Sparkline).data = list(self.losses)
            self.query_one(Sparkline).display = True
            self.query_one("#status", Static).update(f"step {e.step}/{e.total}: loss {e.loss:.3f}")
            self.step_text = f"step {e.step} of {e.total}"
            self.show_running()
            if e.valid_ppl is not None:
                self.query_one(DataTable).add_row(str(e.step), f"{e.loss:.3f}", f"{e.lr:.2g}", f"{e.valid_ppl:.2f}")
        elif isinstance(e, Log):
            self.query_one("#status", Static).update(e.message)
            if "paused at a safe point" in e.message or e.message.endswith(" resumed"):
                self.paused = "paused at a safe point" in e.message  # the engine says it has paused
                self.show_running()

    def show_running(self) -> None:
        state = "paused (p resumes)" if self.paused else "running"
        self.query_one("#summary", Static).update(f"{state}: {self.step_text} (its own process: it keeps training "
                                                  f"if the app quits)")

    def action_export(self) -> None:
        self.app.open_export(self.session_name)

    def action_back(self) -> None:
        self.app.pop_screen()
