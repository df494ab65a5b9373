"""Live SSE tails for many clients from one process: one Redis reader per followed job, its
events formatted once and fanned out to every client's queue, on the event loop, with no thread
per client. The gateway serves the stream route's tail from here in streaming mode; opening a
stream (auth, job lookup, snapshot or replay position) still goes through the same code as the
streaming function (`rtqcc.api.access.open_job_stream`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator, Awaitable, Callable

import redis.asyncio as aioredis

from rtqcc.events import events_key, stream_id_tuple
from rtqcc.sse import HEARTBEAT

log = logging.getLogger(__name__)

_READ_BLOCK_MS = 5_000
_IDLE_FEED_S = 30.0


def _frame(event_id: str, fields: dict[str, str]) -> bytes:
    # The stored data is compact JSON without newlines: it goes out as it is.
    return f"id: {event_id}\nevent: {fields['type']}\ndata: {fields['data']}\n\n".encode()


@dataclass
class _Feed:
    """The one reader of a job's event stream, and the queues of the clients following it."""

    key: str
    queues: set[asyncio.Queue] = field(default_factory=set)
    task: asyncio.Task | None = None
    ready: asyncio.Event = field(default_factory=asyncio.Event)  # set once it knows where it reads from
    idle_since: float = 0.0


class EventHub:
    def __init__(self, redis_url: str, *, max_connections: int = 1000):
        self._redis = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=max_connections,
                                              socket_timeout=60, socket_connect_timeout=3)
        self._feeds: dict[str, _Feed] = {}

    async def close(self) -> None:
        for feed in list(self._feeds.values()):
            if feed.task:
                feed.task.cancel()
        await self._redis.aclose()

    async def follow(self, external_id: str, cursor: str, *, heartbeat_s: float,
                     ending: Callable[[str], Awaitable[str | None]]) -> AsyncIterator[bytes]:
        """Every event after `cursor` until `done`; heartbeats while idle; `ending(cursor)` is
        asked on idle whether the job finished without a `done` we saw (events lost)."""
        queue: asyncio.Queue = asyncio.Queue()
        feed = self._attach(external_id, queue)
        try:
            await feed.ready.wait()
            # Attached first, then caught up: anything published meanwhile is in one or the other.
            for event_id, fields in await self._redis.xrange(feed.key, min=f"({cursor}", max="+"):
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
        try:
            # Read from the newest entry as of now; clients catch up to it with XRANGE only after
            # this is known, so no event falls between their catch-up and this feed.
            newest = await self._redis.xrevrange(feed.key, count=1)
            cursor = newest[0][0] if newest else "0-0"
            feed.ready.set()
            while True:
                if not feed.queues:
                    if loop.time() - feed.idle_since > _IDLE_FEED_S:
                        return
                else:
                    feed.idle_since = loop.time()
                try:
                    found = await self._redis.xread({feed.key: cursor}, count=500, block=_READ_BLOCK_MS)
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
            with contextlib.suppress(KeyError):
                if self._feeds[external_id] is feed:
                    del self._feeds[external_id]
            feed.ready.set()
            for queue in list(feed.queues):
                queue.put_nowait(None)
