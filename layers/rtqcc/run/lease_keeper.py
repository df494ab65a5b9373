"""While a consumer runs a job, one thread beside it keeps the run honest: it hears pause and
cancel on the job's control channel within milliseconds, polls Postgres as a fallback (a signal
sent before we subscribed, or lost with Redis), renews the lease, keeps the queue message from
being claimed by another consumer, and ends the run when the invocation's budget is spent."""

from __future__ import annotations

import logging
import threading
import time

from redis import Redis

from ..bus.control import ControlCommand, ControlListener
from ..bus.work_queue import WorkQueue
from ..status import JobStatus
from ..store.jobs import JobStore, Lease
from ..writing.abort import AbortSignal, StopReason

log = logging.getLogger(__name__)

_STOPPING_STATES = {JobStatus.PAUSED: StopReason.PAUSE, JobStatus.CANCELLED: StopReason.CANCEL}
_COMMANDS = {ControlCommand.PAUSE: StopReason.PAUSE, ControlCommand.CANCEL: StopReason.CANCEL}


class LeaseKeeper:
    def __init__(self, *, redis: Redis, jobs: JobStore, queue: WorkQueue, lease: Lease, message_id: str,
                 consumer: str, abort: AbortSignal, lease_ttl_s: float, poll_s: float, deadline: float,
                 clock=time.monotonic):
        self._jobs = jobs
        self._queue = queue
        self._lease = lease
        self._message_id = message_id
        self._consumer = consumer
        self._abort = abort
        self._ttl_s = lease_ttl_s
        self._poll_s = poll_s
        self._deadline = deadline
        self._clock = clock
        self._stopped = threading.Event()
        self._control = ControlListener(redis, lease.external_id)
        self._thread = threading.Thread(target=self._keep, name=f"lease-{lease.external_id}", daemon=True)

    def __enter__(self) -> "LeaseKeeper":
        self._control.__enter__()
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

    def _keep(self) -> None:
        next_poll = 0.0  # poll at once: a pause may have come before we subscribed
        next_touch = self._clock() + self._ttl_s / 3
        while not self._stopped.is_set() and not self._abort.aborted:
            now = self._clock()
            if now >= self._deadline:
                self._abort.abort(StopReason.BUDGET)
                return
            if now >= next_poll:
                self._poll_postgres()
                next_poll = now + self._poll_s
            if now >= next_touch:
                self._touch_message()
                next_touch = now + self._ttl_s / 3
            wait = max(0.0, min(next_poll, self._deadline) - self._clock())
            try:
                command = self._control.wait(wait)
            except Exception as exc:  # Redis gone: Postgres polling still works
                log.warning("control channel of %s unavailable: %s", self._lease.external_id, exc)
                self._stopped.wait(wait)
                continue
            if command in _COMMANDS:
                self._abort.abort(_COMMANDS[command])

    def _poll_postgres(self) -> None:
        try:
            status = self._jobs.renew_lease(self._lease, self._ttl_s)
        except Exception as exc:
            log.warning("could not renew the lease of %s: %s", self._lease.external_id, exc)
            return
        if status is None:
            self._abort.abort(StopReason.LEASE_LOST)
        elif status in _STOPPING_STATES:
            self._abort.abort(_STOPPING_STATES[status])

    def _touch_message(self) -> None:
        try:
            self._queue.touch(self._consumer, self._message_id)
        except Exception as exc:
            log.warning("could not touch message %s: %s", self._message_id, exc)
