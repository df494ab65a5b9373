"""The sweeper puts back on the queue what Postgres says should run, after Redis lost it."""

from __future__ import annotations

from rtqcc.run.sweeper import sweep


def test_after_redis_loses_everything_the_sweeper_requeues_runnable_jobs(api, services, redis_client, run_consumer):
    queued = [api.create(title=f"Job {n}", section_count=1) for n in range(2)]
    for external_id in queued:
        api.post(f"/jobs/{external_id}/start")
    untouched = api.create(title="never started")
    redis_client.flushdb()  # a Redis restart without persistence

    result = sweep(services)
    assert result.queue_was_lost
    assert sorted(result.requeued) == sorted(queued)
    assert run_consumer().completed == 2
    assert api.get(f"/jobs/{untouched}").json_body["status"] == "created"


def test_a_running_job_whose_consumer_vanished_is_requeued_but_a_live_one_is_not(api, services, database):
    orphan, alive = api.create(section_count=1), api.create(section_count=1)
    for external_id in (orphan, alive):
        api.post(f"/jobs/{external_id}/start")
        services.jobs.take_for_run(external_id, "consumer-x", ttl_s=30)[1]
    database.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE external_id = :e", e=orphan)
    assert sweep(services).requeued == [orphan]


def test_recently_queued_jobs_are_left_to_the_queue(api, services):
    assert sweep(services).queue_was_lost  # a fresh Redis: nothing known about the queue yet
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    assert sweep(services).requeued == []
    assert sweep(services, queued_stale_after_s=0).requeued == [external_id]


def test_redis_loss_is_seen_even_when_a_consumer_recreated_the_queue_first(api, services, redis_client):
    assert not sweep(services).requeued
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    redis_client.flushdb()
    services.queue.ensure_group()  # a consumer reconnects before the sweeper runs
    result = sweep(services)
    assert result.queue_was_lost and result.requeued == [external_id]
