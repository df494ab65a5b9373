"""DELETE /jobs/{id} and `rtqcc prune`: a deleted job leaves nothing in Postgres, S3 or Redis,
also when it is deleted mid-run under a consumer; objects a fork shares outlive their source while
the fork needs them; its usage stays counted for billing; retention deletes what is older."""

from __future__ import annotations

import threading

import httpx
import pytest
from conftest import OTHER_KEY, consumer_env, job_events, parse_sse, wait_for
from test_cli import EVERY_LOCAL_MODULE, run_cli

from rtqcc.run.deletion import prune
from rtqcc.store.blobs import job_prefix
from rtqcc.store.deletion import JobDeletions
from rtqcc_emulator.client import ApiError

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]


def _tables(database) -> list[tuple[str, bool]]:
    """Every table of the schema, and whether it has a job_id column."""
    rows = database.rows(
        "SELECT t.table_name AS name, EXISTS (SELECT 1 FROM information_schema.columns c WHERE"
        " c.table_schema = t.table_schema AND c.table_name = t.table_name AND c.column_name = 'job_id') AS by_id"
        " FROM information_schema.tables t WHERE t.table_schema = 'public' AND t.table_type = 'BASE TABLE'")
    return [(row["name"], row["by_id"]) for row in rows]


def _redis_mentions(redis_client, needle: str) -> list[str]:
    """Keys whose name or content names `needle`, whatever their type."""
    found = []
    for key in redis_client.scan_iter(count=1000):
        kind = redis_client.type(key)
        if kind == "string":
            content = [redis_client.get(key) or ""]
        elif kind == "stream":
            content = [str(fields) for _, fields in redis_client.xrange(key)]
        elif kind == "zset":
            content = redis_client.zrange(key, 0, -1)
        elif kind == "list":
            content = redis_client.lrange(key, 0, -1)
        elif kind == "set":
            content = list(redis_client.smembers(key))
        elif kind == "hash":
            content = [f"{k}={v}" for k, v in redis_client.hgetall(key).items()]
        else:
            content = []
        if needle in key or any(needle in item for item in content):
            found.append(key)
    return found


def assert_nothing_left(database, blob_store, redis_client, external_id: str, job_id: int) -> None:
    for table, by_id in _tables(database):
        mentions = database.row(f"SELECT COUNT(*)::int AS n FROM {table} x WHERE x::text LIKE :p",
                                p=f"%{external_id}%")["n"]
        assert mentions == 0, f"{table} still names {external_id}"
        if by_id:
            assert database.row(f"SELECT COUNT(*)::int AS n FROM {table} WHERE job_id = :j", j=job_id)["n"] == 0, table
    assert blob_store.keys_under(job_prefix(external_id)) == []
    assert _redis_mentions(redis_client, external_id) == []


def _job_id(database, external_id: str) -> int:
    return database.row("SELECT id FROM jobs WHERE external_id = :e", e=external_id)["id"]


def test_a_deleted_job_leaves_nothing_in_postgres_s3_or_redis(make_api, run_consumer, database, blob_store,
                                                              redis_client):
    # A tenant's endpoint and a job's own URL: both have deliveries about the job in their logs
    # (on loopback, which this API accepts and the consumer's sender refuses: no request is sent).
    api, _ = make_api(webhook_allowed_networks=("127.0.0.0/8",))
    assert api.post("/webhooks", {"url": "http://127.0.0.1:9/rtqcc", "events": ["job.completed"]}).status_code == 201
    external_id = api.create(outline=OUTLINE, webhook={"url": "http://127.0.0.1:9/this-job"})
    assert api.post(f"/jobs/{external_id}/start", headers={"Idempotency-Key": "start-once"}).status_code == 202
    assert run_consumer().completed == 1
    assert database.row("SELECT COUNT(*)::int AS n FROM webhook_deliveries WHERE job_external_id = :e",
                        e=external_id)["n"] == 2
    edited = api.get(f"/jobs/{external_id}/sections/0")
    api.put(f"/jobs/{external_id}/sections/0", {"content": "A person's text."}, headers={"If-Match": edited.headers["ETag"]})
    assert api.get(f"/jobs/{external_id}/manuscript?format=html").status_code == 200  # an export, stored
    job_id = _job_id(database, external_id)
    stored = blob_store.keys_under(job_prefix(external_id))
    assert any("/exports/" in key for key in stored)
    assert len(stored) >= 5  # two sections, an edit, two manuscripts, an export
    assert job_events(redis_client, external_id)

    deleted = api.delete(f"/jobs/{external_id}")
    assert deleted.status_code == 202
    assert deleted.json_body == {"externalId": external_id, "status": "deleted"}
    assert api.get(f"/jobs/{external_id}").status_code == 404
    assert external_id not in [job["externalId"] for job in api.get("/jobs").json_body["jobs"]]
    assert_nothing_left(database, blob_store, redis_client, external_id, job_id)
    # Nothing is kept to say it was: a second DELETE is the 404 of a job that does not exist.
    again = api.delete(f"/jobs/{external_id}")
    assert again.status_code == 404 and again.json_body["error"]["code"] == "job_not_found"


def test_another_tenants_job_is_a_404_and_stays(api, database):
    external_id = api.create(section_count=1)
    refused = api.as_key(OTHER_KEY).delete(f"/jobs/{external_id}")
    assert refused.status_code == 404 and refused.json_body["error"]["code"] == "job_not_found"
    assert api.get(f"/jobs/{external_id}").status_code == 200


def test_a_queued_job_waiting_aside_is_taken_off_every_queue(api, run_consumer, database, blob_store, redis_client):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    redis_client.zadd("jobs:waiting:tenant-a", {external_id: 1})  # as park_then_ack leaves it
    job_id = _job_id(database, external_id)
    assert api.delete(f"/jobs/{external_id}").json_body["status"] == "deleted"
    assert_nothing_left(database, blob_store, redis_client, external_id, job_id)
    assert run_consumer().completed == 0


def test_a_job_deleted_mid_run_stops_at_once_and_its_consumer_writes_nothing_after(
        api, start_consumer, run_consumer, database, blob_store, redis_client):
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 2000})
    api.post(f"/jobs/{external_id}/start")
    job_id = _job_id(database, external_id)
    # Slow tokens, and Postgres polled an hour later: only the cancel command can stop the stream soon.
    consumer = start_consumer(fake_tokens_per_s=40.0, control_poll_s=3600.0, lease_ttl_s=1.0)
    wait_for(lambda: [e for e in job_events(redis_client, external_id) if e["event"] == "section.delta"],
             timeout_s=15, what="the first token")

    deleted = api.delete(f"/jobs/{external_id}")
    assert deleted.status_code == 202
    assert deleted.json_body["status"] == "deleting"  # its consumer held a live lease
    assert api.get(f"/jobs/{external_id}").status_code == 404
    result = consumer.join(20)
    assert result.completed == 0 and result.requeued == 0

    # Once its lease has expired, a repeated DELETE removes the rest.
    wait_for(lambda: api.delete(f"/jobs/{external_id}").status_code == 404, timeout_s=15, interval_s=0.2,
             what="the deletion to finish")
    assert_nothing_left(database, blob_store, redis_client, external_id, job_id)
    # No message left behind makes a consumer bring anything back.
    assert run_consumer().completed == 0
    assert_nothing_left(database, blob_store, redis_client, external_id, job_id)


DELETED_DONE = {"status": "cancelled", "code": "job_deleted"}
LIVE_MODES = pytest.mark.parametrize("hub", [True, False], ids=["event-hub", "function-generator"])


def _follow(client, external_id: str) -> tuple[list, threading.Thread, list]:
    """A watcher following the job's stream on a thread of its own: its events, and its error."""
    seen, failed = [], []

    def watch() -> None:
        try:
            seen.extend(client.events(external_id, max_reconnects=0))
        except BaseException as exc:  # shown by the test that joins it
            failed.append(exc)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    return seen, watcher, failed


def _ended(watcher: threading.Thread, failed: list) -> None:
    watcher.join(20)
    assert not watcher.is_alive(), "the stream of the deleted job did not end"
    assert not failed, failed


def _reconnect_is_a_404(client, external_id: str, last_event_id: str) -> None:
    with pytest.raises(ApiError) as refused:
        next(iter(client.events(external_id, last_event_id=last_event_id, max_reconnects=0)))
    assert refused.value.status == 404 and refused.value.code == "job_not_found"


@LIVE_MODES
def test_a_watcher_of_a_job_deleted_mid_run_gets_done_and_its_stream_ends(start_gateway, start_consumer, hub):
    running = start_gateway(streaming=True, hub=hub)
    with running.client() as client, running.client() as watching:
        external_id = client.create(title="Doomed", brief="b", outline=OUTLINE,
                                    params={"max_tokens_per_section": 2000})["externalId"]
        client.control(external_id, "start")
        consumer = start_consumer(fake_tokens_per_s=40.0, lease_ttl_s=1.0)
        seen, watcher, failed = _follow(watching, external_id)
        wait_for(lambda: any(event.type == "section.delta" for event in seen), timeout_s=15,
                 what="the watcher to see the first token")

        assert client.delete(external_id)["status"] == "deleting"  # its consumer held a live lease
        _ended(watcher, failed)
        assert (seen[-1].type, seen[-1].data) == ("done", DELETED_DONE)
        assert [event.type for event in seen].count("done") == 1
        assert consumer.join(20).completed == 0
        # A watcher that reconnects now finds no job, as one that comes back after the deletion did.
        _reconnect_is_a_404(watching, external_id, seen[-1].id)


@LIVE_MODES
def test_a_watcher_that_misses_the_deletions_done_gets_it_from_postgres_on_its_next_heartbeat(
        start_gateway, services, database, redis_client, hub):
    running = start_gateway(streaming=True, hub=hub)
    with running.client() as client, running.client() as watching:
        external_id = client.create(title="Doomed", brief="b", outline=OUTLINE)["externalId"]
        client.control(external_id, "start")  # queued; no consumer: the stream idles on heartbeats
        seen, watcher, failed = _follow(watching, external_id)
        wait_for(lambda: seen, what="the watcher's snapshot")
        # Marked by a process that died before anything else (no done published), then purged:
        # the watcher's events are gone with it, the heartbeat (0.5 s in tests) finds the end.
        JobDeletions(database).mark("tenant-a", external_id)
        assert prune(services, limit=10).deleted == 1
        _ended(watcher, failed)
        assert [(event.type, event.data) for event in seen[1:]] == [("done", DELETED_DONE)]
        _reconnect_is_a_404(watching, external_id, seen[-1].id)
    assert job_events(redis_client, external_id) == []


def test_a_buffered_long_poll_in_flight_when_its_job_is_deleted_answers_done(start_gateway, make_services,
                                                                              redis_client, settings):
    # Long polls that wait far longer than the test: only the deletion can end this one soon.
    running = start_gateway(streaming=False, services_override=make_services(sse_long_poll_s=20.0))
    db = int(settings.redis_url.rsplit("/", 1)[1])
    with running.client() as client, httpx.Client(base_url=running.base_url, timeout=30,
                                                   headers={"Authorization": f"Bearer {running.key}"}) as http:
        external_id = client.create(title="Doomed", brief="b", outline=OUTLINE)["externalId"]
        client.control(external_id, "start")
        snapshot = parse_sse(http.get(f"/jobs/{external_id}/stream").text)[0]
        answers: list[httpx.Response] = []
        poll = threading.Thread(target=lambda: answers.append(http.get(
            f"/jobs/{external_id}/stream", headers={"Last-Event-ID": snapshot["id"]})), daemon=True)
        poll.start()
        wait_for(lambda: [c for c in redis_client.client_list()
                          if c["cmd"] == "xread" and "b" in c["flags"] and int(c["db"]) == db],
                 what="the long poll to wait on the job's events")

        assert client.delete(external_id)["status"] == "deleted"
        poll.join(20)
        assert answers and answers[0].status_code == 200
        assert [(e["event"], e["data"]) for e in parse_sse(answers[0].text)] == [("done", DELETED_DONE)]
        # Its reconnect (and that of a watcher between polls) finds no job.
        again = http.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": parse_sse(answers[0].text)[0]["id"]})
        assert again.status_code == 404 and again.json()["error"]["code"] == "job_not_found"


def test_a_fork_keeps_the_objects_it_shares_until_it_is_deleted_too(api, run_consumer, database, blob_store,
                                                                     redis_client):
    source = api.create(outline=[*OUTLINE, {"title": "After", "brief": "what came next"}])
    api.post(f"/jobs/{source}/start")
    assert run_consumer().completed == 1
    forked = api.post(f"/jobs/{source}/fork", {"from_section": 2})
    assert forked.status_code == 201, forked.body
    fork = forked.json_body["externalId"]
    api.post(f"/jobs/{fork}/start")
    assert run_consumer().completed == 1
    first_section = api.get(f"/jobs/{fork}/sections/0").json_body["content"]
    source_id, fork_id = _job_id(database, source), _job_id(database, fork)

    assert api.delete(f"/jobs/{source}").json_body["status"] == "deleted"
    shared = blob_store.keys_under(job_prefix(source))
    assert sorted(shared) == [f"manuscripts/{source}/sections/0.md", f"manuscripts/{source}/sections/1.md"]
    assert api.get(f"/jobs/{fork}/sections/0").json_body["content"] == first_section
    assert api.get(f"/jobs/{fork}/manuscript").status_code == 200

    assert api.delete(f"/jobs/{fork}").json_body["status"] == "deleted"
    assert blob_store.keys_under(job_prefix(source)) == []
    assert_nothing_left(database, blob_store, redis_client, fork, fork_id)
    assert database.row("SELECT COUNT(*)::int AS n FROM jobs WHERE id = :j", j=source_id)["n"] == 0


def test_a_deletion_interrupted_after_its_mark_is_finished_by_prune(api, run_consumer, services, database, blob_store,
                                                                     redis_client):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    job_id = _job_id(database, external_id)
    JobDeletions(database).mark("tenant-a", external_id)  # then the process died
    assert api.get(f"/jobs/{external_id}").status_code == 404
    result = prune(services, limit=10)
    assert (result.deleted, result.waiting, result.failed) == (1, 0, [])
    assert_nothing_left(database, blob_store, redis_client, external_id, job_id)


def _age(database, external_id: str, days: int) -> None:
    database.run("UPDATE jobs SET finished_at = now() - make_interval(days => :d) WHERE external_id = :e",
                 d=days, e=external_id)


def test_prune_deletes_finished_jobs_past_their_tenants_retention_bounded_per_run(api, run_consumer, make_services,
                                                                                    database):
    old = [api.create(section_count=1) for _ in range(3)]
    recent, paused = api.create(section_count=1), api.create(section_count=1)
    for external_id in [*old, recent]:
        api.post(f"/jobs/{external_id}/start")
    run_consumer()
    api.post(f"/jobs/{paused}/start")
    api.post(f"/jobs/{paused}/pause")
    for external_id in old:
        _age(database, external_id, 40)
    _age(database, recent, 5)

    assert prune(make_services(retention_days=None), limit=10).deleted == 0  # unset: kept forever
    # The tenant's own retention wins over the setting: 0 keeps its jobs forever.
    database.run("INSERT INTO tenant_quotas (tenant, retention_days) VALUES ('tenant-a', 0)")
    assert prune(make_services(retention_days=30), limit=10).deleted == 0
    database.run("UPDATE tenant_quotas SET retention_days = NULL WHERE tenant = 'tenant-a'")

    services = make_services(retention_days=30)
    assert prune(services, limit=2).deleted == 2
    assert prune(services, limit=2).deleted == 1
    assert prune(services, limit=2).deleted == 0
    left = {job["externalId"] for job in api.get("/jobs").json_body["jobs"]}
    assert left == {recent, paused}


def test_usage_of_a_deleted_job_stays_counted(api, run_consumer):
    ids = [api.create(section_count=2) for _ in range(2)]
    for external_id in ids:
        api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 2
    before = api.get("/usage").json_body["total"]
    api.delete(f"/jobs/{ids[0]}")
    after = api.get("/usage").json_body["total"]
    assert after["deleted_jobs"] == 1
    assert {k: v for k, v in after.items() if k != "deleted_jobs"} == \
        {k: v for k, v in before.items() if k != "deleted_jobs"}


def test_prune_and_migrate_check_on_the_command_line(settings, s3_endpoint, api, run_consumer, database, tmp_path):
    env = consumer_env(settings, s3_endpoint, RTQCC_RETENTION_DAYS="1")
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    _age(database, external_id, 2)
    pruned = run_cli(["prune", "--limit", "10"], env=env, without=EVERY_LOCAL_MODULE)
    assert pruned.returncode == 0, pruned.stderr
    assert "deleted 1 job(s), 0 waiting for their consumer to stop, 0 failed" in pruned.stdout
    assert api.get(f"/jobs/{external_id}").status_code == 404

    current = run_cli(["migrate", "--check"], env=env, without=EVERY_LOCAL_MODULE)
    assert current.returncode == 0 and "up to date" in current.stdout, current.stderr
    behind = database.row("SELECT version FROM schema_migrations ORDER BY version DESC LIMIT 1")["version"]
    database.run("DELETE FROM schema_migrations WHERE version = :v", v=behind)
    try:
        checked = run_cli(["migrate", "--check"], env=env, without=EVERY_LOCAL_MODULE)
    finally:
        database.run("INSERT INTO schema_migrations (version) VALUES (:v)", v=behind)
    assert checked.returncode == 1
    assert f"1 migration(s) not applied: {behind}" in checked.stderr


def test_prune_refuses_a_bad_limit(settings, s3_endpoint):
    env = consumer_env(settings, s3_endpoint)
    refused = run_cli(["prune", "--limit", "0"], env=env, without=EVERY_LOCAL_MODULE)
    assert refused.returncode == 2 and "--limit must be at least 1" in refused.stderr


def test_deleting_a_job_gives_no_quota_back(api, run_consumer, database):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 1
    spent = api.get(f"/jobs/{external_id}").json_body["usage"]["total_tokens"]
    database.run("INSERT INTO tenant_quotas (tenant, tokens_per_day) VALUES ('tenant-a', :n)", n=spent)
    assert api.post("/jobs", {"title": "T", "brief": "B"}).status_code == 429
    assert api.delete(f"/jobs/{external_id}").status_code == 202
    refused = api.post("/jobs", {"title": "T", "brief": "B"})
    assert refused.status_code == 429 and refused.json_body["error"]["code"] == "quota_exceeded"
