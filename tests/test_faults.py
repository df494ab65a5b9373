"""Faults: consumers killed at every named crash point and at random moments, Redis restarted
empty, S3 stopped mid-job, Postgres connections cut. After each, a healthy consumer finishes the
work, and the oracle (fault_oracle.py) checks every job: each section stored exactly once, what
S3 holds is what Postgres points to, and no job is left stuck. The random kills print their seed
(RTQCC_FAULT_SEED replays them) and the oracle's tally: `jobs N, sections lost 0, duplicated 0`."""

from __future__ import annotations

import json
import logging
import os
import random
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time

import pg8000.native
import pytest
from conftest import API_KEY, ApiClient, consumer_env, job_events, parse_sse, wait_for
from fault_oracle import Tally, check_job, has_waiting_message
from redis import Redis

from rtqcc.store.blobs import S3BlobStore, manuscript_key, section_key
from rtqcc.store.db import connect_kwargs
from rtqcc.errors import ServiceUnavailable
from rtqcc.run.failpoints import POINTS
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.services import Services
from rtqcc.run.sweeper import sweep
from rtqcc.bus.work_queue import GROUP, STREAM
from rtqcc_emulator.embedded import EmbeddedRedis, SeaweedS3

TERMINAL = {"completed", "failed", "cancelled"}
SMALL = {"params": {"max_tokens_per_section": 40}}  # a few dozen tokens a section: fast


def _fault_seed() -> int:
    raw = os.environ.get("RTQCC_FAULT_SEED")
    if raw is None:
        return secrets.randbelow(1_000_000)
    try:
        return int(raw)
    except ValueError:
        raise pytest.UsageError(f"RTQCC_FAULT_SEED must be an integer (the seed a run printed), got {raw!r}") from None


SEED = _fault_seed()  # the random kills' choices; printed, and named in their failures


# ---- helpers --------------------------------------------------------------------------------

@pytest.fixture
def oracle(database, blob_store, redis_client):
    """Check jobs with the oracle and fail on anything it finds; returns the verdicts."""

    def check(external_ids, *, db=None, blobs=None, redis=None, replay: str = ""):
        verdicts = [check_job(e, db=db or database, blobs=blobs or blob_store, redis=redis or redis_client,
                              provider=FakeProvider()) for e in external_ids]
        bad = [str(v) for v in verdicts if not v.ok]
        assert not bad, f"the oracle found ({Tally.of(verdicts).line()}){replay}:\n" + "\n".join(bad)
        return verdicts

    return check


def create_jobs(api: ApiClient) -> list[str]:
    """Two small started jobs: one with its outline given, one whose outline the provider drafts."""
    ids = [api.create(title="Given outline", outline=[{"title": f"Part {n}"} for n in range(3)], **SMALL),
           api.create(title="Drafted outline", section_count=2, **SMALL)]
    for external_id in ids:
        assert api.post(f"/jobs/{external_id}/start").status_code == 202
    return ids


def statuses(db, external_ids) -> dict[str, str]:
    rows = db.rows("SELECT external_id, status FROM jobs WHERE external_id = ANY(CAST(:ids AS text[]))",
                   ids=list(external_ids))
    return {row["external_id"]: row["status"] for row in rows}


def consumer_process(settings, s3_endpoint, *, budget_s: float = 20, **env) -> subprocess.Popen:
    """One scheduled invocation of the consumer function in its own process, lease TTL 1 s."""
    return subprocess.Popen(
        [sys.executable, "-m", "rtqcc_emulator.invoke_consumer", "--budget-s", str(budget_s)],
        env=consumer_env(settings, s3_endpoint, **{"RTQCC_LEASE_TTL_S": "1", **env}),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_with_a_healthy_consumer(start_consumer, db, external_ids, *, timeout_s: float = 25, services=None):
    """An in-process consumer (lease TTL 1 s) runs until every job is finished and every message
    the dead consumers held is taken over and acknowledged, then stops."""
    healthy = start_consumer(name="healthy", budget_s=timeout_s + 10, services=services,
                             **({} if services else {"lease_ttl_s": 1.0, "consumer_idle_exit_ms": 0}))
    redis = (services or healthy.consumer.services).redis
    try:
        wait_for(lambda: set(statuses(db, external_ids).values()) <= TERMINAL
                 and redis.xpending(STREAM, GROUP)["pending"] == 0,
                 timeout_s=timeout_s, interval_s=0.1, what=f"jobs to finish: {statuses(db, external_ids)}")
    finally:
        healthy.consumer.shut_down()
    return healthy.join()


def held_by(db, owner: str, external_ids) -> str | None:
    """The job of `external_ids` that `owner` runs under its lease, if any."""
    row = db.row("SELECT external_id FROM jobs WHERE external_id = ANY(CAST(:ids AS text[]))"
                 " AND status = 'running' AND lease_owner = :owner", ids=list(external_ids), owner=owner)
    return row["external_id"] if row else None


def events_published(redis: Redis, external_ids) -> int:
    return sum(redis.xlen(f"job:{e}:events") for e in external_ids)


def job_row(db, external_id: str) -> dict:
    return db.row("SELECT status, lease_owner, deliveries, error FROM jobs WHERE external_id = :e", e=external_id)


# ---- a consumer that kills itself at each named crash point ------------------------------------

CRASHES = {
    "mid_token": "mid_token:5",        # 5 tokens into the first section
    "after_s3_put": "after_s3_put:2",  # the second section is in S3, its row not yet done
    "after_commit": "after_commit:1",  # the first section is done, its events not yet published
    "before_ack": "before_ack:1",      # the first job is completed, its message not acknowledged
}


def test_every_named_crash_point_is_covered():
    assert set(CRASHES) == set(POINTS)


@pytest.mark.parametrize("in_flight", [1, 32])
@pytest.mark.parametrize("point", list(CRASHES))
def test_a_consumer_killed_at_a_crash_point_is_finished_by_a_healthy_one(
        point, in_flight, api, settings, s3_endpoint, database, redis_client, blob_store, start_consumer, oracle):
    """With one job at a time, what each crash leaves behind is known exactly; with both jobs in
    flight the crash lands in either, and the healthy consumer still finishes both, exactly once."""
    ids = create_jobs(api)
    crashing = consumer_process(settings, s3_endpoint, RTQCC_CRASH_AT=CRASHES[point],
                                RTQCC_MAX_IN_FLIGHT=str(in_flight))
    _, stderr = crashing.communicate(timeout=30)
    assert crashing.returncode == -signal.SIGKILL, f"the consumer did not die at {point}: {stderr[-2000:]}"

    if in_flight == 1:  # what each crash leaves behind, before anyone repairs it
        first = database.row("SELECT id, status, lease_owner FROM jobs WHERE external_id = :e", e=ids[0])
        done = [r["idx"] for r in database.rows("SELECT idx FROM sections WHERE job_id = :j AND status = 'done'"
                                                " ORDER BY idx", j=first["id"])]
        if point == "before_ack":
            assert first["status"] == "completed"
            assert has_waiting_message(redis_client, ids[0]), "the completed job's message was acknowledged"
        else:
            assert first["status"] == "running" and first["lease_owner"], first
        if point == "mid_token":
            assert done == [] and section_key(ids[0], 0) not in _keys(blob_store, ids[0])
        if point == "after_s3_put":
            assert done == [0] and section_key(ids[0], 1) in _keys(blob_store, ids[0])
        if point == "after_commit":
            assert done == [0]
            assert not [e for e in job_events(redis_client, ids[0]) if e["event"] == "section.completed"]

    result = finish_with_a_healthy_consumer(start_consumer, database, ids)
    assert statuses(database, ids) == {e: "completed" for e in ids}
    if in_flight == 1:
        assert result.completed == (1 if point == "before_ack" else 2)
    oracle(ids)


@pytest.mark.parametrize("point", ["mid_token:5", "after_s3_put:1", "after_commit:2"])
def test_a_consumer_killed_mid_regeneration_leaves_the_old_version_current_and_bills_each_version_once(
        point, api, settings, s3_endpoint, database, redis_client, blob_store, run_consumer, start_consumer, oracle):
    """A completed job's first section regenerated in cascade; the consumer dies during it. Until
    a healthy one finishes, every section's current version is a whole one (the old one, or a new
    one already committed) and the manuscript is the one it had; after, every section has exactly
    one new version, what one uninterrupted generation gives, each version's calls billed once."""
    external_id = api.create(title="Revised", outline=[{"title": f"Part {n}"} for n in range(3)], **SMALL)
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    before = {row["idx"]: row["content_sha256"] for row in database.rows(
        "SELECT s.idx, s.content_sha256 FROM sections s JOIN jobs j ON j.id = s.job_id WHERE j.external_id = :e",
        e=external_id)}
    manuscript_before = blob_store.get(manuscript_key(external_id))
    assert api.post(f"/jobs/{external_id}/sections/0/regenerate", {"cascade": True}).status_code == 202

    crashing = consumer_process(settings, s3_endpoint, RTQCC_CRASH_AT=point)
    _, stderr = crashing.communicate(timeout=30)
    assert crashing.returncode == -signal.SIGKILL, f"the consumer did not die at {point}: {stderr[-2000:]}"
    current = database.rows("SELECT s.idx, s.current_version, s.content_sha256, v.content_sha256 AS stored"
                            " FROM sections s JOIN jobs j ON j.id = s.job_id JOIN section_versions v"
                            " ON v.job_id = s.job_id AND v.idx = s.idx AND v.version = s.current_version"
                            " WHERE j.external_id = :e ORDER BY s.idx", e=external_id)
    assert all(row["content_sha256"] == row["stored"] for row in current)  # a whole version, never a half one
    if point != "after_commit:2":
        assert [(r["current_version"], r["content_sha256"]) for r in current] == [(1, before[i]) for i in range(3)]
    if point == "after_s3_put:1":  # stored, not yet current: written again to the same key
        assert section_key(external_id, 0, 2) in _keys(blob_store, external_id)
    assert blob_store.get(manuscript_key(external_id)) == manuscript_before

    finish_with_a_healthy_consumer(start_consumer, database, [external_id])
    assert statuses(database, [external_id]) == {external_id: "completed"}
    oracle([external_id])
    versions = database.rows("SELECT idx, version FROM section_versions v JOIN jobs j ON j.id = v.job_id"
                             " WHERE j.external_id = :e ORDER BY idx, version", e=external_id)
    assert [(v["idx"], v["version"]) for v in versions] == [(i, n) for i in range(3) for n in (1, 2)]
    finished_calls = database.rows(
        "SELECT a.section_idx, a.section_version, COUNT(*)::int AS n FROM generation_attempts a JOIN jobs j"
        " ON j.id = a.job_id WHERE j.external_id = :e AND a.section_idx IS NOT NULL AND a.finish_reason IS NOT NULL"
        " GROUP BY 1, 2 ORDER BY 1, 2", e=external_id)
    assert [(c["section_idx"], c["section_version"], c["n"]) for c in finished_calls] == [
        (i, n, 1) for i in range(3) for n in (1, 2)]


def kill_while_it_holds_a_job(victim: subprocess.Popen, db, external_ids, *, replay: str) -> str:
    """SIGKILL `victim` at a moment it holds a job: it is frozen (SIGSTOP), its lease looked up in
    Postgres, and killed if it holds one; else (between two jobs) thawed until it takes the next.
    Returns the job it held when it died."""
    owner = f"{socket.gethostname()}-{victim.pid}"  # the name a consumer process gives itself
    for _ in range(20):
        victim.send_signal(signal.SIGSTOP)
        held = held_by(db, owner, external_ids)
        if held is not None:
            victim.send_signal(signal.SIGKILL)
            victim.communicate(timeout=10)
            return held
        victim.send_signal(signal.SIGCONT)
        wait_for(lambda: held_by(db, owner, external_ids) or victim.poll() is not None, timeout_s=15,
                 what=f"consumer {owner} to take a job{replay}")
        assert victim.poll() is None, (
            f"consumer {owner} ended holding no job{replay}: {victim.communicate()[1][-2000:]}")
    raise AssertionError(f"consumer {owner} was never caught holding a job{replay}")


def test_consumers_killed_at_random_moments_lose_nothing(api, settings, s3_endpoint, database, redis_client,
                                                          start_consumer, oracle, request):
    """Three consumers in a row, each running every job at once, are SIGKILLed while they hold a
    job, each after a random number of the jobs' events (RTQCC_FAULT_SEED replays the choices);
    then a healthy consumer alone (no sweeper) finishes the work from the last checkpoints. One
    job writes three sections at once."""
    replay = f" (random kills with RTQCC_FAULT_SEED={SEED})"
    request.node.user_properties.append(("summary", f"random kills: RTQCC_FAULT_SEED={SEED}"))
    request.node.add_report_section("call", "seed", f"RTQCC_FAULT_SEED={SEED} replays these random kills")
    rng = random.Random(SEED)
    ids = [*create_jobs(api), api.create(title="Written at once", outline=[{"title": f"Part {n}"} for n in range(4)],
                                         params={**SMALL["params"], "parallel_sections": 3})]
    assert api.post(f"/jobs/{ids[-1]}/start").status_code == 202
    paced = {"RTQCC_FAKE_TOKENS_PER_S": "150"}  # about a quarter of a second a section
    killed_holding = []
    for _ in range(3):
        # The two jobs publish well over a hundred events: three rounds of at most 30 leave work for each.
        target = events_published(redis_client, ids) + rng.randint(1, 30)
        victim = consumer_process(settings, s3_endpoint, **paced)
        try:
            wait_for(lambda: events_published(redis_client, ids) >= target or victim.poll() is not None,
                     timeout_s=30, what=f"the consumer to publish up to event {target}{replay}")
            killed_holding.append(kill_while_it_holds_a_job(victim, database, ids, replay=replay))
        finally:
            if victim.poll() is None:
                victim.kill()
                victim.communicate(timeout=10)
    finish_with_a_healthy_consumer(start_consumer, database, ids)
    assert statuses(database, ids) == {e: "completed" for e in ids}, replay
    verdicts = oracle(ids, replay=replay)
    request.node.user_properties.append(("summary", f"random kills: {len(killed_holding)} consumers killed holding"
                                                    f" a job; the oracle: {Tally.of(verdicts).line()}"))


def _keys(blobs, external_id: str) -> set[str]:
    found = blobs.client.list_objects_v2(Bucket=blobs.bucket, Prefix=f"manuscripts/{external_id}/")
    return {obj["Key"] for obj in found.get("Contents", [])}


def test_a_section_committed_just_before_its_consumer_died_is_still_announced(
        api, settings, s3_endpoint, database, redis_client, start_consumer, oracle):
    """A client following the live stream learns of each section's end from `section.completed`.
    The consumer that died after committing section 0 never published it; whoever finishes the
    job must, or the client shows that section as still being written until `done`."""
    external_id = api.create(title="Announced", outline=[{"title": f"Part {n}"} for n in range(2)], **SMALL)
    api.post(f"/jobs/{external_id}/start")
    crashing = consumer_process(settings, s3_endpoint, RTQCC_CRASH_AT="after_commit:1")
    crashing.communicate(timeout=30)
    assert crashing.returncode == -signal.SIGKILL
    finish_with_a_healthy_consumer(start_consumer, database, [external_id])
    oracle([external_id])
    announced = sorted(e["data"]["index"] for e in job_events(redis_client, external_id)
                       if e["event"] == "section.completed")
    assert announced == [0, 1], (
        f"BUG (orchestrator.run skips a done section without publishing the section.completed its dead consumer "
        f"never sent): announced {announced}")


def test_a_message_reclaimed_while_the_dead_consumers_lease_is_still_live_is_not_dropped(
        api, make_services, database, redis_client, start_consumer, oracle):
    """A dead consumer's message becomes claimable when it has been idle for a lease TTL, but its
    lease (renewed more often than the message is touched) can still be live for a moment then.
    The consumer that claims it in that moment must not drop it: it is the only message the job has."""
    external_id = api.create(outline=[{"title": "Only"}], **SMALL)
    api.post(f"/jobs/{external_id}/start")
    services = make_services()
    services.queue.ensure_group()
    [delivery] = services.queue.read("consumer-dead", count=1, block_ms=100)
    # The dead consumer renewed its lease just before dying: 1.5 s left. Its message was last
    # touched a while earlier, so it is already idle long enough to be claimed.
    assert services.jobs.take_for_run(external_id, "consumer-dead", ttl_s=1.5)[1] is not None
    redis_client.xclaim(STREAM, GROUP, "consumer-dead", 0, [delivery.message_id], idle=5000, justid=True)

    healthy = start_consumer(name="healthy", budget_s=12, lease_ttl_s=1.0, consumer_idle_exit_ms=0)
    try:
        wait_for(lambda: statuses(database, [external_id])[external_id] in TERMINAL, timeout_s=8, interval_s=0.1,
                 what="the job to be finished once the dead consumer's lease expired")
    except AssertionError:
        row = database.row("SELECT status, lease_owner, lease_expires_at < now() AS expired FROM jobs"
                           " WHERE external_id = :e", e=external_id)
        raise AssertionError(
            f"BUG (consumer._handle acks a reclaimed message when the job's lease is still live): the job is "
            f"stuck {row} and the message for it is gone (waiting: {has_waiting_message(redis_client, external_id)})."
            " Only the sweeper, every few minutes in a deployment and never in the local stack, would requeue it."
        ) from None
    finally:
        healthy.consumer.shut_down()
        healthy.join()
    oracle([external_id])


# ---- Redis restarted empty ------------------------------------------------------------------------

def own_services(settings, database, blob_store, *, redis_url: str | None = None, blobs=None,
                 tokens_per_s: float = 0.0, **overrides) -> Services:
    configured = settings.with_overrides(lease_ttl_s=1.0, consumer_idle_exit_ms=0, fake_tokens_per_s=tokens_per_s,
                                         **({"redis_url": redis_url} if redis_url else {}), **overrides)
    redis = Redis.from_url(configured.redis_url, decode_responses=True, socket_connect_timeout=1,
                           socket_timeout=10) if redis_url else None
    return Services(configured, redis=redis, db=database, blobs=blobs or blob_store,
                    provider=FakeProvider(tokens_per_s=tokens_per_s))


class ApiOver:
    """The real API app over given services, through Chalice's test client (one per thread)."""

    def __init__(self, services: Services):
        from chalice.test import Client

        from rtqcc.api import create_app

        self._client = Client(create_app(lambda: services))
        self.api = ApiClient(self._client.__enter__(), API_KEY)

    def close(self) -> None:
        self._client.__exit__(None, None, None)


class Follower(threading.Thread):
    """An SSE client of the buffered stream route, as a browser's EventSource behind API
    Gateway: reconnects with Last-Event-ID after every answer, waits on a 503, stops at `done`."""

    def __init__(self, services: Services, external_id: str, *, timeout_s: float = 40):
        super().__init__(daemon=True)
        self.services = services
        self.external_id = external_id
        self.deadline = time.monotonic() + timeout_s
        self.events: list[dict] = []
        self.unavailable: list[dict] = []  # the 503 answers, with their headers
        self.error: BaseException | None = None

    def run(self) -> None:
        api = ApiOver(self.services)
        try:
            last_id = None
            while time.monotonic() < self.deadline:
                answer = api.api.get(f"/jobs/{self.external_id}/stream",
                                     headers={"Last-Event-ID": last_id} if last_id else {})
                if answer.status_code == 503:
                    self.unavailable.append({"headers": dict(answer.headers), "body": answer.json_body})
                    # As a client does: reconnect after the Retry-After the answer asks for.
                    time.sleep(float(answer.headers["Retry-After"]))
                    continue
                if answer.status_code == 204:
                    return
                assert answer.status_code == 200, (answer.status_code, answer.body[:300])
                batch = parse_sse(answer.body.decode())
                self.events.extend(batch)
                last_id = batch[-1]["id"] if batch else last_id
                if batch and batch[-1]["event"] == "done":
                    return
        except BaseException as exc:
            self.error = exc
        finally:
            api.close()

    def result(self, timeout_s: float = 40) -> list[dict]:
        self.join(timeout_s)
        assert not self.is_alive(), "the SSE client did not reach done"
        if self.error:
            raise self.error
        return self.events


def sections_done(db, external_id: str) -> int:
    return db.row("SELECT COUNT(*)::int AS n FROM sections s JOIN jobs j ON j.id = s.job_id"
                  " WHERE j.external_id = :e AND s.status = 'done'", e=external_id)["n"]


def test_redis_restarted_empty_mid_job_is_healed_by_the_sweeper_and_clients_resume_from_a_snapshot(
        tmp_path, settings, database, blob_store, start_consumer, oracle):
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        services = own_services(settings, database, blob_store, redis_url=server.url, tokens_per_s=150)
        api = ApiOver(services).api
        ids = create_jobs(api)
        follower = Follower(services, ids[0])
        follower.start()
        before = start_consumer(name="before-outage", budget_s=30, services=services)
        wait_for(lambda: sections_done(database, ids[0]) >= 1, timeout_s=15, what="a first section")

        server.stop()  # no persistence: the queue, the events and the consumer group are gone
        wait_for(lambda: follower.unavailable, timeout_s=10, what="the SSE client to meet the outage")
        assert all(int(u["headers"]["Retry-After"]) > 0 and u["body"]["error"]["code"] == "service_unavailable"
                   for u in follower.unavailable)
        assert api.get(f"/jobs/{ids[0]}").status_code == 200  # job state is read from Postgres
        before.consumer.shut_down()  # the scheduled invocation ends while Redis is away
        before.join()

        server = EmbeddedRedis(tmp_path / "redis", port=server.port).start()
        assert services.redis.dbsize() == 0
        swept = sweep(services)
        assert swept.queue_was_lost and set(ids) <= set(swept.requeued), swept
        finish_with_a_healthy_consumer(start_consumer, database, ids, services=services)
        assert statuses(database, ids) == {e: "completed" for e in ids}

        events = follower.result()
        assert events[-1] == {"id": events[-1]["id"], "event": "done", "data": {"status": "completed"}}
        snapshots = [i for i, e in enumerate(events) if e["event"] == "snapshot"]
        assert len(snapshots) >= 2, "the SSE client was not given a fresh snapshot after Redis lost its events"
        # From the last snapshot on, the client can tell every section's end.
        recovered = events[snapshots[-1]:]
        seen_done = {s["index"] for s in recovered[0]["data"]["sections"] if s["status"] == "done"}
        seen_done |= {e["data"]["index"] for e in recovered if e["event"] == "section.completed"}
        assert seen_done == {0, 1, 2}
        oracle(ids, redis=services.redis)
    finally:
        server.stop()


def test_the_sweeper_requeues_after_redis_lost_everything_even_if_a_consumer_reconnected_first(
        tmp_path, settings, database, blob_store, start_consumer, oracle, caplog):
    """Consumers reconnect within seconds of a Redis restart, and their start-up recreates the
    (empty) work stream; the sweeper runs every few minutes. It must still see what was lost."""
    server = EmbeddedRedis(tmp_path / "redis").start()
    try:
        services = own_services(settings, database, blob_store, redis_url=server.url, tokens_per_s=150)
        ids = create_jobs(ApiOver(services).api)
        consumer = start_consumer(name="through-the-outage", budget_s=40, services=services)
        wait_for(lambda: sections_done(database, ids[0]) >= 1, timeout_s=15, what="a first section")
        caplog.set_level(logging.WARNING, logger="rtqcc.run")
        caplog.clear()
        server.stop()
        wait_for(lambda: any(r.name.startswith("rtqcc.run") for r in caplog.records), timeout_s=15,
                 what="the consumer to meet the outage")
        server = EmbeddedRedis(tmp_path / "redis", port=server.port).start()
        wait_for(lambda: services.redis.exists(STREAM), timeout_s=15, interval_s=0.1,
                 what="the consumer to reconnect and recreate its group")
        swept = sweep(services)
        try:
            assert set(ids) <= set(swept.requeued), (
                f"BUG (sweeper.sweep decides the queue was lost by `not redis.exists('jobs:pending')`, but a "
                f"consumer's ensure_group (XGROUP CREATE ... MKSTREAM) or any enqueue recreated the stream first): "
                f"swept {swept}, jobs {statuses(database, ids)}; queued jobs whose messages Redis lost wait "
                f"{600} s (queued_stale_after_s) before anyone requeues them")
            finish_with_a_healthy_consumer(start_consumer, database, ids, services=services)
            oracle(ids, redis=services.redis)
        finally:
            consumer.consumer.shut_down()
            consumer.join()
    finally:
        server.stop()


def test_a_client_whose_position_redis_lost_gets_a_snapshot_even_after_new_events(api, services, redis_client):
    """Redis restarted without persistence, a consumer already published new events, then the
    client reconnects with the Last-Event-ID it had: the events in between are gone, so it must
    start again from a snapshot (whatever the Redis version; Redis 7 reports `entries-added`)."""
    external_id = api.create(**SMALL)
    api.post(f"/jobs/{external_id}/start")
    last_id = parse_sse(api.get(f"/jobs/{external_id}/stream").body.decode())[-1]["id"]
    services.events.publish(external_id, "section.started", {"index": 0, "title": "Lost", "resumed_chars": 0})
    redis_client.flushdb()  # what a restart without persistence leaves
    services.events.publish(external_id, "status", {"status": "running"})
    answer = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": last_id})
    kinds = [e["event"] for e in parse_sse(answer.body.decode())]
    assert kinds and kinds[0] == "snapshot", (
        f"BUG (events.EventLog.covers trusts `entries-added == length`, true for a stream recreated after a "
        f"restart; Redis {redis_client.info('server')['redis_version']}): the client resumed after {last_id} with "
        f"{kinds}, silently missing what Redis lost")


# ---- S3 stopped ---------------------------------------------------------------------------------

def test_s3_stopped_mid_job_gets_503s_marks_nothing_done_and_the_job_completes_when_it_returns(
        tmp_path, settings, database, redis_client, start_consumer, oracle):
    s3 = SeaweedS3(tmp_path / "s3").start()
    try:
        s3_settings = settings.with_overrides(s3_endpoint_url=s3.endpoint_url, s3_create_bucket=True,
                                              aws_access_key_id=s3.credentials["access_key_id"],
                                              aws_secret_access_key=s3.credentials["secret_access_key"])
        blobs = S3BlobStore.from_settings(s3_settings)
        services = own_services(s3_settings, database, None, blobs=blobs, tokens_per_s=80)
        api = ApiOver(services).api
        finished = api.create(title="Finished before", outline=[{"title": "Only"}], **SMALL)
        api.post(f"/jobs/{finished}/start")
        consumer = start_consumer(name="through-the-outage", budget_s=60, services=services)
        wait_for(lambda: statuses(database, [finished])[finished] == "completed", timeout_s=15, what="a finished job")
        running = api.create(title="Caught in it", outline=[{"title": f"Part {n}"} for n in range(3)], **SMALL)
        api.post(f"/jobs/{running}/start")
        wait_for(lambda: sections_done(database, running) >= 1, timeout_s=15, what="a first section")

        s3.stop()
        # The consumer cannot store the next section: it hands the job back, saying why.
        first_failure = wait_for(lambda: (row := job_row(database, running))["error"] and row, timeout_s=15,
                                 what="the consumer to hand the job back when S3 failed")
        done_when_stopped = sections_done(database, running)
        for path in (f"/jobs/{finished}/manuscript", f"/jobs/{finished}/sections/0", f"/jobs/{running}/sections/0"):
            answer = api.get(path)
            assert answer.status_code == 503, (path, answer.status_code, answer.body[:300])
            assert int(answer.headers["Retry-After"]) > 0
            assert answer.json_body["error"]["code"] == "service_unavailable"
            assert "Traceback" not in answer.body.decode()
        assert api.get(f"/jobs/{running}").status_code == 200
        # A lease later it takes the job again, fails to store again, and hands it back again.
        wait_for(lambda: (row := job_row(database, running))["deliveries"] > first_failure["deliveries"]
                 and row["status"] == "queued", timeout_s=15, what="the consumer to retry and fail again")
        assert sections_done(database, running) == done_when_stopped, "a section was marked done while S3 was down"

        s3 = SeaweedS3(tmp_path / "s3", port=s3.port).start()  # the same data, the same address
        # SeaweedFS answers HTTP before its volume serves old objects again (a 500 InternalError a moment).
        wait_for(lambda: _readable(blobs, f"manuscripts/{finished}/manuscript.md"), timeout_s=15, interval_s=0.2,
                 what="S3 to serve stored objects again")
        try:
            wait_for(lambda: statuses(database, [running])[running] in TERMINAL, timeout_s=30, interval_s=0.1,
                     what="the job to finish after S3 came back")
        finally:
            consumer.consumer.shut_down()
            consumer.join()
        oracle([finished, running], blobs=blobs)  # whatever the outcome: nothing done that is not stored
        assert api.get(f"/jobs/{finished}/manuscript").status_code == 200
        job = api.get(f"/jobs/{running}").json_body
        assert job["status"] == "completed", (
            f"BUG (consumer._handle counts a run cut short by an unavailable service as a failed run, so an outage "
            f"of consumer_max_deliveries x lease_ttl_s fails the job for good): {job.get('error')}")
    finally:
        s3.stop()


def _readable(blobs, key: str) -> bool:
    try:
        return bool(blobs.get(key))
    except ServiceUnavailable:
        return False


# ---- Postgres connections cut ------------------------------------------------------------------

def terminate_connections(database_url: str) -> int:
    """Cut every connection to the test database but this one, as a failover or an operator would."""
    kwargs = connect_kwargs(database_url)
    name = kwargs["database"]
    admin = pg8000.native.Connection(**{**kwargs, "database": "postgres"})
    try:
        rows = admin.run("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                         " WHERE datname = :name AND pid <> pg_backend_pid()", name=name)
    finally:
        admin.close()
    return sum(1 for (ok,) in rows if ok)


def test_postgres_connections_cut_mid_job_the_job_still_completes(settings, database, blob_store, redis_client,
                                                                    start_consumer, oracle):
    from rtqcc.store.db import Database

    consumer_db = Database(settings.database_url)  # the consumer's own pool, as in its own process
    services = own_services(settings, consumer_db, blob_store, tokens_per_s=150)
    services.redis = redis_client
    api = ApiOver(own_services(settings, database, blob_store)).api
    ids = create_jobs(api)
    consumer = start_consumer(name="through-the-cuts", budget_s=40, services=services)
    try:
        for n in (1, 2):
            wait_for(lambda: sections_done(database, ids[0]) >= n, timeout_s=15, what=f"section {n} of the first job")
            assert terminate_connections(settings.database_url) >= 1
            database.close()  # the test's own idle connections were cut too: let them go
        wait_for(lambda: _statuses_or_none(database, ids) and set(_statuses_or_none(database, ids).values()) <= TERMINAL,
                 timeout_s=30, interval_s=0.1, what="the jobs to finish after the cuts")
    finally:
        consumer.consumer.shut_down()
        result = consumer.join()
        consumer_db.close()
    assert statuses(database, ids) == {e: "completed" for e in ids}
    assert result.completed == 2
    oracle(ids)


def _statuses_or_none(db, ids):
    try:
        return statuses(db, ids)
    except Exception:  # a connection cut under us: ask again
        return None



# ---- a rolling update: the consumer container is asked to stop ----------------------------------

KUBERNETES_GRACE_S = 30  # terminationGracePeriodSeconds in infra/k8s/consumer.yaml: SIGKILL after it


def test_a_consumer_container_stopped_by_sigterm_mid_job_hands_every_job_back_and_loses_no_token(
        api, settings, s3_endpoint, database, redis_client, start_consumer, oracle):
    """`rtqcc consume --loop` (the container's command) gets SIGTERM while it writes several jobs:
    it checkpoints each (the text of every section in progress kept), hands each back to the
    queue, and exits 0 by itself before the platform's SIGKILL; another consumer then finishes
    them from those checkpoints, neither repeating nor dropping a token."""
    ids = [*create_jobs(api), api.create(title="Written at once", outline=[{"title": f"Part {n}"} for n in range(3)],
                                         params={**SMALL["params"], "parallel_sections": 2})]
    assert api.post(f"/jobs/{ids[-1]}/start").status_code == 202
    container = subprocess.Popen(
        [sys.executable, "-m", "rtqcc.cli", "consume", "--loop", "--budget-s", "600"],
        env=consumer_env(settings, s3_endpoint, RTQCC_FAKE_TOKENS_PER_S="40", RTQCC_DELTA_FLUSH_MS="0",
                         RTQCC_CONSUMER_SAFETY_MARGIN_MS="2000"),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        owner = f"{socket.gethostname()}-{container.pid}"
        wait_for(lambda: all(any(e["event"] == "section.delta" for e in job_events(redis_client, job)) for job in ids)
                 and len(_held(database, owner, ids)) == len(ids) or container.poll() is not None,
                 timeout_s=30, what="the container to be writing every job")
        assert container.poll() is None, container.communicate()[1][-2000:]
        container.send_signal(signal.SIGTERM)
        out, err = container.communicate(timeout=KUBERNETES_GRACE_S)
    finally:
        if container.poll() is None:
            container.kill()
            container.communicate(timeout=10)
    assert container.returncode == 0, err[-2000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["requeued"] == len(ids) and summary["completed"] == 0

    rows = database.rows("SELECT external_id, status, lease_owner FROM jobs WHERE external_id = ANY(CAST(:ids AS text[]))",
                         ids=ids)
    assert {row["status"] for row in rows} == {"queued"} and not any(row["lease_owner"] for row in rows)
    for job in ids:  # every token streamed before the stop is kept for the next run, not paid again
        assert _streamed_unfinished(redis_client, job) == _partial_texts(database, job)
    assert all(has_waiting_message(redis_client, job) for job in ids)

    finish_with_a_healthy_consumer(start_consumer, database, ids)
    assert statuses(database, ids) == {e: "completed" for e in ids}
    oracle(ids)


def _held(db, owner: str, external_ids) -> list[str]:
    return [row["external_id"] for row in db.rows(
        "SELECT external_id FROM jobs WHERE external_id = ANY(CAST(:ids AS text[])) AND lease_owner = :owner",
        ids=list(external_ids), owner=owner)]


def _streamed_unfinished(redis, external_id: str) -> dict[int, str]:
    """The text each section not yet completed has streamed, from the job's events."""
    streamed: dict[int, str] = {}
    for event in job_events(redis, external_id):
        if event["event"] == "section.delta":
            streamed[event["data"]["index"]] = streamed.get(event["data"]["index"], "") + event["data"]["text"]
        elif event["event"] == "section.completed":
            streamed.pop(event["data"]["index"], None)
    return {index: text for index, text in streamed.items() if text}


def _partial_texts(db, external_id: str) -> dict[int, str]:
    return {row["idx"]: row["partial_text"] for row in db.rows(
        "SELECT s.idx, s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id"
        " WHERE j.external_id = :e AND s.partial_text <> ''", e=external_id)}
