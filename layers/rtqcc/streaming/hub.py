"""Live SSE tails for many clients from one process: one Redis reader per followed job, its
events formatted once and fanned out to every client's queue, on the event loop, with no thread
per client. A job followed by many clients is fanned out at most every 50 ms, each client's
events of the interval in one write: the cost of a fan-out is per write, so thousands of
watchers of per-token events would otherwise cost a write per token each. The gateway serves the stream route's tail from here in streaming mode; opening a
stream (auth, job lookup, snapshot or replay position) still goes through the same code as the
streaming function (`rtqcc.api.access.open_job_stream`).

Redis use is bounded by the pool (`RTQCC_HUB_REDIS_CONNECTIONS`), so no number of clients or
followed jobs can exhaust it: a quarter of it serves short commands (a client's catch-up, a
feed's first look, polls), bounded by a semaphore; the rest are reader slots, one per feed with
followers, for a blocking XREAD. A feed that finds no slot free polls instead under the
short-command bound: later by up to `_POLL_S`, but flowing, whoever holds the slots. A feed keeps
its job's latest events, formatted, so a client that opens (or comes back) at a recent position
catches up from memory: a thousand watchers arriving at once cost no read each.

A gateway that is stopping `drain()`s its hub: every client is told to reconnect (a `retry:`
hint, spread so thousands do not come back in the same instant) and its answer ends after the
last event it was sent; the client resumes from that event's id on whichever gateway answers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from ..bus.events import events_key, stream_id_tuple
from .stream import HEARTBEAT, retry_hint, sse_frame

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 5_000
# A feed whose clients all left ends after this long (a client reconnecting at once still finds
# it). Not longer: a feed resumed after half a minute without clients delivered with p99 100-200
# ms for a while, where a new one (cheap: it starts at its first client's position) stays ~10 ms.
_IDLE_FEED_S = 2.0
_POLL_S = 0.25          # how often a feed without a reader slot looks for new events
_POOL_WAIT_S = 30.0     # the accounting keeps the pool from running dry; should it, wait, don't fail
# A drained client waits a random time in this range (ms) before it reconnects.
DRAIN_RETRY_MS = (250, 2_500)
_DRAIN = object()       # put in a client's queue: end with a reconnect hint
# A feed with this many clients fans out at most once per _BATCH_S, each client's events of the
# interval in one write; with fewer, each read is sent as it comes.
_BATCH_FOLLOWERS = 32
_BATCH_S = 0.05
# What each feed keeps for clients catching up: the last _RECENT_EVENTS events no older than
# _RECENT_S (so a busy job's feed holds at most ~250 KB, a quiet one little).
_RECENT_EVENTS = 1_024
_RECENT_S = 30.0


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
    # The events read so far, newest last, as (id as a tuple, queue item); every event after
    # `complete_after` (an id as a tuple) is among them. None until the feed knows where it starts.
    recent: deque = field(default_factory=lambda: deque(maxlen=_RECENT_EVENTS))
    complete_after: tuple[int, int] | None = None

    def keep(self, key: tuple[int, int], item: tuple) -> None:
        oldest_ms = key[0] - _RECENT_S * 1000
        while self.recent and (len(self.recent) == self.recent.maxlen or self.recent[0][0][0] < oldest_ms):
            self.complete_after = self.recent.popleft()[0]
        self.recent.append((key, item))

    def after(self, position: tuple[int, int]) -> list[tuple] | None:
        """The kept events after `position`, oldest first; None if some may be missing."""
        if self.complete_after is None or position < self.complete_after:
            return None
        found = []
        for key, item in reversed(self.recent):
            if key <= position:
                break
            found.append(item)
        found.reverse()
        return found


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
        self.draining = False

    def drain(self) -> None:
        """Stop serving: every client, now and from here on, ends with a reconnect hint."""
        self.draining = True
        for feed in self._feeds.values():
            for queue in feed.queues:
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
        feed = self._attach(external_id, queue, cursor)
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
            missed = feed.after(stream_id_tuple(cursor))
            if missed is None:  # from further back than the feed keeps: read it
                # The bound is held for the read only, never while a (slow) client is written to.
                async with self._short:
                    read = await self._redis.xrange(feed.key, min=f"({cursor}", max="+")
                missed = [(event_id, _frame(event_id, fields), fields["type"] == "done") for event_id, fields in read]
            if missed:
                catch_up = []
                for event_id, frame, done in missed:
                    catch_up.append(frame)
                    cursor = event_id
                    if done:
                        break
                yield b"".join(catch_up)
                if done:
                    return
            while True:
                try:
                    # A timeout scope, not wait_for: that makes a task per wait, per event per client.
                    async with asyncio.timeout(heartbeat_s):
                        items = [await queue.get()]
                except TimeoutError:
                    final = await ending(cursor)
                    if final:
                        yield final.encode()
                        return
                    yield HEARTBEAT.encode()
                    continue
                while not queue.empty():  # whatever else is already queued goes out in the same write
                    items.append(queue.get_nowait())
                chunk: list[bytes] = []
                for item in _flattened(items):
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

    def _attach(self, external_id: str, queue: asyncio.Queue, cursor: str) -> _Feed:
        feed = self._feeds.get(external_id)
        if feed is None or feed.task is None or feed.task.done():
            feed = _Feed(key=events_key(external_id))
            self._feeds[external_id] = feed
            feed.task = asyncio.get_running_loop().create_task(self._read(external_id, feed, cursor))
        feed.queues.add(queue)
        return feed

    async def _read(self, external_id: str, feed: _Feed, first_cursor: str) -> None:
        loop = asyncio.get_running_loop()
        feed.idle_since = loop.time()
        slotted = False  # holds a reader slot: may block on a connection of its own
        try:
            # Read from the position of the client that asked for this feed: the clients arriving
            # with it (a burst of watchers of one job) then catch up from the feed's memory. A
            # position from longer ago than the feed keeps events for: from the newest entry as of
            # now; clients catch up to it with XRANGE only after this is known, so no event falls
            # between their catch-up and this feed.
            if stream_id_tuple(first_cursor)[0] >= time.time() * 1000 - _RECENT_S * 1000:
                cursor = first_cursor
            else:
                async with self._short:
                    newest = await self._redis.xrevrange(feed.key, count=1)
                cursor = newest[0][0] if newest else "0-0"
            feed.complete_after = stream_id_tuple(cursor)
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
                    batch = []
                    for event_id, fields in entries:
                        item = (event_id, _frame(event_id, fields), fields["type"] == "done")
                        feed.keep(stream_id_tuple(event_id), item)
                        batch.append(item)
                        cursor = event_id
                    for queue in list(feed.queues):
                        queue.put_nowait(batch)
                if len(feed.queues) >= _BATCH_FOLLOWERS:
                    # Many clients: one write each per interval carrying every event it brought,
                    # not one per event (the fan-out's cost is per write, and grows with them).
                    await asyncio.sleep(_BATCH_S)
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


def _flattened(items: list) -> list:
    """A client's queue holds the feed's batches (lists of events) and sentinels (None, _DRAIN):
    their events in order, up to and with the first sentinel."""
    flat: list = []
    for item in items:
        if item is None or item is _DRAIN:
            flat.append(item)
            break
        flat.extend(item)
    return flat
