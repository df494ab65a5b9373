"""Server-Sent Events for one job: a snapshot from Postgres, then the live tail of
`job:{externalId}:events`, resumable from any `Last-Event-ID` the stream still covers.

Two ways to serve it. `frames()` is a generator for a streaming gateway: events flow as they
happen, with heartbeats while idle, until `done`. `long_poll()` is for a buffering gateway
(API Gateway REST): it answers once at least one event is ready or the poll time passes, with a
`retry:` hint, and the client's reconnect continues exactly where this answer stopped."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Iterator

from ..errors import BadRequest
from ..bus.events import NOT_AN_EVENT, Event, EventLog, is_stream_id, stream_id_tuple
from ..store.jobs import Job, JobStore
from ..status import JobStatus
from .slots import REFRESH_S, StreamSlot
from ..store.views import job_document

HEARTBEAT = ": keep-alive\n\n"
# The `done` of a job deleted while it was followed (DELETE /jobs/{id}): the contract's statuses
# are completed, failed and cancelled, so a deletion ends it as cancelled, its code saying why.
DELETED_DONE = {"status": "cancelled", "code": "job_deleted"}


def sse_frame(event_id: str, event_type: str, data_json: str) -> str:
    """One SSE event: the only place a frame is built. `data_json` is compact JSON, which has no
    newline, so it is one `data:` line as it is (events are stored that way)."""
    return f"id: {event_id}\nevent: {event_type}\ndata: {data_json}\n\n"


def position_frame(event_id: str) -> str:
    """An id and no event, for a stream entry that is not one: SSE dispatches nothing for a frame
    without data, yet the client's Last-Event-ID moves past the entry."""
    return f"id: {event_id}\n\n"


def format_event(event_id: str, event_type: str, data: dict) -> str:
    return sse_frame(event_id, event_type, json.dumps(data, separators=(",", ":")))


def retry_hint(retry_ms: int) -> str:
    """What every answer of a stream starts with: how long a client waits before reconnecting."""
    return f"retry: {retry_ms}\n\n"


def parse_last_event_id(value: str | None) -> str | None:
    if value is None or value.strip(" \t") == "":
        return None
    value = value.strip(" \t")  # HTTP's optional whitespace; a newline is no part of an id
    if not is_stream_id(value):
        raise BadRequest(f"Last-Event-ID {value!r} is not an event id from this stream (expected like 1700000000000-0).")
    return value


@dataclass
class LongPollAnswer:
    status: int  # 200, or 204 when the client has already seen the end
    body: str


class JobEventStream:
    """One client's stream of one job. It holds the client's stream slot (if given) until
    `close()`; whoever serves it calls `touch()` at least every `slot_refresh_s` while it is open."""

    slot_refresh_s = REFRESH_S

    def __init__(self, events: EventLog, jobs: JobStore, job: Job, last_event_id: str | None,
                 *, slot: StreamSlot | None = None):
        self.events = events
        self.jobs = jobs
        self.job = job
        self.ext = job.external_id
        self.last_event_id = last_event_id
        self.slot = slot

    def touch(self) -> None:
        if self.slot is not None:
            self.slot.refresh()

    def close(self) -> None:
        if self.slot is not None:
            self.slot.release()

    def seen_the_end(self) -> bool:
        """The client's Last-Event-ID is at the end of a finished job: nothing more will come."""
        if self.last_event_id is None or not self.job.status.terminal:
            return False
        return self.events.covers(self.ext, self.last_event_id) and not self.events.read_after(
            self.ext, self.last_event_id, count=1)

    def frames(self, *, heartbeat_s: float) -> Iterator[str]:
        try:
            yield from self._frames(heartbeat_s)
        finally:
            self.close()

    def _frames(self, heartbeat_s: float) -> Iterator[str]:
        touched = time.monotonic()
        cursor, opening, finished = self.opening()
        yield from opening
        if finished:
            return
        block_ms: int | None = None  # first look without waiting: a finished job ends at once
        while True:
            batch = self.events.read_after(self.ext, cursor, block_ms=block_ms)
            block_ms = int(min(heartbeat_s, self.slot_refresh_s) * 1000)
            if time.monotonic() - touched >= self.slot_refresh_s:
                self.touch()
                touched = time.monotonic()
            if batch:
                for event in batch:
                    yield _frame(event)
                    cursor = event.id
                    if event.type == "done":
                        return
                continue
            ending = self.synthetic_done(cursor)
            if ending:
                yield ending
                return
            yield HEARTBEAT

    def long_poll(self, *, wait_s: float, retry_ms: int) -> LongPollAnswer:
        try:
            return self._long_poll(wait_s, retry_ms)
        finally:
            self.close()

    def _long_poll(self, wait_s: float, retry_ms: int) -> LongPollAnswer:
        if self.seen_the_end():
            return LongPollAnswer(status=204, body="")
        parts = [retry_hint(retry_ms)]
        cursor, opening, finished = self.opening()
        parts.extend(opening)
        if not finished:
            batch = self.events.read_after(self.ext, cursor, block_ms=None if opening else int(wait_s * 1000))
            for event in batch:
                parts.append(_frame(event))
                if event.type == "done":
                    break
            if not batch:
                parts.append(self.synthetic_done(cursor) or HEARTBEAT)
        return LongPollAnswer(status=200, body="".join(parts))

    def opening(self) -> tuple[str, list[str], bool]:
        """Where to read from, what to send first, and whether that already ends the stream."""
        if self.last_event_id is not None and self.events.covers(self.ext, self.last_event_id):
            return self.last_event_id, [], False
        # A new client, or one whose position was trimmed or lost with Redis: start from the truth.
        cursor = self.events.last_id(self.ext) or "0-0"
        # Redis's new stream may not yet reach the position of a client whose stream Redis lost:
        # its snapshot then keeps that position, so the ids a client sees never go back.
        shown = max(cursor, self.last_event_id or cursor, key=stream_id_tuple)
        job = self.jobs.get_by_external_id(self.ext)
        if _deleted(job):  # deleted since the stream was opened: what it was, and the end
            return cursor, [format_event(shown, "snapshot", job_document(self.jobs, self.job)),
                            format_event(shown, "done", DELETED_DONE)], True
        opening = [format_event(shown, "snapshot", job_document(self.jobs, job))]
        if job.status.terminal:
            opening.append(format_event(shown, "done", _done_data(job)))
            return cursor, opening, True
        return cursor, opening, False

    def synthetic_done(self, cursor: str) -> str | None:
        """The `done` a client idle at `cursor` has not seen though the job has ended: its `done`
        was lost with Redis, or the job was deleted (its events purged with it). None: it goes on."""
        job = self.jobs.get_by_external_id(self.ext)
        if _deleted(job):
            return format_event(cursor, "done", DELETED_DONE)
        if job.status.terminal:
            return format_event(cursor, "done", _done_data(job))
        return None


def _deleted(job: Job | None) -> bool:
    """The followed job is gone, or going (marked `deleting`: hidden from the API at once)."""
    return job is None or job.status == JobStatus.DELETING


def _frame(event: Event) -> str:
    if event.type == NOT_AN_EVENT:
        return position_frame(event.id)
    return format_event(event.id, event.type, event.data)


def _done_data(job: Job) -> dict:
    data: dict = {"status": job.status.value}
    if job.status == JobStatus.FAILED and job.error:
        data["error"] = job.error
        if job.status_reason:
            data["code"] = job.status_reason
    return data
