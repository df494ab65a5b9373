"""The work queue: Redis stream `jobs:pending`, consumer group `orchestrators`.

Delivery is at least once. A message is acknowledged only after its job is finished, handed
back to the queue, or found to need nothing; so a crash at any point duplicates, never loses."""

from __future__ import annotations

from dataclasses import dataclass

from redis import Redis
from redis.exceptions import ResponseError

STREAM = "jobs:pending"
GROUP = "orchestrators"
DEAD_LETTERS = "jobs:dead"


@dataclass(frozen=True)
class Delivery:
    message_id: str
    external_id: str
    reclaimed: bool = False  # taken over from a consumer that went quiet (see claim_stale)


class WorkQueue:
    def __init__(self, redis: Redis, *, stream: str = STREAM, group: str = GROUP):
        self.redis = redis
        self.stream = stream
        self.group = group

    def ensure_group(self) -> None:
        try:
            self.redis.xgroup_create(self.stream, self.group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def enqueue(self, external_id: str, *, pipeline=None) -> str | None:
        return (pipeline or self.redis).xadd(self.stream, {"externalId": external_id})

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

    def requeue_then_ack(self, external_id: str, message_id: str) -> None:
        """Hand unfinished work back. The new entry is written before the old one is acknowledged,
        in one transaction, so neither a crash nor a lost reply loses the job."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.xadd(self.stream, {"externalId": external_id})
        pipe.xack(self.stream, self.group, message_id)
        pipe.execute()


def _delivery(entry_id: str, fields: dict[str, str], *, reclaimed: bool = False) -> Delivery:
    return Delivery(message_id=entry_id, external_id=fields.get("externalId", ""), reclaimed=reclaimed)
