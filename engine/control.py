"""Cancel/pause control the engine checks at safe points (between batches, windows, trials)."""

from __future__ import annotations

import threading

from engine.errors import Cancelled


class Control:
    def __init__(self) -> None:
        self._cancel = threading.Event()
        self._running = threading.Event()
        self._running.set()

    def cancel(self) -> None:
        self._cancel.set()
        self._running.set()  # a paused engine must wake up to notice the cancel

    def pause(self) -> None:
        self._running.clear()

    def resume(self) -> None:
        self._running.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    @property
    def paused(self) -> bool:
        return not self._running.is_set()

    def checkpoint(self) -> None:
        """Block while paused; raise Cancelled if a cancel was requested."""
        self._running.wait()
        if self._cancel.is_set():
            raise Cancelled("cancelled by the user")


