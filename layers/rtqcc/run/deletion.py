"""Deleting a job for good (`DELETE /jobs/{id}`, `rtqcc prune`): its rows, its objects and its
Redis keys, in an order a crash may interrupt anywhere.

1. Postgres marks it `deleting` (store/deletion.py: mark): gone from the API at once, and a
   consumer running it is fenced off; a cancel command makes that consumer abort its provider
   stream within milliseconds, as a cancel does. Its `done` event (cancelled, code `job_deleted`)
   ends the streams that follow it at once; one that misses it (its events are purged next) gets
   the same `done` from Postgres when it next goes idle (streaming/stream.py's synthetic_done).
2. Once no consumer can still write it (its lease was free, or has expired since), its Redis keys
   and queue entries go, then its objects in S3 (but those another job still names: a fork shares
   its source's sections; and a fork's borrowed objects go with it once their own job is gone),
   then its rows, last, with its usage kept for billing without it.

Until step 2 ends the row stays `deleting`, so a repeated DELETE or the next prune finishes it.
Nothing is undone: a job marked `deleting` never comes back."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..bus.control import ControlCommand, send_control
from ..bus.events import events_key
from ..errors import JobNotFound
from ..services import Services
from ..status import JobStatus
from ..store.blobs import job_of_key, job_prefix
from ..store.deletion import Doomed, JobDeletions
from ..streaming.stream import DELETED_DONE
from ..writing.provider_waits import provider_waits_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Deletion:
    external_id: str
    done: bool  # everything is gone; False: it waits `deleting` for its consumer to let go


def delete_job(s: Services, tenant: str, external_id: str) -> Deletion:
    """Delete one of the tenant's jobs (JobNotFound when it has none of that id)."""
    doomed = JobDeletions(s.db).mark(tenant, external_id)
    if doomed is None:
        raise JobNotFound(f"No job {external_id} exists for this API key.")
    if doomed.was != JobStatus.DELETING:
        try:  # wakes the live tails blocked on its event stream, before the stream is purged
            s.events.publish(external_id, "done", DELETED_DONE)
        except Exception as exc:  # they find the same end in Postgres on their next heartbeat
            log.warning("no done event for deleted job %s: %s", external_id, exc)
    if doomed.was == JobStatus.RUNNING:
        try:
            send_control(s.redis, external_id, ControlCommand.CANCEL)
        except Exception as exc:  # the consumer's renewal notices the lost lease instead
            log.warning("no cancel command for deleted job %s: %s", external_id, exc)
    if not doomed.consumer_gone:
        log.info("job %s marked for deletion; its consumer is still stopping", external_id)
        return Deletion(external_id, done=False)
    purge(s, doomed)
    return Deletion(external_id, done=True)


def purge(s: Services, doomed: Doomed) -> None:
    """Steps of 2 above, for a job marked `deleting` that no consumer can write any more."""
    deletions = JobDeletions(s.db)
    s.queue.forget(doomed.tenant, doomed.external_id)
    s.redis.delete(events_key(doomed.external_id), provider_waits_key(doomed.external_id))
    own = s.blobs.keys_under(job_prefix(doomed.external_id))
    borrowed = [key for key in deletions.keys_named(doomed.id) if job_of_key(key) != doomed.external_id]
    owners_left = deletions.existing(sorted({job_of_key(key) for key in borrowed}))
    candidates = own + [key for key in borrowed if job_of_key(key) not in owners_left]
    shared = deletions.keys_used_by_others(doomed.id, candidates)
    s.blobs.delete([key for key in candidates if key not in shared])
    deletions.remove(doomed.id)
    log.info("job %s deleted (%d objects, %d kept for the jobs that share them)", doomed.external_id,
             len(candidates) - len(shared), len(shared))


@dataclass
class PruneResult:
    deleted: int = 0
    waiting: int = 0  # marked, their consumer still stopping: the next prune finishes them
    failed: list[str] = field(default_factory=list)


def prune(s: Services, *, limit: int) -> PruneResult:
    """Delete up to `limit` jobs: half-done deletions first, then finished jobs past their tenant's
    retention. One job's failure (S3 away) leaves it `deleting` for the next run, not the others."""
    result = PruneResult()
    for tenant, external_id in JobDeletions(s.db).due(default_days=s.settings.retention_days, limit=limit):
        try:
            deletion = delete_job(s, tenant, external_id)
        except JobNotFound:  # deleted meanwhile by its tenant
            continue
        except Exception as exc:
            log.warning("could not delete job %s: %s", external_id, exc)
            result.failed.append(external_id)
            continue
        if deletion.done:
            result.deleted += 1
        else:
            result.waiting += 1
    return result
