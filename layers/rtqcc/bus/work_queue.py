"""The work queue: Redis stream `jobs:pending`, consumer group `orchestrators`.

Delivery is at least once. A message is acknowledged only after its job is finished, handed
back to the queue, or found to need nothing; so a crash at any point duplicates, never loses."""

from __future__ import annotations

from dataclasses import dataclass, field

from redis import Redis
from redis.exceptions import ResponseError

from .. import tracing

STREAM = "jobs:pending"
GROUP = "orchestrators"
DEAD_LETTERS = "jobs:dead"
# Jobs of a tenant at its running cap wait aside, off the stream, in a sorted set per tenant
# (priority, then age); WAITING_TENANTS holds the tenants with waiting jobs, by when one of their
# jobs was last put back on the stream (the oldest first: round robin).
WAITING_TENANTS = "jobs:waiting"


def waiting_key(tenant: str) -> str:
    return f"jobs:waiting:{tenant}"


# Put up to ARGV[1] of a tenant's waiting jobs back on the stream, best first, in one step.
_PROMOTE = """
local popped = redis.call('ZPOPMIN', KEYS[1], ARGV[1])
for i = 1, #popped, 2 do redis.call('XADD', KEYS[2], '*', 'externalId', popped[i]) end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[3], ARGV[2])
elseif #popped > 0 then
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[2])
end
return #popped / 2
"""

# Take one job out of its tenant's waiting jobs; the tenant leaves the waiting tenants with its last.
_WITHDRAW = """
local removed = redis.call('ZREM', KEYS[1], ARGV[1])
if redis.call('ZCARD', KEYS[1]) == 0 then redis.call('ZREM', KEYS[2], ARGV[2]) end
return removed
"""


@dataclass(frozen=True)
class Delivery:
    message_id: str
    external_id: str
    reclaimed: bool = False  # taken over from a consumer that went quiet (see claim_stale)
    # The W3C trace context of the request that queued the job (`traceparent`), when traced.
    trace: dict[str, str] = field(default_factory=dict)


class WorkQueue:
    def __init__(self, redis: Redis, *, stream: str = STREAM, group: str = GROUP):
        self.redis = redis
        self.stream = stream
        self.group = group
        self._promote = redis.register_script(_PROMOTE)
        self._withdraw = redis.register_script(_WITHDRAW)

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def enqueue(self, external_id: str, *, pipeline=None) -> str | None:
        """Queue a job, with the trace context in force (the request's) so its run joins that trace."""
        return (pipeline or self.redis).xadd(self.stream, {"externalId": external_id, **tracing.carrier()})

    def read(self, consumer: str, *, count: int, block_ms: int) -> list[Delivery]:
        try:
            found = self.redis.xreadgroup(self.group, consumer, {self.stream: ">"}, count=count,
                                          block=block_ms or None)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            # Redis lost the stream (a restart without persistence): recreate and carry on.
            self.ensure_group()
            return []
        return [_delivery(entry_id, fields) for _, entries in found or [] for entry_id, fields in entries]

    def claim_stale(self, consumer: str, *, min_idle_ms: int, count: int) -> list[Delivery]:
        """Take over messages whose consumer went quiet for `min_idle_ms` (crashed, most likely)."""
        try:
            _, claimed, *_ = self.redis.xautoclaim(self.stream, self.group, consumer, min_idle_ms,
                                                   start_id="0-0", count=count)
        except ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            self.ensure_group()
            return []
        deliveries = []
        for entry_id, fields in claimed:
            if fields is None:  # the entry was trimmed or deleted while pending
                self.ack(entry_id)
                continue
            deliveries.append(_delivery(entry_id, fields, reclaimed=True))
        return deliveries

    def unread(self, limit: int) -> int:
        """How many messages no consumer has read yet, counted up to `limit`. (Not the group's
        `lag`: Redis 7.0 keeps counting an entry deleted from the stream, a job's, for ever.)"""
        try:
            group = next((g for g in self.redis.xinfo_groups(self.stream) if g["name"] == self.group), None)
        except ResponseError:  # no stream yet
            return 0
        # Without the group, consumers create it at the stream's start: all of it is unread.
        after = "-" if group is None else "(" + group["last-delivered-id"]
        return len(self.redis.xrange(self.stream, min=after, max="+", count=limit))

    def touch(self, consumer: str, message_ids: list[str]) -> None:
        """Reset the idle time of messages being worked on, so a healthy long job is not claimed
        by another consumer: one command for all of a consumer's messages."""
        if message_ids:
            self.redis.xclaim(self.stream, self.group, consumer, 0, message_ids, justid=True)

    def ack(self, message_id: str) -> None:
        self.redis.xack(self.stream, self.group, message_id)

    def dead_letter_then_ack(self, external_id: str, message_id: str, reason: str) -> None:
        """Park poison work where an operator can see it, and take it off the queue."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(DEAD_LETTERS, {"externalId": external_id, "reason": reason, "messageId": message_id},
                  maxlen=100_000, approximate=True)
        pipe.xack(self.stream, self.group, message_id)
        pipe.execute()

    def park_then_ack(self, tenant: str, external_id: str, message_id: str, *, rank: int, created_ms: int,
                      now_ms: int) -> None:
        """Set a job aside until its tenant has a free running slot, and take its message off the
        stream, in one transaction. Parking a job twice keeps one entry (a set member)."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.zadd(waiting_key(tenant), {external_id: rank * 10**13 + created_ms})
        pipe.zadd(WAITING_TENANTS, {tenant: now_ms}, nx=True)
        pipe.xack(self.stream, self.group, message_id)
        pipe.execute()

    def promote(self, tenant: str, count: int, *, now_ms: int) -> int:
        """Put up to `count` of the tenant's waiting jobs back on the stream; how many moved."""
        if count <= 0:
            return 0
        return int(self._promote([waiting_key(tenant), self.stream, WAITING_TENANTS], [count, tenant, now_ms]))

    def withdraw(self, tenant: str, external_id: str) -> bool:
        """Take a job that stopped being queued (cancelled, paused) out of its tenant's waiting
        jobs, so that it neither counts in the places of the jobs behind it nor takes the next
        free slot's promotion from them. Whether it was waiting."""
        return bool(self._withdraw([waiting_key(tenant), WAITING_TENANTS], [external_id, tenant]))

    def waiting_tenants(self) -> list[str]:
        """Tenants with jobs set aside, the longest unserved first."""
        return self.redis.zrange(WAITING_TENANTS, 0, -1)

    def waiting_position(self, tenant: str, external_id: str) -> int | None:
        """1 for the tenant's next job to run, None when the job is not waiting aside."""
        rank = self.redis.zrank(waiting_key(tenant), external_id)
        return None if rank is None else rank + 1

    def forget(self, tenant: str, external_id: str, *, page: int = 1000) -> int:
        """Take a deleted job off every queue: its place waiting aside, and the entries naming it on
        the stream and among the dead letters (both capped, so the scan is bounded). A pending entry
        deleted here is acknowledged by whoever claims it (claim_stale). How many were removed."""
        removed = int(self.withdraw(tenant, external_id))
        for stream in (self.stream, DEAD_LETTERS):
            start = "-"
            while True:
                entries = self.redis.xrange(stream, min=start, max="+", count=page)
                naming = [entry_id for entry_id, fields in entries if fields.get("externalId") == external_id]
                if naming:
                    removed += int(self.redis.xdel(stream, *naming))
                if len(entries) < page:
                    break
                start = "(" + entries[-1][0]
        return removed

    def requeue_then_ack(self, external_id: str, message_id: str, *, trace: dict[str, str] | None = None) -> None:
        """Hand unfinished work back (with the trace it belongs to). The new entry is written
        before the old one is acknowledged, in one transaction, so neither a crash nor a lost
        reply loses the job."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.stream, {"externalId": external_id, **(trace or {})})
        pipe.xack(self.stream, self.group, message_id)
        pipe.execute()


def _delivery(entry_id: str, fields: dict[str, str], *, reclaimed: bool = False) -> Delivery:
    trace = {tracing.TRACEPARENT: fields[tracing.TRACEPARENT]} if tracing.TRACEPARENT in fields else {}
    return Delivery(message_id=entry_id, external_id=fields.get("externalId", ""), reclaimed=reclaimed, trace=trace)
