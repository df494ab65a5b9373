"""The local stack's sweeper, on the deployed one's schedule (every 5 minutes: the `Sweeper` rule of
the CloudFormation template, the Kubernetes CronJob, the compose service), and at once when asked:
after the embedded Redis came back empty, every job Postgres says should run goes back on the
queue without waiting for the next tick."""

from __future__ import annotations

import logging
import threading
import time
from typing import Callable

from rtqcc.run.sweeper import SweepResult, sweep
from rtqcc.services import Services

log = logging.getLogger(__name__)

_RETRY_S = 1.0  # a sweep asked for that failed (a part still down) is tried again this soon


class SweepSchedule:
    def __init__(self, services: Services, *, interval_s: float, report: Callable[[str], None]):
        self.services = services
        self.interval_s = interval_s
        self.report = report
        self.sweeps = 0
        self._due: list[float] = [time.monotonic()]  # a first sweep at start: a fresh Redis is empty
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sweeper", daemon=True)

    def start(self) -> "SweepSchedule":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        self._thread.join(30)

    def sweep_soon(self, *, again_after_s: float | None = None) -> None:
        """Sweep now, and once more `again_after_s` later (when the leases of runs cut short by the
        failure have expired, so that those jobs are taken again too)."""
        now = time.monotonic()
        with self._lock:
            self._due.append(now)
            if again_after_s is not None:
                self._due.append(now + again_after_s)
        self._wake.set()

    def _run(self) -> None:
        next_tick = time.monotonic() + self.interval_s
        while not self._stopping.is_set():
            now = time.monotonic()
            with self._lock:
                asked = [due for due in self._due if due <= now]
                self._due = [due for due in self._due if due > now]
            if asked or now >= next_tick:
                if not self._sweep(report=bool(asked)):
                    if asked:
                        with self._lock:
                            self._due.append(now + _RETRY_S)
                if now >= next_tick:
                    next_tick = now + self.interval_s
            with self._lock:
                wake_at = min([next_tick, *self._due])
            self._wake.wait(max(0.0, wake_at - time.monotonic()))
            self._wake.clear()

    def _sweep(self, *, report: bool) -> bool:
        try:
            result: SweepResult = sweep(self.services)
        except Exception as error:  # noqa: BLE001 - a part is down: the next sweep tries again
            log.warning("sweep failed: %s: %s", type(error).__name__, error)
            return False
        self.sweeps += 1
        if result.requeued and (report or result.queue_was_lost):
            lost = " (the queue had been lost)" if result.queue_was_lost else ""
            self.report(f"sweeper: re-enqueued {len(result.requeued)} job(s){lost}")
        return True
