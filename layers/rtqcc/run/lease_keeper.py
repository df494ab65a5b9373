"""While a consumer runs its jobs, one thread beside them all keeps the runs honest: it hears
pause and cancel for any of them within milliseconds (one subscription for the process), polls
Postgres as a fallback (a command lost with Redis) while renewing every lease in one statement,
keeps their queue messages from being claimed by another consumer (one command), and ends the
runs when the invocation's budget is spent. Its cost does not grow with the jobs in flight:
one thread, one Redis connection, one statement a poll."""

from __future__ import annotations

import logging
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

from redis import Redis

from ..bus.control import ControlCommand, ControlListener
from ..bus.work_queue import WorkQueue
from ..status import JobStatus
from ..store.jobs import JobStore, Lease
from ..writing.abort import AbortSignal, StopReason

log = logging.getLogger(__name__)

_STOPPING_STATES = {JobStatus.PAUSED: StopReason.PAUSE, JobStatus.CANCELLED: StopReason.CANCEL}
_COMMANDS = {ControlCommand.PAUSE: StopReason.PAUSE, ControlCommand.CANCEL: StopReason.CANCEL}


@dataclass
class WatchedRun:
    """One run the keeper looks after: its abort signal from the start, its lease and queue
    message once taken."""

    external_id: str
    abort: AbortSignal
    lease: Lease | None = None
    message_id: str | None = None

    def hold(self, lease: Lease, message_id: str) -> None:
        self.message_id = message_id
        self.lease = lease


class LeaseKeeper:
    def __init__(self, *, redis: Redis, jobs: JobStore, queue: WorkQueue, consumer: str, lease_ttl_s: float,
                 poll_s: float, deadline: float, clock=time.monotonic):
        self._jobs = jobs
        self._queue = queue
        self._consumer = consumer
        self._ttl_s = lease_ttl_s
        self._poll_s = poll_s
        self._deadline = deadline
        self._clock = clock
        self._lock = threading.Lock()
        self._runs: dict[str, WatchedRun] = {}
        self._stopped = threading.Event()
        self._ending: StopReason | None = None  # set once every run must stop (budget, shutdown)
        self._control = ControlListener(redis, consumer)
        self._thread = threading.Thread(target=self._keep, name=f"lease-keeper-{consumer}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._control.__enter__()  # before any lease is taken: no command can come unheard (Redis up)
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stopped.set()
        try:  # wake the keeper now rather than at its next poll
            self._control.wake()
        except Exception:
            pass
        self._thread.join(timeout=self._poll_s + 5)
        self._control.__exit__(*exc_info)

    @contextmanager
    def watching(self, external_id: str, abort: AbortSignal) -> Iterator[WatchedRun]:
        """Look after one run from before its lease is taken (so a pause sent right after the
        lease is heard) until the block ends; `hold()` the lease once taken."""
        run = WatchedRun(external_id, abort)
        with self._lock:
            self._runs[external_id] = run
            ending = self._ending
        if ending is not None:
            abort.abort(ending)
        try:
            yield run
        finally:
            with self._lock:
                if self._runs.get(external_id) is run:
                    del self._runs[external_id]

    def stop_all(self, reason: StopReason) -> None:
        """Stop every run, and every run that starts from now on (from any thread)."""
        with self._lock:
            self._ending = self._ending or reason
            runs = list(self._runs.values())
        for run in runs:
            run.abort.abort(reason)

    def _keep(self) -> None:
        next_poll = self._clock() + self._poll_s
        next_touch = self._clock() + self._ttl_s / 3
        while not self._stopped.is_set():
            now = self._clock()
            if now >= self._deadline and self._ending is None:
                self.stop_all(StopReason.BUDGET)
            if now >= next_poll:
                self._renew_leases()
                next_poll = now + self._poll_s
            if now >= next_touch:
                self._touch_messages()
                next_touch = now + self._ttl_s / 3
            wake_at = min(next_poll, next_touch, self._deadline if self._ending is None else next_poll)
            wait = max(0.0, wake_at - self._clock())
            try:
                if not self._control.listen():
                    raise ConnectionError("could not subscribe")
                heard = self._control.wait(wait)
            except Exception as exc:  # Redis gone: Postgres polling still works
                log.warning("the control channel is unavailable: %s", exc)
                self._stopped.wait(wait)
                continue
            if heard is not None and heard[1] in _COMMANDS:
                with self._lock:
                    run = self._runs.get(heard[0])
                if run is not None:
                    run.abort.abort(_COMMANDS[heard[1]])

    def _held(self) -> list[WatchedRun]:
        with self._lock:
            return [run for run in self._runs.values() if run.lease is not None]

    def _renew_leases(self) -> None:
        runs = self._held()
        try:
            statuses = self._jobs.renew_leases([run.lease for run in runs], self._ttl_s)
        except Exception as exc:
            log.warning("could not renew %d lease(s): %s", len(runs), exc)
            return
        for run in runs:
            status = statuses.get(run.lease.job_id)
            if status is None:
                run.abort.abort(StopReason.LEASE_LOST)
            elif status in _STOPPING_STATES:
                run.abort.abort(_STOPPING_STATES[status])

    def _touch_messages(self) -> None:
        message_ids = [run.message_id for run in self._held()]
        try:
            self._queue.touch(self._consumer, message_ids)
        except Exception as exc:
            log.warning("could not touch %d message(s): %s", len(message_ids), exc)
