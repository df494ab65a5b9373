"""Live SSE tails for many clients from one process: every followed job's events read by a few
multiplexed readers (one blocking XREAD over up to 128 jobs' streams each), formatted once and
fanned out to every client's queue, on the event loop, with no thread per client. A job followed by many clients is fanned out at most every 50 ms, each client's
events of the interval in one write: the cost of a fan-out is per write, so thousands of
watchers of per-token events would otherwise cost a write per token each. The gateway serves the stream route's tail from here in streaming mode; opening a
stream (auth, job lookup, snapshot or replay position) still goes through the same code as the
streaming function (`rtqcc.api.access.open_job_stream`).

Why multiplexed: a reader per job made a round trip per event per job (4,000 events a second
from 200 jobs at 50 tokens/s are 4,000 round trips), and its pool held a connection per job;
past the pool's reader slots, jobs were polled every 250 ms. One XREAD over many streams
returns whatever all of them got since the last one, so the round trips fall as the load grows.
A reader blocked on its set of streams is woken (CLIENT UNBLOCK) when a job joins it.

Redis use is bounded by the pool (`RTQCC_HUB_REDIS_CONNECTIONS`): a quarter of it serves short
commands (a client's catch-up, a feed's first look, a reader's wake-up), bounded by a semaphore;
the rest can be readers. A feed keeps its job's latest events, formatted, so a client that opens
(or comes back) at a recent position catches up from memory: a thousand watchers arriving at once
cost no read each.

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

from ..bus.events import events_key, is_event_entry, stream_id_tuple
from .stream import HEARTBEAT, retry_hint, sse_frame

log = logging.getLogger(__name__)

# A reader's blocking read returns after this long at the latest. Only a backstop: a reader is
# woken as soon as a feed joins it.
_READ_BLOCK_MS = 1_000
_KEYS_PER_READER = 128
# A feed whose clients all left ends after this long (a client reconnecting at once still finds
# it). Not longer: a feed resumed after half a minute without clients delivered with p99 100-200
# ms for a while, where a new one (cheap: it starts at its first client's position) stays ~10 ms.
_IDLE_FEED_S = 2.0
_POOL_WAIT_S = 30.0     # the accounting keeps the pool from running dry; should it, wait, don't fail
# A drained client waits a random time in this range (ms) before it reconnects.
DRAIN_RETRY_MS = (250, 2_500)
_DRAIN = object()       # put in a client's queue: end with a reconnect hint
# A feed with this many clients fans out at most once per _BATCH_S, each client's events of the
# interval in one write; with fewer, each read is passed on as it comes.
_BATCH_FOLLOWERS = 32
_BATCH_S = 0.05
# What each feed keeps for clients catching up: the last _RECENT_EVENTS events no older than
# _RECENT_S (so a busy job's feed holds at most ~250 KB, a quiet one little).
_RECENT_EVENTS = 1_024
_RECENT_S = 30.0


def _item(event_id: str, fields: dict[str, str]) -> tuple[str, bytes, bool] | None:
    """An event as the hub passes it on (id, SSE frame, whether it is `done`); None for an entry
    that is not an event (not written by us), which no client is sent."""
    if not is_event_entry(fields):
        log.warning("skipped stream entry %s: not an event", event_id)
        return None
    return event_id, sse_frame(event_id, fields["type"], fields["data"]).encode(), fields["type"] == "done"


@dataclass
class _Feed:
    """A followed job: where its events have been read to, what was read, and the queues of the
    clients following it."""

    key: str
    queues: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None  # its life: a first look, then ended once idle
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once it knows where it reads from
    cursor: str = "0-0"   # the last event read
    # The events read so far, newest last, as (id as a tuple, queue item); every event after
    # `complete_after` (an id as a tuple) is among them. None until the feed knows where it starts.
    recent: deque = field(default_factory=lambda: deque(maxlen=_RECENT_EVENTS))
    complete_after: tuple[int, int] | None = None
    held: list = field(default_factory=list)  # read, waiting for the next batched fan-out
    batching: bool = False                     # a batched fan-out is scheduled

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

    def deliver(self, batch: list[tuple]) -> None:
        """Pass events read to every client; with many clients, once per _BATCH_S (the cost of a
        fan-out is per write, and grows with them), in order either way."""
        if len(self.queues) < _BATCH_FOLLOWERS and not self.batching:
            for queue in list(self.queues):
                queue.put_nowait(batch)
            return
        self.held.extend(batch)
        if not self.batching:
            self.batching = True
            asyncio.get_running_loop().call_later(_BATCH_S, self._fan_out_held)

    def _fan_out_held(self) -> None:
        self.batching = False
        held, self.held = self.held, []
        for queue in list(self.queues):
            queue.put_nowait(held)


@dataclass(eq=False)
class _Reader:
    """One connection's blocking XREAD over the streams of up to _KEYS_PER_READER feeds."""

    feeds: dict[str, _Feed] = field(default_factory=dict)  # by stream key
    task: asyncio.Task | None = None
    client_id: int | None = None  # its connection's, for CLIENT UNBLOCK
    blocked: bool = False         # in a blocking read
    joined: int = 0               # feeds that joined, ever
    reading_with: int = 0         # `joined` when the current read's streams were listed
    waking: bool = False

    async def on_connect(self, connection) -> None:
        """Its connection made again: redis-py reconnects under a command and sends it once more,
        so the read goes on with a new client id, which the wakes must use."""
        await connection.send_command("CLIENT", "ID")
        self.client_id = int(await connection.read_response())


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
        self._max_readers = max_connections - short
        self._readers: list[_Reader] = []
        self._feeds: dict[str, _Feed] = {}
        self.draining = False

    def drain(self) -> None:
        """Stop serving: every client, now and from here on, ends with a reconnect hint."""
        self.draining = True
        for feed in self._feeds.values():
            for queue in feed.queues:
                queue.put_nowait(_DRAIN)

    async def close(self) -> None:
        for task in [feed.task for feed in self._feeds.values()] + [reader.task for reader in self._readers]:
            if task:
                task.cancel()
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
                missed = [item for item in (_item(event_id, fields) for event_id, fields in read) if item]
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
            feed.task = asyncio.get_running_loop().create_task(self._follow_job(external_id, feed, cursor))
        feed.queues.add(queue)
        return feed

    async def _follow_job(self, external_id: str, feed: _Feed, first_cursor: str) -> None:
        """A feed's life: where it starts, a reader's, and its end once its clients are gone."""
        loop = asyncio.get_running_loop()
        try:
            # Read from the position of the client that asked for this feed: the clients arriving
            # with it (a burst of watchers of one job) then catch up from the feed's memory. A
            # position from longer ago than the feed keeps events for: from the newest entry as of
            # now; clients catch up to it with XRANGE only after this is known, so no event falls
            # between their catch-up and this feed.
            if stream_id_tuple(first_cursor)[0] >= time.time() * 1000 - _RECENT_S * 1000:
                feed.cursor = first_cursor
            else:
                async with self._short:
                    newest = await self._redis.xrevrange(feed.key, count=1)
                feed.cursor = newest[0][0] if newest else "0-0"
            feed.complete_after = stream_id_tuple(feed.cursor)
            feed.ready.set()
            self._join_reader(feed)
            idle_since = loop.time()
            while True:
                await asyncio.sleep(_IDLE_FEED_S / 2)
                if feed.queues:
                    idle_since = loop.time()
                elif loop.time() - idle_since >= _IDLE_FEED_S:
                    return  # a client that comes back catches up from its own position: nothing is lost
        finally:
            for reader in self._readers:
                if reader.feeds.get(feed.key) is feed:
                    del reader.feeds[feed.key]
            with contextlib.suppress(KeyError):
                if self._feeds[external_id] is feed:
                    del self._feeds[external_id]
            feed.ready.set()
            for queue in list(feed.queues):
                queue.put_nowait(None)

    def _join_reader(self, feed: _Feed) -> None:
        reader = next((r for r in self._readers if len(r.feeds) < _KEYS_PER_READER), None)
        if reader is None and len(self._readers) < self._max_readers:
            reader = _Reader()
            self._readers.append(reader)
            reader.task = asyncio.get_running_loop().create_task(self._read(reader))
        elif reader is None:  # every connection a reader may have is one: share the least busy
            reader = min(self._readers, key=lambda r: len(r.feeds))
        reader.feeds[feed.key] = feed
        reader.joined += 1
        if reader.blocked and not reader.waking:
            reader.waking = True
            asyncio.get_running_loop().create_task(self._wake(reader))

    async def _wake(self, reader: _Reader) -> None:
        """Until the reader reads with every feed that joined it (one that joined just as it
        listed its streams may need a second call)."""
        try:
            while reader.blocked and reader.reading_with != reader.joined and reader.client_id is not None:
                async with self._short:
                    await self._redis.client_unblock(reader.client_id)
        except (OSError, aioredis.RedisError) as exc:  # it wakes by itself within _READ_BLOCK_MS
            log.warning("could not wake an event reader: %s", exc)
        finally:
            reader.waking = False

    async def _read(self, reader: _Reader) -> None:
        connection = aioredis.Redis(connection_pool=self._pool, single_connection_client=True)
        try:
            await self._read_while_followed(reader, connection)
        except Exception:
            # A failure of ours, not Redis's: end its feeds rather than leave them unread. Their
            # clients' streams end, and they resume from their last event on a new feed.
            log.exception("an event reader failed; the clients of its %d jobs are sent to reconnect", len(reader.feeds))
            for feed in list(reader.feeds.values()):
                if feed.task is not None:
                    feed.task.cancel()
        finally:
            if reader in self._readers:
                self._readers.remove(reader)
            await connection.aclose()

    async def _read_while_followed(self, reader: _Reader, connection: aioredis.Redis) -> None:
        while True:
            if not reader.feeds:  # `_read` lets go of it before any await: no feed joins it meanwhile
                return
            try:
                if reader.client_id is None:
                    reader.client_id = await connection.client_id()
                    connection.connection.register_connect_callback(reader.on_connect)
                reading = dict(reader.feeds)
                reader.reading_with = reader.joined
                reader.blocked = True
                try:
                    found = await connection.xread({key: feed.cursor for key, feed in reading.items()},
                                                   count=500, block=_READ_BLOCK_MS)
                finally:
                    reader.blocked = False
            except (OSError, aioredis.RedisError) as exc:
                log.warning("event reader interrupted: %s", exc)
                reader.client_id = None  # a new connection has another
                await asyncio.sleep(1.0)
                continue
            for key, entries in found or []:
                feed = reading[key]
                if reader.feeds.get(key) is not feed:
                    continue  # it ended meanwhile (a new feed of the job reads from its own cursor)
                batch = []
                for event_id, fields in entries:
                    feed.cursor = event_id
                    if item := _item(event_id, fields):
                        feed.keep(stream_id_tuple(event_id), item)
                        batch.append(item)
                if batch:
                    feed.deliver(batch)


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
