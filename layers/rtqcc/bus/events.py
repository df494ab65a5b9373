"""Progress events: appended to the capped stream `job:{externalId}:events` (for replay) and
published on the pub/sub channel of the same name, in one round trip.

The product's own tails (SSE streams, the live-tail hub) read the stream; nothing in it listens
to the channel. The PUBLISH stays anyway: the channel is a contract (DESIGN.md) that outside
subscribers rely on. Each message is `{"id", "type", "data"}` with the id of the stream entry, so
a subscriber can switch to the stream (XREAD after that id) without a gap or a duplicate
(tests/test_events.py shows a subscriber receiving every event with its stream id)."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

from redis import Redis
from redis.exceptions import ResponseError

# Each event: XADD to its job's stream, then PUBLISH with the id XADD chose, so the two never
# disagree; every event of a call in the order given, atomically. KEYS: each event's stream;
# ARGV: the streams' MAXLEN and TTL, then each event's type and data.
_APPEND_AND_PUBLISH = """
local ids = {}
for i, key in ipairs(KEYS) do
  local type, data = ARGV[2 * i + 1], ARGV[2 * i + 2]
  local id = redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], '*', 'type', type, 'data', data)
  redis.call('EXPIRE', key, ARGV[2])
  redis.call('PUBLISH', key, '{"id":"' .. id .. '","type":"' .. type .. '","data":' .. data .. '}')
  ids[i] = id
end
return ids
"""

# ASCII digits only (\d takes any script's), nothing after (`$` lets a newline through), and each
# part within the 64 bits Redis keeps.
_STREAM_ID = re.compile(r"[0-9]{1,20}-[0-9]{1,20}\Z")
_MAX_ID_PART = 2**64 - 1
EVENTS_TTL_S = 7 * 24 * 3600
# The type of an entry that is not an event (not written by us): read as a position alone.
NOT_AN_EVENT = ""

log = logging.getLogger(__name__)


def events_key(external_id: str) -> str:
    return f"job:{external_id}:events"


def is_stream_id(value: str) -> bool:
    return bool(_STREAM_ID.match(value)) and max(stream_id_tuple(value)) <= _MAX_ID_PART


def stream_id_tuple(value: str) -> tuple[int, int]:
    ms, _, seq = value.partition("-")
    return int(ms), int(seq)


@dataclass(frozen=True)
class Event:
    id: str
    type: str
    data: dict[str, Any]


class EventLog:
    def __init__(self, redis: Redis, *, maxlen: int = 10_000):
        self.redis = redis
        self.maxlen = maxlen
        # Sent by its hash (EVALSHA), loaded again only when Redis answers it has not got it (a new or
        # restarted Redis): a script runs whole or not at all, so sending it again repeats nothing.
        self._append_and_publish = redis.register_script(_APPEND_AND_PUBLISH)

    def publish(self, external_id: str, type_: str, data: dict[str, Any]) -> str:
        return self.publish_many(external_id, [(type_, data)])[0]

    def publish_many(self, external_id: str, events: list[tuple[str, dict[str, Any]]]) -> list[str]:
        """Append and publish one job's `events`, in order, in one round trip."""
        return self.publish_across([(external_id, type_, data) for type_, data in events])

    def publish_across(self, events: list[tuple[str, str, dict[str, Any]]]) -> list[str]:
        """Append and publish `(external_id, type, data)` events of any jobs in one round trip
        (one script call, however many events), each job's in the order given; their stream ids."""
        keys = [events_key(external_id) for external_id, _, _ in events]
        args: list[Any] = [self.maxlen, EVENTS_TTL_S]
        for _, type_, data in events:
            args += (type_, json.dumps(data, separators=(",", ":")))
        return list(self._append_and_publish(keys, args))

    def read_after(self, external_id: str, after_id: str, *, block_ms: int | None = None,
                   count: int = 500) -> list[Event]:
        found = self.redis.xread({events_key(external_id): after_id}, count=count, block=block_ms)
        if not found:
            return []
        _, entries = found[0]
        return [_to_event(entry_id, fields) for entry_id, fields in entries]

    def last_id(self, external_id: str) -> str | None:
        last = self.redis.xrevrange(events_key(external_id), count=1)
        return last[0][0] if last else None

    def covers(self, external_id: str, after_id: str) -> bool:
        """True if every event after `after_id` is still in the stream (none trimmed, none lost)."""
        try:
            info = self.redis.xinfo_stream(events_key(external_id))
        except ResponseError:
            return False  # no stream: Redis lost it, or nothing was ever published
        first = info.get("first-entry")
        if first is None:
            return False
        first_id, fields = first
        if stream_id_tuple(after_id) >= stream_id_tuple(first_id):
            return True
        # An earlier id is complete only if nothing was ever before the first entry: the job's
        # own first event is still there (neither trimmed, nor lost with a Redis restart).
        return _is_creation(fields)


def _is_creation(fields: dict[str, str]) -> bool:
    return fields.get("type") == "status" and json.loads(fields.get("data") or "{}").get("status") == "created"


def is_event_entry(fields: dict[str, str]) -> bool:
    """Whether an entry of a job's stream is an event: one we wrote, with a type and its data."""
    return "type" in fields and "data" in fields


def _to_event(entry_id: str, fields: dict[str, str]) -> Event:
    if not is_event_entry(fields):
        # Kept as a position, so a reader moves past it rather than reading it again and again.
        log.warning("stream entry %s is not an event: passed over", entry_id)
        return Event(id=entry_id, type=NOT_AN_EVENT, data={})
    return Event(id=entry_id, type=fields["type"], data=json.loads(fields["data"]))
