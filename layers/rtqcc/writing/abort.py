"""An abort signal that a control message, a budget timer or a lost lease can raise from any
thread, and that closes whatever the provider registered (its HTTP stream) at once."""

from __future__ import annotations

import threading
import time
from enum import StrEnum
from typing import Callable


class StopReason(StrEnum):
    """Why a run was stopped (stored as the text of an aborted attempt)."""

    PAUSE = "pause"                      # the tenant paused the job
    CANCEL = "cancel"                    # the tenant cancelled the job
    BUDGET = "budget"                    # the invocation's time is nearly spent: checkpoint, hand back
    SHUTDOWN = "shutdown"                # the consumer process is stopping: checkpoint, hand back
    LEASE_LOST = "lease_lost"            # another consumer holds the job now
    BUDGET_EXCEEDED = "budget_exceeded"  # the job's own token or cost limit: the job pauses itself
    QUOTA_EXCEEDED = "quota_exceeded"    # the tenant's daily quota: the job pauses itself
    STATE_CHANGED = "state_changed"      # paused or cancelled in Postgres before the signal arrived

    @property
    def pauses_the_job_itself(self) -> bool:
        return self in (StopReason.BUDGET_EXCEEDED, StopReason.QUOTA_EXCEEDED)

    @property
    def asked_by_the_tenant(self) -> bool:
        return self in (StopReason.PAUSE, StopReason.CANCEL, StopReason.STATE_CHANGED)


class AbortSignal:
    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._closers: list[Callable[[], None]] = []
        self.reason: StopReason | None = None
        self.aborted_at: float | None = None  # time.monotonic() when raised, for latency figures

    @property
    def aborted(self) -> bool:
        return self._event.is_set()

    def abort(self, reason: StopReason) -> None:
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
