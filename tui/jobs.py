"""Engine work off the UI thread: a job runs a backend call in a worker thread and posts its events back.

`post_message` is thread-safe, so the engine never waits for the UI; the screen that started a job receives
`EngineEvent`s while it runs and one `JobDone` at the end (with the error text, never a traceback).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from textual.message import Message
from textual.widget import Widget

from engine.control import Control
from engine.errors import AdapruneError, Cancelled
from engine.events import Event, Sink


class EngineEvent(Message):
    def __init__(self, job: str, event: Event) -> None:
        super().__init__()
        self.job, self.event = job, event


class JobDone(Message):
    def __init__(self, job: str, result: Any = None, error: str | None = None, cancelled: bool = False) -> None:
        super().__init__()
        self.job, self.result, self.error, self.cancelled = job, result, error, cancelled


def start_job(owner: Widget, job: str, fn: Callable[[Sink, Control], Any]) -> Control:
    """Run `fn(sink, control)` in a thread; `owner` gets its events and the JobDone. The app keeps the control
    (for quit-while-running and cancel) until the job ends."""
    control = Control()
    jobs: dict[str, Control] = owner.app.jobs  # type: ignore[attr-defined]
    jobs[job] = control

    def sink(event: Event) -> None:
        owner.post_message(EngineEvent(job, event))

    def work() -> None:
        try:
            result = fn(sink, control)
        except (Cancelled, KeyboardInterrupt):
            done = JobDone(job, cancelled=True)
        except AdapruneError as e:
            done = JobDone(job, error=str(e))
        except Exception as e:  # the app shows it; it must not take the app down
            done = JobDone(job, error=f"{type(e).__name__}: {e}")
        else:
            done = JobDone(job, result)
        jobs.pop(job, None)
        owner.post_message(done)

    # on the app, not the screen: leaving a screen must not orphan the thread that drives the engine
    owner.app.run_worker(work, thread=True, group="engine", name=job, exit_on_error=False)
    return control
