"""The gateway's live-tail hub over real Redis: clients that open at any position get every event
after it once, in order, whether they catch up from the feed's memory or, from further back, from
Redis; a drained hub ends every client with a reconnect hint."""

from __future__ import annotations

import asyncio
import re

from rtqcc.bus.events import EventLog, events_key
from rtqcc.streaming import hub as hub_module
from rtqcc.streaming.hub import DRAIN_RETRY_MS, EventHub

JOB = "RTQCC-HUBTEST"


def _ids(chunks: list[bytes]) -> list[str]:
    return re.findall(r"^id: (\S+)$", b"".join(chunks).decode(), re.M)


async def _follow(hub: EventHub, cursor: str, chunks: list[bytes]) -> None:
    async def no_ending(_cursor: str) -> None:
        return None

    async for chunk in hub.follow(JOB, cursor, heartbeat_s=0.2, ending=no_ending):
        chunks.append(chunk)


async def _until(predicate, what: str) -> None:
    for _ in range(500):
        if predicate():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_clients_opening_anywhere_get_every_later_event_once_in_order(settings, redis_client, monkeypatch):
    monkeypatch.setattr(hub_module, "_RECENT_EVENTS", 8)  # so some positions are further back than it keeps
    log = EventLog(redis_client)
    start = log.publish(JOB, "status", {"status": "running"})

    async def scenario() -> dict[str, list[str]]:
        hub = EventHub(settings.redis_url, max_connections=8)
        first: list[bytes] = []
        following = asyncio.create_task(_follow(hub, start, first))
        published = [start]
        for n in range(20):  # the feed reads these and keeps the last 8
            published.append(log.publish(JOB, "section.delta", {"index": 0, "text": f"{n} "}))
        await _until(lambda: _ids(first)[-1:] == published[-1:], "the first client to see every event")
        late = {}
        for name, position in (("in memory", published[18]), ("evicted", published[2]), ("at the end", published[20])):
            late[name] = []
            late[name + " task"] = asyncio.create_task(_follow(hub, position, late[name]))
        await asyncio.sleep(0)
        published.append(log.publish(JOB, "done", {"status": "completed"}))
        await asyncio.wait_for(asyncio.gather(following, *(t for k, t in late.items() if k.endswith("task"))), 10)
        await hub.close()
        return {"published": published, "first": _ids(first),
                **{name: _ids(chunks) for name, chunks in late.items() if not name.endswith("task")}}

    seen = asyncio.run(scenario())
    published = seen["published"]
    assert seen["first"] == published[1:]
    assert seen["in memory"] == published[19:]
    assert seen["evicted"] == published[3:]  # further back than the 8 kept: read from Redis
    assert seen["at the end"] == published[21:]  # only done


def test_a_drained_hub_tells_every_client_when_to_reconnect_and_ends_their_streams(settings, redis_client):
    log = EventLog(redis_client)
    start = log.publish(JOB, "status", {"status": "running"})

    async def scenario() -> list[list[bytes]]:
        hub = EventHub(settings.redis_url, max_connections=8)
        clients = [[] for _ in range(3)]
        tasks = [asyncio.create_task(_follow(hub, start, chunks)) for chunks in clients]
        log.publish(JOB, "section.delta", {"index": 0, "text": "a"})
        await _until(lambda: all(_ids(chunks) for chunks in clients), "every client to get the event")
        hub.drain()
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        after: list[bytes] = []
        await asyncio.wait_for(_follow(hub, start, after), 10)  # a client arriving while it drains
        await hub.close()
        return [*clients, after]

    for chunks in asyncio.run(scenario()):
        hint = re.fullmatch(rb"retry: (\d+)\n\n", chunks[-1])
        assert hint and DRAIN_RETRY_MS[0] <= int(hint[1]) <= DRAIN_RETRY_MS[1]
        assert b"event: done" not in b"".join(chunks)


def test_many_clients_of_one_job_fanned_out_in_batches_get_every_event_once_in_order(settings, redis_client):
    log = EventLog(redis_client)
    start = log.publish(JOB, "status", {"status": "running"})
    followers = hub_module._BATCH_FOLLOWERS + 8

    async def scenario() -> tuple[list[str], list[list[bytes]]]:
        hub = EventHub(settings.redis_url, max_connections=8)
        clients = [[] for _ in range(followers)]
        tasks = [asyncio.create_task(_follow(hub, start, chunks)) for chunks in clients]
        await asyncio.sleep(0)
        published = []
        for n in range(40):
            published.append(log.publish(JOB, "section.delta", {"index": 0, "text": f"{n} "}))
            if n % 10 == 0:
                await asyncio.sleep(0.02)  # some arrive while a batch interval is open
        published.append(log.publish(JOB, "done", {"status": "completed"}))
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        await hub.close()
        return published, clients

    published, clients = asyncio.run(scenario())
    for chunks in clients:
        assert _ids(chunks) == published


def test_jobs_followed_by_a_few_shared_readers_each_get_their_own_events_once_in_order(settings, redis_client,
                                                                                       monkeypatch):
    monkeypatch.setattr(hub_module, "_KEYS_PER_READER", 4)
    log = EventLog(redis_client)
    jobs = [f"{JOB}-{n}" for n in range(30)]  # more than 4 jobs a reader times the 6 readers 8 connections allow
    published: dict[str, list[str]] = {job: [] for job in jobs}
    received: dict[str, list[bytes]] = {job: [] for job in jobs}

    async def follow(hub: EventHub, job: str, cursor: str) -> None:
        async def no_ending(_cursor: str) -> None:
            return None

        async for chunk in hub.follow(job, cursor, heartbeat_s=0.2, ending=no_ending):
            received[job].append(chunk)

    async def scenario() -> int:
        hub = EventHub(settings.redis_url, max_connections=8)
        following = []
        for wave in (jobs[:10], jobs[10:]):  # the second wave joins readers already blocked in a read
            for job in wave:
                start = log.publish(job, "status", {"status": "running"})
                following.append(asyncio.create_task(follow(hub, job, start)))
            await _until(lambda: all(job in hub._feeds and hub._feeds[job].ready.is_set() for job in wave),
                         "the wave's feeds to start")
            for n in range(5):
                for job in wave:
                    published[job].append(log.publish(job, "section.delta", {"index": 0, "text": f"{job} {n} "}))
            for job in wave:
                published[job].append(log.publish(job, "done", {"status": "completed"}))
        await asyncio.wait_for(asyncio.gather(*following), 10)
        readers = len(hub._readers)
        await hub.close()
        return readers

    assert asyncio.run(scenario()) <= 6
    for job in jobs:
        assert _ids(received[job]) == published[job], job
        texts = re.findall(r'"text":"([^"]*)"', b"".join(received[job]).decode())
        assert texts == [f"{job} {n} " for n in range(5)]


def test_an_entry_that_is_not_an_event_is_sent_to_nobody_and_the_stream_goes_on(settings, redis_client):
    log = EventLog(redis_client)
    start = log.publish(JOB, "status", {"status": "running"})

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        hub = EventHub(settings.redis_url, max_connections=8)
        live: list[bytes] = []
        following = asyncio.create_task(_follow(hub, start, live))
        await _until(lambda: JOB in hub._feeds and hub._feeds[JOB].ready.is_set(), "the feed to start")
        redis_client.xadd(events_key(JOB), {"note": "written by hand"})
        published = [log.publish(JOB, "section.delta", {"index": 0, "text": "a"}),
                     log.publish(JOB, "done", {"status": "completed"})]
        await asyncio.wait_for(following, 10)
        late: list[bytes] = []  # catching up with XRANGE, from before the entry
        await asyncio.wait_for(_follow(hub, start, late), 10)
        await hub.close()
        return published, _ids(live), _ids(late)

    published, live, late = asyncio.run(scenario())
    assert live == published
    assert late == published


def test_a_reader_that_fails_ends_its_clients_streams_and_they_resume_from_their_last_event(settings, redis_client,
                                                                                          monkeypatch):
    log = EventLog(redis_client)
    start = log.publish(JOB, "status", {"status": "running"})
    failing = {"armed": False}
    as_an_event = hub_module._item

    def item_unless_armed(event_id, fields):
        if failing["armed"]:
            failing["armed"] = False
            raise RuntimeError("a bug in the reader")
        return as_an_event(event_id, fields)

    monkeypatch.setattr(hub_module, "_item", item_unless_armed)

    async def scenario() -> tuple[list[str], list[str], list[str]]:
        hub = EventHub(settings.redis_url, max_connections=8)
        first: list[bytes] = []
        following = asyncio.create_task(_follow(hub, start, first))
        published = [log.publish(JOB, "section.delta", {"index": 0, "text": "a"})]
        await _until(lambda: _ids(first) == published, "the first event")
        failing["armed"] = True
        published.append(log.publish(JOB, "section.delta", {"index": 0, "text": "b"}))
        await asyncio.wait_for(following, 10)  # ended without `done`: the client reconnects
        again: list[bytes] = []
        resumed = asyncio.create_task(_follow(hub, _ids(first)[-1], again))
        published.append(log.publish(JOB, "done", {"status": "completed"}))
        await asyncio.wait_for(resumed, 10)
        await hub.close()
        return published, _ids(first), _ids(again)

    published, first, again = asyncio.run(scenario())
    assert first == published[:1]
    assert again == published[1:]


def test_a_reader_whose_connection_was_replaced_is_woken_on_the_new_one(settings, redis_client):
    log = EventLog(redis_client)
    db = redis_client.connection_pool.connection_kwargs.get("db", 0)
    seen: dict[str, int] = {}

    def blocked_reader(name: str, unlike: int | None = None) -> bool:
        ids = [int(c["id"]) for c in redis_client.client_list() if c["cmd"] == "xread" and int(c["db"]) == db]
        if ids and ids[0] != unlike:
            seen[name] = ids[0]
        return name in seen

    async def follow(hub: EventHub, job: str, chunks: list[bytes]) -> None:
        async def no_ending(_cursor: str) -> None:
            return None

        async for chunk in hub.follow(job, started[job], heartbeat_s=0.2, ending=no_ending):
            chunks.append(chunk)

    started = {job: log.publish(job, "status", {"status": "running"}) for job in (f"{JOB}-A", f"{JOB}-B")}

    async def scenario() -> tuple[int | None, int | None, list[str]]:
        hub = EventHub(settings.redis_url, max_connections=8)
        received = {job: [] for job in (f"{JOB}-A", f"{JOB}-B")}
        tasks = [asyncio.create_task(follow(hub, f"{JOB}-A", received[f"{JOB}-A"]))]
        await _until(lambda: blocked_reader("first"), "the reader to block")
        redis_client.client_kill_filter(_id=seen["first"])  # redis-py reconnects and sends the read again
        await _until(lambda: blocked_reader("again", unlike=seen["first"]), "the read again on a new connection")
        (reader,) = hub._readers
        known = reader.client_id
        tasks.append(asyncio.create_task(follow(hub, f"{JOB}-B", received[f"{JOB}-B"])))  # its join wakes the reader
        published = [log.publish(f"{JOB}-B", "done", {"status": "completed"})]
        await asyncio.wait_for(tasks[1], 10)
        log.publish(f"{JOB}-A", "done", {"status": "completed"})
        await asyncio.wait_for(tasks[0], 10)
        await hub.close()
        return known, seen["again"], [i for i in _ids(received[f"{JOB}-B"]) if i in published]

    known, replacement, b_done = asyncio.run(scenario())
    assert known == replacement
    assert len(b_done) == 1
