"""A stand-in for tui.backend.Backend that replays recorded engine output (tests/data, made by record.py).

Same methods, no model: the app's flows are tested against it quickly; one test drives the real engine.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

from engine.control import Control
from engine.errors import AdapruneError
from engine.events import Event, Sink, event_from_dict
from engine.prune.plan import Plan
from engine.session.records import BestRecord, RecoveryState, SessionRow
from tui.backend import Backend, NewSession

DATA = Path(__file__).resolve().parent / "data"


def recorded_events() -> list[dict]:
    return [json.loads(line) for line in (DATA / "search_events.jsonl").read_text().splitlines() if line.strip()]


class FakeProcess:
    """What the app keeps of a search process: its pid and, once it ended, its exit code."""

    pid = 4242

    def __init__(self) -> None:
        self.code: int | None = None
        self.thread: threading.Thread | None = None

    def poll(self) -> int | None:
        return None if self.thread is not None and self.thread.is_alive() else self.code


class FakeBackend(Backend):
    def __init__(self, root: Path, names: tuple[str, ...] = ("alpha", "beta")) -> None:
        super().__init__(root)
        self.events = recorded_events()
        self.store = {n: {"config": {"model": "tiny", "prune": 0.2, "trials": 6, "overrides": {}},
                          "done": 6, "best": 40.5, "status": "done", "log": list(self.events),
                          "plan": json.loads((DATA / "plan.json").read_text()),
                          "bench": json.loads((DATA / "bench.json").read_text())} for n in names}
        if "alpha" in self.store:  # stopped with trials to go: `r` resumes it (a finished one has nothing to resume)
            self.store["alpha"].update(done=4, status="stopped")
        self.calls: list[tuple] = []
        self.running: set[str] = set()
        self.delay = 0.0
        self.fail_export: str | None = None
        self.requests: dict[str, str] = {}
        self.exit_code = 0  # what the fake search process exits with

    def sessions(self) -> list[SessionRow]:
        return [SessionRow(n, s["config"]["model"], s["config"]["prune"], s["config"]["trials"], s["status"],
                           1_790_000_000.0, s["done"], s["best"], (s.get("recovery") or {}).get("status"))
                for n, s in sorted(self.store.items())]

    def all_trials_done(self, name: str) -> int | None:
        s = self._get(name)
        done = s["done"] >= s["config"]["trials"] and s["best"] is not None
        return s["config"]["trials"] if done else None

    def _get(self, name: str) -> dict:
        if name not in self.store:
            raise AdapruneError(f"no session {name!r}")
        return self.store[name]

    def rename(self, name: str, new: str) -> None:
        if new in self.store:
            raise AdapruneError(f"a session named {new!r} exists already: choose another name")
        self.store[new] = self.store.pop(name)

    def delete(self, name: str) -> None:
        self._get(name)
        del self.store[name]

    def memory_line(self, form: NewSession) -> str:
        """Fixed (the real one reads this machine's free memory and model cache): snapshots stay the same."""
        return f"memory, about: peak 3.2 GiB of 16.0 GiB free (dense 513 MiB; float32 on cpu) [{form.device}]"

    def config(self, name: str) -> dict:
        return self._get(name)["config"]

    def is_running(self, name: str) -> bool:
        return name in self.running

    def create(self, form: NewSession, sink: Sink) -> str:
        self.calls.append(("create", form))
        self.store[form.name] = {"config": {"model": form.model, "prune": float(form.prune),
                                            "trials": int(form.trials), "overrides": {}},
                                 "done": 0, "best": None, "status": "created", "log": [], "plan": None,
                                 "bench": None}
        return form.name

    def run_search(self, name: str, sink: Sink, control: Control) -> dict:
        s = self._get(name)
        self.calls.append(("search", name))
        for row in self.events:
            control.checkpoint()
            event = event_from_dict(dict(row))
            s["log"].append(row)
            sink(event)
            time.sleep(self.delay)
        s["plan"] = json.loads((DATA / "plan.json").read_text())
        s["status"] = "done"
        return {"completed": 6}

    def start_search(self, name: str):
        """A stand-in for the detached search process: a thread that writes the recorded events into the
        session's log and obeys the requests (pause, resume, cancel) as the engine's SessionControl does."""
        s = self._get(name)
        self.calls.append(("start", name))
        process = FakeProcess()

        def work() -> None:
            status = "done"
            for row in self.events:
                while self.requests.get(name) == "pause":
                    time.sleep(0.02)
                if self.requests.get(name) == "cancel":
                    status = "cancelled"
                    break
                s["log"].append(row)
                time.sleep(self.delay)
            if status == "done":
                s["plan"] = json.loads((DATA / "plan.json").read_text())
            else:
                s["log"].append({"kind": "search_finished", "t": 0, "status": "cancelled", "completed": 3,
                                 "total": 6, "best_number": None, "best_value": None})
            s["status"] = status
            process.code = self.exit_code

        process.thread = threading.Thread(target=work, daemon=True)
        process.thread.start()
        return process

    def request(self, name: str, command: str, job: str = "search") -> None:
        self.calls.append(("request", name, command))
        self.requests[name if job == "search" else f"{job}:{name}"] = command

    def requested(self, name: str, job: str = "search") -> str | None:
        return self.requests.get(name if job == "search" else f"{job}:{name}")

    def paused(self, name: str, job: str = "search") -> bool:
        return self.requested(name, job) == "pause"

    def start_recovery(self, name: str, cfg, resume: bool, restart: bool):
        """The detached recovery process, as a thread writing the recorded recovery events into the log."""
        s = self._get(name)
        self.calls.append(("recover", name, cfg, resume, restart))
        process = FakeProcess()

        def work() -> None:
            for row in (DATA / "recovery_events.jsonl").read_text().splitlines():
                while self.requests.get(f"recover:{name}") == "pause":
                    time.sleep(0.02)
                if self.requests.get(f"recover:{name}") == "cancel":
                    process.code = 130
                    return
                s["log"].append(json.loads(row))
                time.sleep(self.delay)
            s["recovery"] = json.loads((DATA / "recovery_state.json").read_text())
            process.code = 0

        process.thread = threading.Thread(target=work, daemon=True)
        process.thread.start()
        return process

    def start_bench(self, name: str, cfg):
        """The detached benchmark process: a thread writing stage and metric events into the log, obeying
        the requests as the engine's SessionControl does."""
        s = self._get(name)
        self.calls.append(("bench", name, cfg))
        process = FakeProcess()
        rows = [{"kind": "stage_started", "t": 0, "stage": "PPL stdlib-docs@128 (dense)", "total": 4, "unit": "windows"},
                *({"kind": "stage_progress", "t": 0, "stage": "PPL stdlib-docs@128 (dense)", "done": k, "total": 4}
                  for k in range(1, 5)),
                {"kind": "metric", "t": 0, "name": "ppl:stdlib-docs@128", "value": 24.83, "model": "dense"}]

        key = f"bench:{name}"
        stale = self.requests.get(key)  # asked of an earlier run: not for this one (the engine's since rule)

        def asked() -> str | None:
            req = self.requests.get(key)
            return None if req == stale else req

        def work() -> None:
            for row in rows:
                while asked() == "pause":
                    time.sleep(0.02)
                if asked() == "cancel":
                    process.code = 130
                    return
                s["log"].append(row)
                time.sleep(self.delay)
            process.code = 0

        process.thread = threading.Thread(target=work, daemon=True)
        process.thread.start()
        return process

    def holder(self, name: str, job: str = "search") -> dict | None:
        return {"pid": 4242, "host": "test"} if job != "bench" and self.is_running(name) else None

    def last_error(self, name: str, job: str = "search") -> str | None:
        return "error: the model folder vanished: restore it or start a new session"

    def follow(self, name: str, offset: int, job: str | None = None) -> tuple[list[Event], int]:
        log = self._get(name)["log"]
        return [event_from_dict(dict(r)) for r in log[offset:] if job is None or r.get("job", job) == job], len(log)

    def best_plan(self, name: str):
        best = self._get(name)["plan"]
        return (Plan.from_dict(best["plan"]), BestRecord.from_dict(best)) if best else (None, None)

    def reevaluate(self, name: str, edits, sink: Sink, control: Control) -> dict:
        self.calls.append(("reevaluate", name, dict(edits)))
        from engine.review import edits_to_overrides

        while self.requests.get(f"reevaluate:{name}") == "pause":  # held by a test, as a long measurement is
            time.sleep(0.02)

        self._get(name)["config"]["overrides"] = edits_to_overrides(edits)
        plan = self._get(name)["plan"]["plan"]
        self._get(name)["edited"] = plan
        return {"value": 41.25, "params_after": plan["params_after"], "plan": plan}

    def bench_results(self, name: str) -> dict | None:
        return self._get(name)["bench"]

    def run_bench(self, name: str, cfg, sink: Sink, control: Control) -> dict:
        self.calls.append(("bench", name, cfg))
        return self._get(name)["bench"]

    def plans(self, name: str) -> list:
        from engine.api import PlanChoice

        s = self._get(name)
        if s["plan"] is None:
            return []
        out = [PlanChoice("best", f"best trial {s['plan']['trial']}", Plan.from_dict(s["plan"]["plan"]),
                          s["plan"]["value"])]
        if "edited" in s:
            out.append(PlanChoice("plan:overrides", "your edited plan (plan:overrides)",
                                  Plan.from_dict(s["edited"]), 41.25))
        return out

    def export(self, name: str, out: str, force: bool, widths: str, sink: Sink, control: Control,
               recovered: bool = False, plan: str = "best") -> str:
        self.calls.append(("export", name, out, force, widths, recovered, plan))
        if self.fail_export:
            raise AdapruneError(self.fail_export)
        return "uniform" if widths == "uniform" else "per-layer"

    def recovery_state(self, name: str) -> RecoveryState | None:
        data = self._get(name).get("recovery")
        return None if data is None else RecoveryState.from_dict(data)

    def recover(self, name: str, cfg, resume: bool, restart: bool, sink: Sink, control: Control) -> RecoveryState:
        s = self._get(name)
        self.calls.append(("recover", name, cfg, resume, restart))
        for row in (DATA / "recovery_events.jsonl").read_text().splitlines():
            control.checkpoint()
            sink(event_from_dict(json.loads(row)))
            time.sleep(self.delay)
        s["recovery"] = json.loads((DATA / "recovery_state.json").read_text())
        return RecoveryState.from_dict(s["recovery"])
