"""What the app asks of the engine, in one place: the engine's public API behind plain methods.

Long calls (search, re-evaluate, bench, recovery, export) block and report through a sink and obey a Control; the app
runs them in worker threads. Tests swap this class for a fake that replays recorded events.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

from engine import api
from engine.config import EMBEDDED, MAX_PRUNE, SEARCH_METRICS, SearchConfig, check_prune
from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Event, Sink, event_from_dict


@dataclass
class NewSession:
    """The new-session form, as text fields (validated by `Backend.check_new`)."""

    name: str = "smol20"
    model: str = EMBEDDED
    prune: str = "0.20"
    layers: str = "search"  # "search" (first/last kept layers are searched) or "A-B"
    sources: str = "stdlib-docs, self"
    metrics: list[str] = field(default_factory=lambda: list(SEARCH_METRICS))
    trials: str = "20"
    objective: str = "stdlib-docs/valid, self"
    device: str = "auto"


def _items(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


class Backend:
    def __init__(self, root: Path) -> None:
        self.root = root

    # --- sessions -------------------------------------------------------------------------------------------

    def sessions(self) -> list[api.SessionRow]:
        return [api.summary(s) for s in api.list_sessions(self.root)]

    def session(self, name: str):
        return api.Session.open(self.root, name)

    def all_trials_done(self, name: str) -> int | None:
        """The trial budget when the session has run all of it and saved its best (nothing to resume); None
        while trials are still to go. Reads this session's study only."""
        row = api.summary(self.session(name))
        done = row.trials and row.done >= row.trials and row.best is not None
        return row.trials if done else None

    def rename(self, name: str, new: str) -> None:
        self.session(name).rename(new.strip())

    def delete(self, name: str) -> None:
        self.session(name).delete()

    def config(self, name: str) -> dict:
        return self.session(name).config()

    def is_running(self, name: str) -> bool:
        """A process runs the session's search: its driver (the lock's holder) or workers alone."""
        return self.holder(name) is not None or bool(self.workers(name))

    def workers(self, name: str) -> list[str]:
        """The live processes of this machine that work on the session's search ("PID@HOST"), from its log."""
        events, _ = self.session(name).read_events()
        return api.Activity().feed(events).live("search")

    # --- a new session --------------------------------------------------------------------------------------

    def name_problem(self, name: str) -> str | None:
        """What is wrong with `name` for a new or renamed session (None: nothing), without touching anything."""
        try:
            api.check_name(name)
        except AdapruneError as e:
            return str(e)
        return f"a session named {name!r} exists already" if (self.root / name).exists() else None

    def memory_line(self, form: NewSession) -> str:
        """The search's memory plan for the form's model and device, when its config is at hand."""
        try:
            line = api.memory_estimate(form.model.strip(), form.device.strip() or "auto", list(form.metrics))
        except Exception:  # an estimate beside a form: never worth a crash of the app
            return ""
        return line or "memory: estimated when the search starts (the model's config is not on this machine yet)"

    def check_new(self, form: NewSession) -> dict[str, str]:
        """Field -> problem, for everything checkable without loading a model (the form flags them in place)."""
        problems: dict[str, str] = {}

        def check(field_name: str, fn) -> None:
            try:
                fn()
            except (AdapruneError, ValueError) as e:
                problems[field_name] = str(e) if isinstance(e, AdapruneError) else "not a number"

        if problem := self.name_problem(form.name):
            problems["name"] = problem
        check("model", lambda: api.check_model(form.model))
        check("prune", lambda: _fraction(form.prune))
        check("trials", lambda: _positive(form.trials, "trials"))
        check("layers", lambda: _layers(form.layers))
        if "layers" not in problems and "model" not in problems and _layers(form.layers) is not None:
            check("layers", lambda: _span_fits(form.layers, api.known_depth(form.model)))
        check("sources", lambda: [api.check_text_spec(s) for s in _items(form.sources)] or _empty("calibration sources"))
        check("objective", lambda: [api.check_text_spec(s, "eval") for s in _items(form.objective)] or _empty("objective texts"))
        if not form.metrics:
            problems["metrics"] = "choose at least one metric to search"
        if form.device not in ("auto", "cpu") and not form.device.startswith("cuda"):
            problems["device"] = "auto, cpu, cuda or cuda:N"
        if not problems:
            check("form", lambda: api.validate_search(self.search_config(form)))
        return problems

    def search_config(self, form: NewSession, n_layers: int | None = None):
        fixed = {}
        span = _span_fits(form.layers, n_layers)
        if span is not None and n_layers is not None:
            fixed = {"first_kept": span[0], "last_kept": n_layers - 1 - span[1]}
        return SearchConfig(model=form.model.strip(), prune=_fraction(form.prune),
                            trials=_positive(form.trials, "trials"), sources=_items(form.sources),
                            objective=_items(form.objective), metrics=list(form.metrics), device=form.device,
                            fixed=fixed)

    def create(self, form: NewSession, sink: Sink) -> str:
        cfg = self.search_config(form)
        n = api.model_layers(cfg.model, cfg.trust_remote_code, sink) if _layers(form.layers) else None
        api.create_session(self.root, form.name, self.search_config(form, n), sink)
        return form.name

    # --- long work (called from worker threads) -------------------------------------------------------------

    def run_search(self, name: str, sink: Sink, control: Control) -> dict:
        """The search in this process (the CLI's way); the app uses `start_search`."""
        session = self.session(name)
        with session.lock():
            return api.run_search(session, sink, control)

    def start_search(self, name: str) -> subprocess.Popen:
        """Run the session's search in a process of its own, detached from this terminal: it outlives the
        app, a closed terminal and a dropped SSH connection (`adaprune resume` in a new session). Its output
        goes to search.log in the session; the app follows its events file, and pauses and cancels it through
        the session's requests file."""
        return self._spawn(name, "search", ["resume", name])

    def start_recovery(self, name: str, cfg, resume: bool, restart: bool) -> subprocess.Popen:
        """The LoRA recovery in a detached process of its own, as `start_search` (output in recover.log)."""
        return self._spawn(name, "recover", recovery_args(name, cfg, resume, restart))

    def start_bench(self, name: str, cfg) -> subprocess.Popen:
        """A benchmark in a detached process of its own, as `start_search` (output in bench.log)."""
        return self._spawn(name, "bench", bench_args(name, cfg))

    def _spawn(self, name: str, job: str, args: list) -> subprocess.Popen:
        session = self.session(name)
        env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "120", "PYTHONUNBUFFERED": "1"}
        with (session.path / f"{job}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "tui.cli", *map(str, args), "--sessions-dir", str(self.root.resolve())],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, close_fds=True,
                start_new_session=True)  # its own session: the terminal's hangup does not reach it

    def request(self, name: str, command: str, job: str = "search") -> None:
        """Ask the processes working on the session's `job` (search, recover) to pause, resume or cancel."""
        api.request(self.session(name), job, command)

    def requested(self, name: str, job: str = "search") -> str | None:
        req = api.requested(self.session(name), job)
        return req["command"] if req else None

    def paused(self, name: str, job: str = "search") -> bool:
        """The session's running `job` was asked to pause since it began (a pause left from an earlier run
        is not this one's)."""
        return api.pause_pending(self.session(name), job)

    def holder(self, name: str, job: str = "search") -> dict | None:
        """The live process running the session's `job` (search, recover, bench), or None. A search and a
        recovery share the session's lock: its holder says which of them it runs."""
        if job == "bench":
            return self.session(name).holder("bench")
        held = self.session(name).holder()
        what = (held or {}).get("what", "search")  # locks from before the field existed: a search
        return held if held is not None and what == ("recovery" if job == "recover" else "search") else None

    def last_error(self, name: str, job: str = "search") -> str | None:
        """The error line a search (or recovery) process left in its log, if it ended with one."""
        path = self.session(name).path / f"{job}.log"
        try:
            lines = path.read_text(encoding="utf-8", errors="replace").splitlines()[-50:]
        except OSError:
            return None
        lines = [ln.strip() for ln in lines if ln.strip()]
        errors = [ln for ln in lines if ln.startswith(("error:", "cancelled"))]
        if errors:
            return errors[-1]
        if any(ln.startswith("Traceback") for ln in lines):  # a bug, not a user error: its last line says what
            return f"the {job} process failed: {lines[-1]} ({job}.log in the session has the details)"
        return lines[-1] if lines else None

    def follow(self, name: str, offset: int, job: str | None = None) -> tuple[list[Event], int]:
        """The session's events since `offset`; with `job`, only that job's (and untagged ones, from older
        logs)."""
        rows, offset = self.session(name).follow_events(offset)
        events = []
        for row in rows:
            if job is not None and row.get("job", job) != job:
                continue
            try:
                events.append(event_from_dict(row))
            except (KeyError, TypeError):
                continue  # an event kind from a newer adaprune: skip it
        return events, offset

    def best_plan(self, name: str):
        return api.best_plan(self.session(name))

    def plans(self, name: str) -> list:
        """The plans the session can export: best first, then the re-evaluated edits, then saved ones."""
        return api.plan_choices(self.session(name))

    def reevaluate(self, name: str, edits: dict[int, tuple[int, int]], sink: Sink, control: Control) -> dict:
        return api.reevaluate(self.session(name), edits, sink, control)

    def bench_results(self, name: str) -> dict | None:
        return api.bench_results(self.session(name))

    def run_bench(self, name: str, cfg, sink: Sink, control: Control) -> dict:
        return api.run_bench(self.session(name), cfg, sink, control)

    def export(self, name: str, out: str, force: bool, widths: str, sink: Sink, control: Control,
               recovered: bool = False, plan: str = "best") -> str:
        return api.export_session(self.root, name, Path(out).expanduser(), force, sink, widths, control, recovered,
                                  plan)

    def recovery_state(self, name: str) -> api.RecoveryState | None:
        return api.recovery_state(self.session(name))

    def recover(self, name: str, cfg, resume: bool, restart: bool, sink: Sink,
                control: Control) -> api.RecoveryState:
        return api.run_recovery(self.root, name, cfg, sink, control, resume=resume, restart=restart)


def _fraction(text: str) -> float:
    try:
        return check_prune(float(text))
    except AdapruneError:  # the same rule, said for a form field rather than a flag
        raise AdapruneError(f"a fraction of all parameters in (0, {MAX_PRUNE}], e.g. 0.20") from None


def _positive(text: str, what: str) -> int:
    value = int(text)
    if value < 1:
        raise AdapruneError(f"{what}: at least 1")
    return value


def _layers(text: str) -> tuple[int, int] | None:
    text = text.strip().lower()
    if text == "search":
        return None
    a, sep, b = text.partition("-")
    if not sep or not a.strip().isdigit() or not b.strip().isdigit() or int(a) > int(b):
        raise AdapruneError("'search' (the search picks them) or a range A-B, e.g. 4-27")
    return int(a), int(b)


def _span_fits(text: str, n_layers: int | None) -> tuple[int, int] | None:
    """The range `text` gives (None: the search picks), refused when it runs past the model's `n_layers`."""
    span = _layers(text)
    if span is not None and n_layers is not None and span[1] >= n_layers:
        raise AdapruneError(f"the model has layers 0..{n_layers - 1}: give a range within them, or 'search'")
    return span


def _empty(what: str):
    raise AdapruneError(f"give at least one of the {what}")


def recovery_args(name: str, cfg, resume: bool, restart: bool) -> list[str]:
    """`adaprune recover` arguments that give the process exactly `cfg` (a test parses them back)."""
    args = ["recover", name, "--plan", cfg.plan, "--steps", cfg.steps, "--batch", cfg.batch_size,
            "--seq-len", cfg.seq_len, "--lr", repr(cfg.lr), "--rank", cfg.rank,
            "--alpha", cfg.alpha, "--dropout", repr(cfg.dropout), "--targets", ",".join(cfg.targets),
            "--valid-windows", cfg.valid_windows, "--eval-every", cfg.eval_every, "--save-every",
            cfg.save_every, "--seed", cfg.seed, *(a for d in cfg.data for a in ("--data", d)),
            *(a for v in cfg.valid for a in ("--valid", v)),
            *(["--warmup", cfg.warmup] if cfg.warmup is not None else []),
            *(["--grad-checkpointing"] if cfg.grad_checkpointing else []),
            *(["--distil", "--distil-weight", repr(cfg.distil)] if cfg.distil else []),
            *(["--resume"] if resume else []), *(["--restart"] if restart else [])]
    return [str(a) for a in args]


def bench_args(name: str, cfg) -> list[str]:
    """`adaprune bench` arguments that give the process exactly `cfg` (a test parses them back)."""
    args = ["bench", name, *(a for t in cfg.tasks for a in ("--tasks", t)), "--seed", cfg.seed,
            *(a for p in cfg.ppl for a in ("--ppl", p)), *(a for n in cfg.seq_lens for a in ("--seq-len", n)),
            "--ppl-windows", cfg.ppl_windows or 0, *(a for b in cfg.batches for a in ("--batch", b)),
            *(["--speed"] if cfg.speed else []), *(["--limit", cfg.limit] if cfg.limit is not None else []),
            *(["--rows", ",".join(cfg.rows)] if cfg.rows else [])]
    return [str(a) for a in args]
