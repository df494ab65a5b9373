"""Live SSE tails for many clients from one process: one Redis reader per followed job, its
events formatted once and fanned out to every client's queue, on the event loop, with no thread
per client. The gateway serves the stream route's tail from here in streaming mode; opening a
stream (auth, job lookup, snapshot or replay position) still goes through the same code as the
streaming function (`rtqcc.api.access.open_job_stream`).

Redis use is bounded by the pool (`RTQCC_HUB_REDIS_CONNECTIONS`), so no number of clients or
followed jobs can exhaust it: a quarter of it serves short commands (a client's catch-up, a
feed's first look, polls), bounded by a semaphore; the rest are reader slots, one per feed with
followers, for a blocking XREAD. A feed that finds no slot free polls instead under the
short-command bound: later by up to `_POLL_S`, but flowing, whoever holds the slots.

A gateway that is stopping `drain()`s its hub: every client is told to reconnect (a `retry:`
hint, spread so thousands do not come back in the same instant) and its answer ends after the
last event it was sent; the client resumes from that event's id on whichever gateway answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..bus.events import events_key, stream_id_tuple
from .stream import HEARTBEAT, retry_hint, sse_frame

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 5_000
_IDLE_FEED_S = 30.0
_POLL_S = 0.25          # how often a feed without a reader slot looks for new events
_POOL_WAIT_S = 30.0     # the accounting keeps the pool from running dry; should it, wait, don't fail
# A drained client waits a random time in this range (ms) before it reconnects.
DRAIN_RETRY_MS = (250, 2_500)
_DRAIN = object()       # put in a client's queue: end with a reconnect hint


def _frame(event_id: str, fields: dict[str, str]) -> bytes:
    return sse_frame(event_id, fields["type"], fields["data"]).encode()


@dataclass
class _Feed:
    """The one reader of a job's event stream, and the queues of the clients following it."""

    key: str
    queues: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once it knows where it reads from
    idle_since: float = 0.0


class EventHub:
    def __init__(self, redis_url: str, *, max_connections: int = 200):
        if max_connections < 2:
            raise ValueError("the event hub needs at least 2 Redis connections")
        # A command on a pooled connection that Redis closed (it restarted) reconnects and is sent
        # again, instead of ending the stream of the client it was for.
        self._pool = aioredis.BlockingConnectionPool.from_url(
            redis_url, max_connections=max_connections, timeout=_POOL_WAIT_S, decode_responses=True,
            socket_timeout=60, socket_connect_timeout=3, retry=Retry(ExponentialBackoff(cap=1.0, base=0.05), 2))
        self._redis = aioredis.Redis(connection_pool=self._pool)
        short = max(1, max_connections // 4)
        self._short = asyncio.Semaphore(short)
        self._free_reader_slots = max_connections - short  # one event loop: a plain counter is safe
        self._feeds: dict[str, _Feed] = {}
        self._queues: set[asyncio.Queue] = set()  # every client's, so a drain reaches those still opening
        self.draining = False

    def drain(self) -> None:
        """Stop serving: every client, now and from here on, ends with a reconnect hint."""
        self.draining = True
        for queue in self._queues:
            queue.put_nowait(_DRAIN)

    async def close(self) -> None:
        for feed in list(self._feeds.values()):
            if feed.task:
                feed.task.cancel()
        await self._redis.aclose()
        await self._pool.disconnect()

    async def follow(self, external_id: str, cursor: str, *, heartbeat_s: float,
                     ending: Callable[[str], Awaitable[str | None]]) -> AsyncIterator[bytes]:
        """Every event after `cursor` until `done`; heartbeats while idle; `ending(cursor)` is
        asked on idle whether the job finished without a `done` we saw (events lost)."""
        if self.draining:
            yield _reconnect_hint()
            return
        queue: asyncio.Queue = asyncio.Queue()
        self._queues.add(queue)
        feed = self._attach(external_id, queue)
        try:
            while not feed.ready.is_set():
                try:
                    await asyncio.wait_for(feed.ready.wait(), heartbeat_s)
                except asyncio.TimeoutError:
                    yield HEARTBEAT.encode()
                if self.draining:
                    yield _reconnect_hint()
                    return
            # Attached first, then caught up: anything published meanwhile is in one or the other.
            # The bound is held for the read only, never while a (slow) client is written to.
            async with self._short:
                missed = await self._redis.xrange(feed.key, min=f"({cursor}", max="+")
            for event_id, fields in missed:
                yield _frame(event_id, fields)
                cursor = event_id
                if fields["type"] == "done":
                    return
            while True:
                try:
                    items = [await asyncio.wait_for(queue.get(), heartbeat_s)]
                except asyncio.TimeoutError:
                    final = await ending(cursor)
                    if final:
                        yield final.encode()
                        return
                    yield HEARTBEAT.encode()
                    continue
                while not queue.empty():  # whatever else is already queued goes out in the same write
                    items.append(queue.get_nowait())
                chunk: list[bytes] = []
                for item in items:
                    if item is None:  # the feed stopped: end here; the client resumes from its last id
                        break
                    if item is _DRAIN:
                        chunk.append(_reconnect_hint())
                        break
                    event_id, frame, done = item
                    if stream_id_tuple(event_id) <= stream_id_tuple(cursor):
                        continue  # already sent during the catch-up
                    chunk.append(frame)
                    cursor = event_id
                    if done:
                        break
                else:
                    if chunk:
                        yield b"".join(chunk)
                    continue
                if chunk:
                    yield b"".join(chunk)
                return
        finally:
            feed.queues.discard(queue)
            self._queues.discard(queue)

    def _attach(self, external_id: str, queue: asyncio.Queue) -> _Feed:
        feed = self._feeds.get(external_id)
        if feed is None or feed.task is None or feed.task.done():
            feed = _Feed(key=events_key(external_id))
            self._feeds[external_id] = feed
            feed.task = asyncio.get_running_loop().create_task(self._read(external_id, feed))
        feed.queues.add(queue)
        return feed

    async def _read(self, external_id: str, feed: _Feed) -> None:
        loop = asyncio.get_running_loop()
        feed.idle_since = loop.time()
        slotted = False  # holds a reader slot: may block on a connection of its own
        try:
            # Read from the newest entry as of now; clients catch up to it with XRANGE only after
            # this is known, so no event falls between their catch-up and this feed.
            async with self._short:
                newest = await self._redis.xrevrange(feed.key, count=1)
            cursor = newest[0][0] if newest else "0-0"
            feed.ready.set()
            while True:
                if not feed.queues:
                    if slotted:  # nobody to read for: let a feed with followers have the slot
                        self._free_reader_slots += 1
                        slotted = False
                    if loop.time() - feed.idle_since > _IDLE_FEED_S:
                        return
                    # A client that comes back catches up from its own position: nothing is lost.
                    await asyncio.sleep(_POLL_S)
                    continue
                feed.idle_since = loop.time()
                if not slotted and self._free_reader_slots > 0:
                    self._free_reader_slots -= 1
                    slotted = True
                try:
                    if slotted:
                        found = await self._redis.xread({feed.key: cursor}, count=500, block=_READ_BLOCK_MS)
                    else:
                        async with self._short:
                            found = await self._redis.xread({feed.key: cursor}, count=500)
                        if not found:
                            await asyncio.sleep(_POLL_S)
                except (OSError, aioredis.RedisError) as exc:
                    log.warning("event feed of %s interrupted: %s", external_id, exc)
                    await asyncio.sleep(1.0)
                    continue
                for _, entries in found or []:
                    for event_id, fields in entries:
                        item = (event_id, _frame(event_id, fields), fields["type"] == "done")
                        for queue in list(feed.queues):
                            queue.put_nowait(item)
                        cursor = event_id
        finally:
            if slotted:
                self._free_reader_slots += 1
            with contextlib.suppress(KeyError):
                if self._feeds[external_id] is feed:
                    del self._feeds[external_id]
            feed.ready.set()
            for queue in list(feed.queues):
                queue.put_nowait(None)


def _reconnect_hint() -> bytes:
    return retry_hint(random.randint(*DRAIN_RETRY_MS)).encode()
