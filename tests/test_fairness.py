"""Fair shares between tenants: a tenant's running jobs are capped across every consumer, its
other jobs wait aside (by priority, then age) and take its slots as they free, so another
tenant's job starts at once. Real Postgres and Redis, the fake provider, the real consumer."""

from __future__ import annotations

import threading

import pytest
from conftest import API_KEY, OTHER_KEY, wait_for

from rtqcc.bus.work_queue import GROUP, STREAM, WAITING_TENANTS, waiting_key
from rtqcc.store.leases import TenantAtCapacity

SMALL = {"outline": [{"title": "One"}, {"title": "Two"}], "params": {"max_tokens_per_section": 40}}
CAPPED = {"max_running_per_tenant": 2, "max_in_flight": 8, "fake_tokens_per_s": 200.0}


def started_at(database, external_ids) -> dict[str, object]:
    rows = database.rows("SELECT external_id, started_at FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))",
                         e=list(external_ids))
    return {row["external_id"]: row["started_at"] for row in rows}


def running_of(database, tenant: str) -> int:
    return database.row("SELECT COUNT(*)::int AS n FROM jobs WHERE tenant = :t AND status = 'running'", t=tenant)["n"]


def all_completed(database, external_ids) -> bool:
    rows = database.rows("SELECT status FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))", e=list(external_ids))
    return len(rows) == len(external_ids) and {row["status"] for row in rows} == {"completed"}


def test_a_tenant_at_its_cap_waits_aside_while_another_tenants_job_runs_at_once(
        make_api, start_consumer, database, redis_client):
    api, _ = make_api(**CAPPED)
    flood = [api.create(**SMALL) for _ in range(6)]
    for external_id in flood:
        api.post(f"/jobs/{external_id}/start")
    lone = api.as_key(OTHER_KEY).create(**SMALL)
    api.as_key(OTHER_KEY).post(f"/jobs/{lone}/start")  # behind tenant A's six on the queue

    most_running = [0]
    done = threading.Event()

    def watch() -> None:  # tenant A's running jobs, seen from Postgres while the consumer works
        while not done.is_set():
            most_running[0] = max(most_running[0], running_of(database, "tenant-a"))
            done.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    consumer = start_consumer(budget_s=60, consumer_idle_exit_ms=0, **CAPPED)
    try:
        wait_for(lambda: all_completed(database, [*flood, lone]), timeout_s=45, interval_s=0.05,
                 what="every job to complete")
    finally:
        done.set()
        consumer.consumer.shut_down()
    result = consumer.join()
    watcher.join(5)

    starts = started_at(database, [*flood, lone])
    a_starts = sorted(starts[e] for e in flood)
    assert starts[lone] < a_starts[2], "tenant B's job waited behind tenant A's capped ones"
    assert most_running[0] <= 2, f"tenant A ran {most_running[0]} jobs at once, its cap is 2"
    assert result.parked >= 4 and result.completed == 7, result
    assert redis_client.zcard(waiting_key("tenant-a")) == 0
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0


def test_a_tenants_waiting_jobs_take_its_slot_by_priority_then_age(make_api, start_consumer, database, redis_client):
    api, _ = make_api(max_running_per_tenant=1, max_in_flight=4, fake_tokens_per_s=200.0)
    first = api.create(**SMALL)
    api.post(f"/jobs/{first}/start")
    consumer = start_consumer(budget_s=60, consumer_idle_exit_ms=0, max_running_per_tenant=1, max_in_flight=4,
                              fake_tokens_per_s=40.0)  # the first job runs long enough for the rest to queue
    try:
        wait_for(lambda: running_of(database, "tenant-a") == 1, what="the first job to run")
        later = {}
        for priority in ("low", "normal", "high", "normal"):
            external_id = api.create(priority=priority, **SMALL)
            api.post(f"/jobs/{external_id}/start")
            later.setdefault(priority, []).append(external_id)
        waiting = [*later["low"], *later["normal"], *later["high"]]
        wait_for(lambda: redis_client.zcard(waiting_key("tenant-a")) == 4, what="the four to wait aside")

        queued = api.get(f"/jobs/{later['low'][0]}").json_body
        assert queued["status"] == "queued" and queued["priority"] == "low"
        assert queued["queue"] == {"waiting_for": "tenant_cap", "position": 4, "running": 1, "cap": 1}
        assert api.get(f"/jobs/{later['high'][0]}").json_body["queue"]["position"] == 1

        wait_for(lambda: all_completed(database, [first, *waiting]), timeout_s=45, interval_s=0.05,
                 what="every job to complete")
    finally:
        consumer.consumer.shut_down()
    consumer.join()
    starts = started_at(database, [first, *waiting])
    assert sorted(starts, key=starts.get) == [first, *later["high"], *later["normal"], *later["low"]]


def test_a_waiting_job_cancelled_or_paused_leaves_the_line_and_the_freed_slot_goes_to_the_next(
        make_api, start_consumer, database, redis_client):
    # The longest lease: a consumer puts waiting jobs back on its own only every half lease, so
    # here only the promotion at the end of a run can start the last job.
    capped = {"max_running_per_tenant": 1, "max_in_flight": 4, "lease_ttl_s": 100.0}
    api, _ = make_api(**capped)
    holding = api.create(outline=[{"title": "Long"}], params={"max_tokens_per_section": 4000})
    api.post(f"/jobs/{holding}/start")
    with start_consumer(budget_s=60, consumer_idle_exit_ms=0, fake_tokens_per_s=40.0, **capped):
        wait_for(lambda: running_of(database, "tenant-a") == 1, what="the first job to run")
        cancelled, paused, last = (api.create(**SMALL) for _ in range(3))
        for external_id in (cancelled, paused, last):
            api.post(f"/jobs/{external_id}/start")
        wait_for(lambda: redis_client.zcard(waiting_key("tenant-a")) == 3, what="the three to wait aside")
        assert api.get(f"/jobs/{last}").json_body["queue"]["position"] == 3

        assert api.post(f"/jobs/{cancelled}/cancel").json_body["status"] == "cancelled"
        assert api.post(f"/jobs/{paused}/pause").json_body["status"] == "paused"
        assert redis_client.zrange(waiting_key("tenant-a"), 0, -1) == [last]
        assert api.get(f"/jobs/{last}").json_body["queue"]["position"] == 1

        api.post(f"/jobs/{holding}/cancel")  # its run ends, and its slot goes to the last job
        wait_for(lambda: all_completed(database, [last]), timeout_s=30, interval_s=0.05,
                 what="the last job to take the freed slot and complete")
    assert redis_client.exists(waiting_key("tenant-a"), WAITING_TENANTS) == 0


def test_consumers_racing_for_a_tenants_last_slots_take_exactly_its_cap(api, services):
    """Eight consumers take eight jobs of one tenant at the same moment, under a cap of 2: two
    leases are taken, the six others are told the tenant is at capacity (each with its job),
    whatever the interleaving of their statements."""
    jobs = [api.create(**SMALL) for _ in range(8)]
    for external_id in jobs:
        api.post(f"/jobs/{external_id}/start")
    together = threading.Barrier(len(jobs))
    taken, refused = [], []

    def take(n: int, external_id: str) -> None:
        together.wait()
        try:
            job, lease = services.jobs.take_for_run(external_id, f"consumer-{n}", 60, lambda tier: 2)
            taken.append((job.external_id, lease))
        except TenantAtCapacity as full:
            refused.append((full.job.external_id, full.running, full.cap))

    racers = [threading.Thread(target=take, args=(n, e)) for n, e in enumerate(jobs)]
    for racer in racers:
        racer.start()
    for racer in racers:
        racer.join(30)
    assert len(taken) == 2 and all(lease is not None for _, lease in taken), taken
    assert sorted(e for e, _, _ in refused) == sorted(set(jobs) - {e for e, _ in taken})
    assert {(running, cap) for _, running, cap in refused} == {(2, 2)}


def test_a_queued_job_not_held_by_a_cap_says_it_waits_for_a_consumer(api):
    external_id = api.create(**SMALL)
    api.post(f"/jobs/{external_id}/start")
    assert api.get(f"/jobs/{external_id}").json_body["queue"] == {"waiting_for": "consumer"}
    assert "queue" not in api.get(f"/jobs/{api.create(**SMALL)}").json_body  # created, not queued


@pytest.mark.parametrize("cap", [1, None])
def test_a_job_left_waiting_aside_is_put_back_by_the_next_consumer(cap, api, services, run_consumer, make_services,
                                                                   redis_client):
    """Its promotion was lost (the consumer that ran the tenant's last job died before putting the
    next one back): the next consumer finds the tenant has a free slot and puts it back first.
    With the cap lifted since, every waiting job goes back. Redis restarted meanwhile, and lost
    the scripts that promote: they are loaded again."""
    external_id = api.create(**SMALL)
    api.post(f"/jobs/{external_id}/start")
    queue = services.queue
    queue.ensure_group()
    [delivery] = queue.read("consumer-that-died", count=1, block_ms=100)
    queue.park_then_ack("tenant-a", external_id, delivery.message_id, rank=1, created_ms=0, now_ms=0)
    redis_client.script_flush()

    result = run_consumer(services=make_services(max_running_per_tenant=cap))
    assert result.completed == 1
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"


def test_a_keys_tier_sets_the_running_cap_of_the_jobs_it_creates(make_api, services, start_consumer, database):
    """A key of tier `free` (cap 1) and a stored key of tier `pro` (cap 3), one tenant each:
    each tenant's running jobs stay within its key's tier, and every job completes."""
    tiers = {"tier_max_running": {"free": 1, "pro": 3}, "max_running_per_tenant": None, "max_in_flight": 8,
             "fake_tokens_per_s": 200.0}
    api, _ = make_api(api_key_tiers={API_KEY: "free"}, **tiers)
    pro = api.as_key(services.api_keys.create("tenant-pro", tier="pro").key)
    free_jobs, pro_jobs = [api.create(**SMALL) for _ in range(3)], [pro.create(**SMALL) for _ in range(5)]
    for client, ids in ((api, free_jobs), (pro, pro_jobs)):
        for external_id in ids:
            client.post(f"/jobs/{external_id}/start")
    assert database.row("SELECT tier FROM jobs WHERE external_id = :e", e=pro_jobs[0])["tier"] == "pro"

    most = {"tenant-a": 0, "tenant-pro": 0}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for tenant in most:
                most[tenant] = max(most[tenant], running_of(database, tenant))
            done.wait(0.005)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    consumer = start_consumer(budget_s=60, consumer_idle_exit_ms=0, **tiers)
    try:
        wait_for(lambda: all_completed(database, free_jobs + pro_jobs), timeout_s=45, interval_s=0.05,
                 what="every job to complete")
    finally:
        done.set()
        consumer.consumer.shut_down()
    consumer.join()
    watcher.join(5)
    assert most["tenant-a"] == 1 and 1 < most["tenant-pro"] <= 3, most


def test_tiers_are_read_from_the_keys_and_their_caps_and_a_bad_entry_names_its_variable():
    from rtqcc.errors import ConfigError
    from rtqcc.settings import Settings

    settings = Settings.from_env({"RTQCC_API_KEYS": "k1:acme:free,k2:acme", "RTQCC_TIER_MAX_RUNNING": "free=2, pro=0"})
    assert settings.api_keys == {"k1": "acme", "k2": "acme"} and settings.api_key_tiers == {"k1": "free"}
    assert (settings.running_cap("free"), settings.running_cap("pro"), settings.running_cap(None),
            settings.running_cap("unknown")) == (2, None, 32, 32)
    assert settings.widest_running_cap is None  # pro runs uncapped
    for name, value in (("RTQCC_TIER_MAX_RUNNING", "free"), ("RTQCC_TIER_MAX_RUNNING", "free=lots"),
                        ("RTQCC_API_KEYS", "k1:acme:free:extra")):
        with pytest.raises(ConfigError, match=name):
            Settings.from_env({name: value})
