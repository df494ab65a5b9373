"""The consumer function: one invocation drains `jobs:pending` in timed batches until its budget
is nearly spent, then checkpoints and returns a small result."""

from __future__ import annotations

import logging
import os
import queue as queue_module
import socket
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from typing import Callable


from ..writing.abort import AbortSignal, StopReason
from .. import tracing
from ..errors import LeaseLost, ProviderError, StreamCut
from .failures import OUTAGE_ERRORS, describe_failure, gave_up
from .failpoints import Failpoints
from ..ids import is_external_id
from ..bus.consumer_wakeup import KICK_INTERVAL_MS, ConsumerWakeup
from ..bus.events import stream_id_tuple
from ..store.checkpoints import ConsumerCheckpoints
from .busy import BusyRuns
from .lease_keeper import LeaseKeeper
from ..store.jobs import Job, Lease
from ..store.leases import TenantAtCapacity
from ..logs import configure_logging, log_context
from ..metrics import MeasuredProvider, ModelLabels
from .orchestrator import ManuscriptOrchestrator, RunOutcome
from .webhook_sender import SenderThread, WebhookSender
from ..writing.quotas import QuotaStore
from ..writing.tokens import tokenizer_for
from ..services import Services
from ..status import JobStatus
from ..bus.work_queue import Delivery

log = logging.getLogger(__name__)

# Failures of a service that will come back: the consumer waits them out instead of crashing.
TRANSIENT_ERRORS = (*OUTAGE_ERRORS, OSError)
# With runs in flight, a read of the queue blocks at most this long, so that slots runs free
# meanwhile are asked for soon after (a read returns at once when messages are waiting).
IN_FLIGHT_READ_BLOCK_MS = 200
# With every slot busy, how often a consumer looks whether jobs wait unread (bus/consumer_wakeup.py).
FULL_RECHECK_S = KICK_INTERVAL_MS / 1000


@dataclass
class DrainResult:
    processed: int = 0   # messages taken to an end and acknowledged
    completed: int = 0   # jobs that finished in this invocation
    requeued: int = 0    # jobs handed back unfinished (budget spent, stream cut, transient error)
    stopped: int = 0     # jobs stopped by pause or cancel
    failed: int = 0
    skipped: int = 0     # messages that needed nothing (finished job, duplicate, someone else's lease)
    parked: int = 0      # jobs set aside: their tenant ran as many as its cap allows
    returned: int = 0    # messages read as the budget ran out, put back on the queue untouched
    sections_written: int = 0
    webhook_attempts: int = 0  # webhook deliveries sent (or refused) by this invocation's sender
    last_id: str | None = None

    def as_dict(self) -> dict:
        return asdict(self)

    def add(self, other: "DrainResult", message_id: str) -> None:
        """Count one message's outcome in; `last_id` is the furthest position handled (a stale
        message claimed after newer ones is older)."""
        for counter in fields(self):
            if counter.name != "last_id":
                setattr(self, counter.name, getattr(self, counter.name) + getattr(other, counter.name))
        if self.last_id is None or stream_id_tuple(message_id) > stream_id_tuple(self.last_id):
            self.last_id = message_id


class TimeBudget:
    """A Lambda-like context for invocations outside Lambda: its remaining time runs down from
    `budget_s` (scheduled invocations in the emulator, container loops, tests, benchmarks)."""

    def __init__(self, budget_s: float, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self._deadline = clock() + budget_s
        self.aws_request_id = f"local-{int(time.time() * 1000)}"

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - self._clock()) * 1000))


def _now_ms() -> int:
    return int(time.time() * 1000)


def default_consumer_name() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class Consumer:
    """Runs up to `max_in_flight` jobs at once, each on a worker thread of its own (generation is
    waiting on a token stream; pg8000, redis-py and the provider's HTTP client are blocking), with
    one lease keeper thread for all of them. A new message is read whenever a slot is free."""

    def __init__(self, services: Services, *, name: str | None = None, clock: Callable[[], float] = time.monotonic,
                 failpoints: Failpoints | None = None):
        self.services = services
        self.settings = services.settings
        self.name = name or default_consumer_name()
        self.clock = clock
        # Tests may pass their own (one that holds a run at a point instead of killing it).
        self.failpoints = failpoints or Failpoints(self.settings.crash_at)
        self._shutting_down = threading.Event()
        self._keeper: LeaseKeeper | None = None
        self._webhooks: SenderThread | None = None
        self.metrics = services.metrics
        self.busy = BusyRuns(self.settings.consumer_busy_runs)
        self.orchestrator = ManuscriptOrchestrator(
            jobs=services.jobs, blobs=services.blobs, events=services.events,
            provider=MeasuredProvider(services.provider, self.metrics,
                                      model_label=ModelLabels(services.settings)),
            delta_flush_ms=self.settings.delta_flush_ms,
            failpoints=self.failpoints,
            prices=self.settings.prices,
            quotas=QuotaStore(services.db, self.settings),
            busy=self.busy,
            waits=services.provider_waits,
        )

    @property
    def shutting_down(self) -> bool:
        return self._shutting_down.is_set()

    def shut_down(self) -> None:
        """Stop soon, from any thread (a signal handler): every running job is checkpointed and
        handed back, and the drain returns."""
        self._shutting_down.set()
        keeper = self._keeper
        if keeper is not None:
            keeper.stop_all(StopReason.SHUTDOWN)

    def drain(self, remaining_ms: Callable[[], int]) -> DrainResult:
        """Work until the budget reported by `remaining_ms` (a Lambda context's
        get_remaining_time_in_millis) is nearly spent, or the queue stays empty."""
        settings = self.settings
        deadline = self.clock() + (remaining_ms() - settings.consumer_safety_margin_ms) / 1000
        result = DrainResult()
        keeper = LeaseKeeper(
            redis=self.services.redis, jobs=self.services.jobs, queue=self.services.queue, consumer=self.name,
            lease_ttl_s=settings.lease_ttl_s, poll_s=settings.control_poll_s, deadline=deadline, clock=self.clock,
        )
        self._keeper = keeper
        if self._shutting_down.is_set():
            keeper.stop_all(StopReason.SHUTDOWN)
        # Webhooks go out from here, beside the runs that write them, within the same budget.
        self._webhooks = SenderThread(WebhookSender(self.services.webhooks, settings, clock=self.clock), deadline)
        try:
            with keeper, ThreadPoolExecutor(settings.max_in_flight, thread_name_prefix=f"run-{self.name}") as runs:
                self._dispatch(runs, keeper, deadline, result)
        finally:
            self._keeper = None
            result.webhook_attempts = self._webhooks.finish()
            self.metrics.flush()
        try:
            self._checkpoint(result)
        except TRANSIENT_ERRORS as exc:
            log.warning("could not checkpoint the consumer's counters: %s", exc)
        return result

    def _dispatch(self, runs: ThreadPoolExecutor, keeper: LeaseKeeper, deadline: float, result: DrainResult) -> None:
        """Read messages into free slots until the budget is spent or the queue stays empty, then
        wait for the runs (the keeper stops them at the deadline; they checkpoint and hand back)."""
        settings, queue = self.settings, self.services.queue
        in_flight: dict[Future, Delivery] = {}
        # Runs announce their end here: waiting on hundreds of futures at once (concurrent.futures.wait)
        # costs a lock and a waiter on each, every time.
        finished: queue_module.SimpleQueue[Future] = queue_module.SimpleQueue()
        idle_since = self.clock()
        next_claim = 0.0
        backoff_s = 0.0
        group_ready = False

        def settle_finished(block_s: float | None = 0.0) -> None:
            """Count in every run that has ended, waiting up to `block_s` (None: for ever) for one."""
            if not in_flight:
                return
            try:
                future = finished.get(timeout=block_s)
            except queue_module.Empty:
                return
            while True:
                delivery = in_flight.pop(future)
                result.add(future.result(), delivery.message_id)
                self._webhooks.sender.wake()  # the run may have written deliveries
                try:
                    future = finished.get_nowait()
                except queue_module.Empty:
                    return

        def start(batch: list[Delivery]) -> None:
            if batch:
                # The first count of a process builds its model's BPE tables (then cached): about
                # 0.4 s, 0.2 s of it in one call that holds the GIL. Before any run starts it stalls
                # no stream and no pause or cancel of this process, as it would in the middle of them.
                tokenizer_for(settings.default_model)
            for delivery in batch:
                if self.clock() >= deadline or self._shutting_down.is_set():
                    # Untouched: hand it straight back rather than strand it in our pending list.
                    queue.requeue_then_ack(delivery.external_id, delivery.message_id, trace=delivery.trace)
                    result.add(DrainResult(returned=1), delivery.message_id)
                else:
                    future = runs.submit(self.handle, delivery, keeper)
                    in_flight[future] = delivery
                    future.add_done_callback(finished.put)

        while (left_ms := int((deadline - self.clock()) * 1000)) > 0 and not self._shutting_down.is_set():
            settle_finished()
            free = settings.max_in_flight - len(in_flight)
            if free == 0:  # every slot busy: wait for a run to end (the keeper ends them by the deadline)
                # Meanwhile, jobs waiting unread ask for another consumer invocation (where there are such).
                self.services.consumer_wakeup.slots_full(self.name, settings.max_in_flight, queue.unread)
                settle_finished(max(0.0, min(deadline - self.clock(), FULL_RECHECK_S)))
                continue
            batch: list[Delivery] = []
            try:
                if not group_ready:  # at start, and after an outage: Redis may have lost the group
                    queue.ensure_group()
                    group_ready = True
                if self.clock() >= next_claim:
                    # Messages of consumers that died are taken over once their lease has expired,
                    # and jobs waiting aside whose tenant has a free slot go back on the stream
                    # (their promotion was lost with a crash, or raced with their parking).
                    self._promote_waiting()
                    start(queue.claim_stale(self.name, min_idle_ms=int(settings.lease_ttl_s * 1000), count=free))
                    next_claim = self.clock() + settings.lease_ttl_s / 2
                    backoff_s = 0.0
                    continue
                wait_ms = min(left_ms, int((next_claim - self.clock()) * 1000) + 1)
                if in_flight:  # runs ending meanwhile free slots this read does not ask for
                    wait_ms = min(wait_ms, IN_FLIGHT_READ_BLOCK_MS)
                block_ms = max(1, min(wait_ms, settings.consumer_idle_exit_ms or wait_ms))
                self.services.consumer_wakeup.listening(self.name, block_ms)
                batch = queue.read(self.name, count=min(free, settings.consumer_read_batch), block_ms=block_ms)
                # Unhandled entries of a batch cut short stay pending, and are reclaimed.
                start(batch)
                backoff_s = 0.0
            except TRANSIENT_ERRORS as exc:
                # Redis, Postgres or S3 is away: wait, doubling up to a limit, within the budget.
                backoff_s = min(max(backoff_s * 2, 0.2), 5.0)
                group_ready = False
                log.warning("a service is unavailable, retrying in %.1f s: %s", backoff_s, exc)
                self._shutting_down.wait(min(backoff_s, max(0.0, deadline - self.clock())))
                continue
            if batch or in_flight:
                idle_since = self.clock()
            elif settings.consumer_idle_exit_ms and (self.clock() - idle_since) * 1000 >= settings.consumer_idle_exit_ms:
                if not self._last_look(start):
                    break
                idle_since = self.clock()
        self._stop_listening()
        while in_flight:
            settle_finished(None)

    def _last_look(self, start: Callable[[list[Delivery]], None]) -> bool:
        """Before an idle exit: stop listening, then take what was queued since the last read (its
        API call saw us listening and asked for no invocation). Whether anything was."""
        self._stop_listening()
        try:
            batch = self.services.queue.read(self.name, block_ms=0,  # no run in flight: every slot is free
                                             count=min(self.settings.max_in_flight, self.settings.consumer_read_batch))
        except TRANSIENT_ERRORS as exc:  # the schedule takes what came
            log.warning("could not look at the queue once more before stopping: %s", exc)
            return False
        start(batch)
        return bool(batch)

    def _stop_listening(self) -> None:
        try:
            self.services.consumer_wakeup.stopped_listening(self.name)
        except TRANSIENT_ERRORS as exc:
            log.warning("could not say this consumer stopped reading the queue (the mark lapses): %s", exc)

    def handle(self, delivery: Delivery, keeper: LeaseKeeper) -> DrainResult:
        """Take one message to an end; what happened, as counts."""
        result = DrainResult()
        with log_context(externalId=delivery.external_id, consumer=self.name), self.busy.busy():
            try:
                self._handle(delivery, keeper, result)
            except TRANSIENT_ERRORS as exc:
                # Before a lease (or while giving it back): the message stays pending and is
                # claimed again once idle for a lease's length.
                log.warning("job %s left pending, a service is unavailable: %s", delivery.external_id, exc)
        return result

    def _handle(self, delivery: Delivery, keeper: LeaseKeeper, result: DrainResult) -> None:
        queue, jobs, external_id = self.services.queue, self.services.jobs, delivery.external_id
        abort = AbortSignal()
        with keeper.watching(external_id, abort) as watched:
            try:
                job, lease = (jobs.take_for_run(external_id, self.name, self.settings.lease_ttl_s,
                                                self.settings.running_cap if self.settings.caps_running else None)
                              if is_external_id(external_id) else (None, None))
            except TenantAtCapacity as full:
                # Its tenant's slots are taken: it waits aside, by priority, off the stream, and
                # comes back when one of the tenant's runs ends (see _promote_waiting).
                queue.park_then_ack(full.job.tenant, external_id, delivery.message_id, rank=full.job.priority.rank,
                                    created_ms=int(full.job.created_at.timestamp() * 1000), now_ms=_now_ms())
                result.parked += 1
                result.processed += 1
                return
            if job is None or job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                queue.ack(delivery.message_id)  # nothing to run: a finished job, or a duplicate
                result.skipped += 1
                result.processed += 1
                return
            if lease is None and delivery.reclaimed and job.status == JobStatus.RUNNING:
                # Claimed from a consumer that went quiet, but its lease has not expired yet: this
                # may be that consumer's own message, the job's only one. Leave it pending; it is
                # claimed again later, by when the lease has expired (or the job has moved on).
                result.skipped += 1
                return
            if lease is None:
                # Another consumer holds a live lease and its own message stays pending until it
                # finishes or hands the job back: this duplicate can go.
                queue.ack(delivery.message_id)
                result.skipped += 1
                result.processed += 1
                return
            if lease.failures >= self.settings.consumer_max_deliveries:
                failure = gave_up(lease.failures, lease.last_error)
                log.error("job %s is poison: %s", job.external_id, failure.message)
                self.orchestrator.fail(job, lease, failure)
                queue.dead_letter_then_ack(job.external_id, delivery.message_id, failure.message)
                result.failed += 1
                result.processed += 1
                return
            watched.hold(lease, delivery.message_id)
            if lease.first_run and job.created_at is not None:
                self.metrics.observe("queue_wait_seconds", max(0.0, time.time() - job.created_at.timestamp()),
                                     tenant=job.tenant)
            # The message's wait, from the time in its stream id (when it was queued) to now.
            tracing.record_span("job.queue_wait", start_ns=stream_id_tuple(delivery.message_id)[0] * 1_000_000,
                                end_ns=time.time_ns(), parent=delivery.trace,
                                attributes={"rtqcc.job.external_id": job.external_id})
            try:
                with tracing.span("job.run", kind="consumer", parent=delivery.trace, attributes={
                        "rtqcc.job.external_id": job.external_id, "rtqcc.consumer": self.name,
                        "messaging.system": "redis", "messaging.destination.name": self.services.queue.stream,
                        "messaging.message.id": delivery.message_id}):
                    self._run(job, lease, abort, delivery, result)
            finally:
                if self.settings.running_cap(job.tier):
                    self._promote(job.tenant, 1)  # the slot this run held is free: the tenant's next may go

    def _run(self, job: Job, lease: Lease, abort: AbortSignal, delivery: Delivery, result: DrainResult) -> None:
        queue = self.services.queue
        try:
            outcome = self.orchestrator.run(job, lease, abort)
        except ProviderError as exc:
            log.warning("job %s failed: %s", job.external_id, exc)
            self.orchestrator.fail(job, lease, describe_failure(exc))
            queue.ack(delivery.message_id)
            result.failed += 1
            result.processed += 1
            return
        except LeaseLost:
            queue.ack(delivery.message_id)
            result.skipped += 1
            result.processed += 1
            return
        except Exception as exc:
            # Hand the job back; its checkpoints stand. A service outage is waited out without
            # counting against the job; anything else (a cut stream, a bug) counts toward poison.
            outage = isinstance(exc, OUTAGE_ERRORS)
            level = logging.INFO if isinstance(exc, StreamCut) else logging.WARNING if outage else logging.ERROR
            log.log(level, "job %s interrupted, retried later: %s", job.external_id, exc,
                    exc_info=level == logging.ERROR)
            self._hand_back(job, lease, delivery, result, error=describe_failure(exc).message, failed=not outage)
            return
        self._settle(job, lease, delivery, outcome, result)

    def _promote(self, tenant: str, count: int) -> None:
        try:
            self.services.queue.promote(tenant, count, now_ms=_now_ms())
        except TRANSIENT_ERRORS as exc:  # the next promotion round puts it back
            log.warning("could not put a waiting job of %s back on the queue: %s", tenant, exc)

    def _promote_waiting(self) -> None:
        """Every tenant with jobs waiting aside gets as many back on the stream as it has free
        slots, the longest unserved tenant first."""
        tenants = self.services.queue.waiting_tenants()
        if not tenants:
            return
        # Each waiting job's own cap is checked when it takes its lease: promote up to the widest.
        cap = self.settings.widest_running_cap
        running = self.services.jobs.running_counts(tenants)
        for tenant in tenants:
            self._promote(tenant, (cap - running[tenant]) if cap else self.settings.max_in_flight)

    def _settle(self, job: Job, lease: Lease, delivery: Delivery, outcome: RunOutcome, result: DrainResult) -> None:
        queue, jobs = self.services.queue, self.services.jobs
        result.sections_written += outcome.sections_written
        if outcome.status == JobStatus.COMPLETED:
            log.info("job completed", extra={"sections_written": outcome.sections_written})
            self.failpoints.hit("before_ack")
            queue.ack(delivery.message_id)
            result.completed += 1
            result.processed += 1
        elif outcome.status == JobStatus.AWAITING_REVIEW:  # its outline waits for the writer; the lease is gone
            queue.ack(delivery.message_id)
            result.stopped += 1
            result.processed += 1
        elif outcome.stopped_by is not None and (outcome.stopped_by.asked_by_the_tenant
                                                 or outcome.stopped_by.pauses_the_job_itself):
            # A budget or quota: the orchestrator has paused the job itself and let the lease go.
            status_after = jobs.release_lease(lease)
            if status_after == JobStatus.QUEUED:  # resumed while we were stopping: run it again
                queue.requeue_then_ack(job.external_id, delivery.message_id, trace=delivery.trace)
            else:
                queue.ack(delivery.message_id)
            result.stopped += 1
            result.processed += 1
        elif outcome.stopped_by == StopReason.LEASE_LOST:
            queue.ack(delivery.message_id)
            result.skipped += 1
            result.processed += 1
        else:  # budget spent or shutting down: continue in a later invocation
            self._hand_back(job, lease, delivery, result)

    def _hand_back(self, job: Job, lease: Lease, delivery: Delivery, result: DrainResult,
                   error: str | None = None, failed: bool = False) -> None:
        """Give an unfinished job back. After progress (budget spent, shutting down) it goes
        straight back on the queue; after an error its message stays pending, so it is retried
        only when another consumer claims it, a lease's length later: a backoff, not a hot loop."""
        try:
            self.services.jobs.release_lease(lease, requeue=True, error=error, failed=failed)
        except Exception as exc:  # the lease expires by itself; the message is still pending
            log.warning("could not release the lease of %s: %s", job.external_id, exc)
            return
        if error is None:
            self.services.queue.requeue_then_ack(job.external_id, delivery.message_id, trace=delivery.trace)
        result.requeued += 1
        result.processed += 1

    def _checkpoint(self, result: DrainResult) -> None:
        ConsumerCheckpoints(self.services.db).record(self.name, last_id=result.last_id, processed=result.processed,
                                                     requeued=result.requeued, failed=result.failed)


def lambda_handler(services_factory: Callable[[], Services]) -> Callable[[dict, object], dict]:
    """Build a Lambda entry point whose consumer (and clients) live as long as the container.
    With every slot busy and jobs waiting, the consumer asks for another invocation of its own
    function (the context names it)."""
    consumer: Consumer | None = None

    def handler(event: dict, context: object) -> dict:
        nonlocal consumer
        if consumer is None:
            configure_logging()
            services = services_factory()
            function = getattr(context, "function_name", None)
            if function:
                services.consumer_wakeup = ConsumerWakeup.for_function(services.redis, function,
                                                                       services.settings.s3_region)
            consumer = Consumer(services)
            tracing.configure(consumer.settings.tracing)
        started = time.monotonic()
        with log_context(requestId=getattr(context, "aws_request_id", None)):
            result = consumer.drain(context.get_remaining_time_in_millis)
        tracing.flush()  # before Lambda freezes the container with the spans still buffered
        summary = {**result.as_dict(), "consumer": consumer.name, "elapsed_ms": int((time.monotonic() - started) * 1000)}
        log.info("drain finished %s", summary)
        return summary

    return handler
