"""The sweeper: Postgres is the truth about which jobs should run; Redis is a fast path that can
lose data (a restart without persistence). This puts back on the queue every job that should be
running and that no consumer can be working on."""

from __future__ import annotations

from dataclasses import dataclass

from ..store.idempotency import IdempotencyStore
from ..services import Services

IDEMPOTENCY_KEEP_S = 24 * 3600
ALIVE_MARKER = "rtqcc:sweeper:alive"


@dataclass(frozen=True)
class SweepResult:
    requeued: list[str]
    queue_was_lost: bool


def sweep(services: Services, *, queued_stale_after_s: float = 600.0) -> SweepResult:
    """Re-enqueue runnable jobs: all of them if the queue itself is gone; otherwise running jobs
    whose lease expired and queued jobs nobody has picked up for `queued_stale_after_s`.
    A job enqueued twice is harmless: the second delivery finds it leased or done."""
    queue = services.queue
    # A marker only the sweeper writes: missing means Redis lost its data since the last sweep
    # (the queue itself cannot tell: a consumer reconnecting recreates it empty).
    lost = bool(services.redis.set(ALIVE_MARKER, "1", nx=True))
    queue.ensure_group()
    requeued = services.jobs.runnable_but_unclaimed(queue_lost=lost, queued_stale_after_s=queued_stale_after_s)
    pipe = services.redis.pipeline(transaction=False)
    for external_id in requeued:
        queue.enqueue(external_id, pipeline=pipe)
    pipe.execute()
    if requeued:
        services.consumer_wakeup.job_queued()
    IdempotencyStore(services.db).forget_older_than(IDEMPOTENCY_KEEP_S)
    return SweepResult(requeued=requeued, queue_was_lost=lost)
