"""An abort signal that a control message, a budget timer or a lost lease can raise from any
thread, and that closes whatever the provider registered (its HTTP stream) at once."""

from __future__ import annotations

import threading
import time
from typing import Callable


class AbortSignal:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._closers: list[Callable[[], None]] = []
        self.reason: str | None = None
        self.aborted_at: float | None = None  # time.monotonic() when raised, for latency figures

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    def abort(self, reason: str) -> None:
        with self._lock:
            if self._event.is_set():
                return
            self.reason = reason
            self.aborted_at = time.monotonic()
            self._event.set()
            closers, self._closers = self._closers, []
        for close in closers:
            try:
                close()
            except Exception:
                pass  # closing a stream that is already gone is not an error

    def wait(self, timeout_s: float) -> bool:
        """Sleep up to `timeout_s`, waking at once on abort; True if aborted."""
        return self._event.wait(timeout_s)

    def on_abort(self, close: Callable[[], None]) -> Callable[[], None]:
        """Register `close` to run on abort (now, if already aborted); returns an unregister."""
        with self._lock:
            if not self._event.is_set():
                self._closers.append(close)
                return lambda: self._discard(close)
        close()
        return lambda: None

    def _discard(self, close: Callable[[], None]) -> None:
        with self._lock:
            if close in self._closers:
                self._closers.remove(close)
