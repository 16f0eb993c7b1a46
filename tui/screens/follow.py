"""What the Search, Benchmarks and Recover screens share: controlling an engine job that runs in a detached process
of its own (it outlives the app and the SSH connection) through the session's requests file, and following it
through the session's events log, with p and c for it."""

from __future__ import annotations

from textual.widgets import Static

from engine.errors import AdapruneError
from tui.widgets import hold_eta


class Remote:
    """Pause, resume and cancel for a search running in another process: requests in the session folder,
    which every process working on it obeys at its next safe point (and acknowledges in the events log)."""

    def __init__(self, backend, name: str, job: str = "search") -> None:
        self.backend, self.name, self.job = backend, name, job

    @property
    def paused(self) -> bool:
        return self.backend.paused(self.name, self.job)

    def pause(self) -> None:
        self.backend.request(self.name, "pause", self.job)

    def resume(self) -> None:
        self.backend.request(self.name, "resume", self.job)

    def cancel(self) -> None:
        self.backend.request(self.name, "cancel", self.job)


class JobControls:
    """Mixin for a Screen that controls a job through `control` (None when nothing runs here): pause and
    cancel show in the footer only while it is set."""

    _control = None

    @property
    def control(self):
        return self._control

    @control.setter
    def control(self, value) -> None:
        self._control = value
        if self.is_mounted:
            self.refresh_bindings()

    IDLE_NOTE = "nothing runs here"  # what p and c say when nothing runs (their hidden "idle" bindings)

    def check_action(self, action: str, parameters: tuple) -> bool | None:
        # offered only while the job runs here; p pauses, or resumes once paused (the footer says which)
        if action == "idle":
            return self.control is None
        if action == "cancel":
            return self.control is not None
        if action in ("pause", "resume"):
            return self.control is not None and self.control.paused == (action == "resume")
        return True

    def action_resume(self) -> None:
        self.action_pause()  # toggles: the binding shown says which way

    def action_idle(self) -> None:
        self.notify(self.IDLE_NOTE, severity="warning")


class FollowsProcess(JobControls):
    """Mixin for a Screen. Subclasses set JOB (the backend's job name), WHAT (the job in words), LOCK_WHAT (the
    `what` of the session lock the job holds, or None for any holder of the job's lock) and PAUSE_NOTE, and
    define apply(event), attached() and ended()."""

    JOB = ""
    WHAT = ""
    LOCK_WHAT: str | None = None
    PAUSE_NOTE = "pausing at the next safe point (p resumes)"
    CANCEL_NOTE = "stopping at the next safe point…"

    process = None  # the process this app started, when it did
    log_offset = 0

    def running(self) -> bool:
        """A process works on the job: the one this app started, or any holding its lock."""
        if self.process is not None and self.process.poll() is None:
            return True
        try:
            holder = self.app.backend.holder(self.session_name, self.JOB)
        except AdapruneError:
            return False
        return holder is not None and (self.LOCK_WHAT is None or holder.get("what") == self.LOCK_WHAT)

    def poll(self) -> None:
        if self.running():
            if self.control is None:  # started here, or found running: from now on p and c reach it
                self.control = Remote(self.app.backend, self.session_name, self.JOB)
                self.attached()
            try:
                events, self.log_offset = self.app.backend.follow(self.session_name, self.log_offset, self.JOB)
            except AdapruneError:
                events = []
            for e in events:
                self.apply(e)
        elif self.control is not None:
            self.control = None
            self.ended()
        hold_eta(self, self.control)

    def attached(self) -> None:
        """Called when this screen starts following a running process."""

    def say(self, text: str) -> None:
        self.query_one("#status", Static).update(text)

    def action_pause(self) -> None:
        if self.control is None:
            self.notify(f"no {self.WHAT} is running here", severity="warning")
        elif self.control.paused:
            self.control.resume()
            self.say("resuming")
        else:
            self.control.pause()
            self.say(self.PAUSE_NOTE)
        self.refresh_bindings()

    def action_cancel(self) -> None:
        if self.control is None:
            self.notify(f"no {self.WHAT} is running here", severity="warning")
            return
        self.control.cancel()
        self.say(self.CANCEL_NOTE)
