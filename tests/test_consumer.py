"""The consumer function: timed batches, leases, fencing and concurrent consumers."""

from __future__ import annotations

import time
from typing import Callable

import pytest
from conftest import job_events

from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.errors import LeaseLost
from rtqcc.bus.work_queue import GROUP, STREAM
from rtqcc.writing import tokens
from rtqcc.writing.providers.fake import FakeProvider


def _sections(database, external_id):
    return database.rows(
        "SELECT s.idx, s.status, s.written_version, s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id"
        " WHERE j.external_id = :e ORDER BY s.idx", e=external_id)


def _completed_attempts(database, external_id):
    return database.rows(
        "SELECT a.section_idx, COUNT(*)::int AS n FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
        " WHERE j.external_id = :e AND a.finish_reason IS NOT NULL AND a.section_idx IS NOT NULL"
        " GROUP BY a.section_idx ORDER BY a.section_idx", e=external_id)


def _sections_done(database, external_id) -> int:
    return sum(row["status"] == "done" for row in _sections(database, external_id))


class BudgetSpentWhen:
    """A consumer's clock that keeps time.monotonic's pace until `spent()` first holds, then runs an
    hour ahead: the invocation's budget runs out at a point of the job, not of the wall clock."""

    def __init__(self, spent: Callable[[], bool]):
        self._spent = spent
        self._jumped = False

    def __call__(self) -> float:
        self._jumped = self._jumped or self._spent()
        return time.monotonic() + (3600.0 if self._jumped else 0.0)


def test_the_group_is_created_on_start_up_and_an_existing_one_is_fine(services, run_consumer, redis_client):
    run_consumer(budget_s=0.5)
    run_consumer(budget_s=0.5)  # BUSYGROUP the second time: not an error
    groups = redis_client.xinfo_groups(STREAM)
    assert [g["name"] for g in groups] == [GROUP]


def test_a_budget_that_runs_out_mid_job_is_finished_by_the_next_invocation(api, run_consumer, make_services, database):
    fields = {"section_count": 3, "params": {"max_tokens_per_section": 100}}
    reference = api.create(**fields)
    api.post(f"/jobs/{reference}/start")
    run_consumer()

    external_id = api.create(**fields)
    api.post(f"/jobs/{external_id}/start")
    slow = make_services(fake_tokens_per_s=200.0)  # ~0.5 s a section
    # The invocation's time runs out as soon as the first section is done, whatever the machine's pace.
    clock = BudgetSpentWhen(lambda: _sections_done(database, external_id) >= 1)
    first = Consumer(slow, name="consumer-1", clock=clock).drain(TimeBudget(60).get_remaining_time_in_millis)
    assert first.requeued == 1 and first.completed == 0
    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "queued"
    assert 0 < job["progress"]["sections_done"] < 3

    assert run_consumer(services=slow).completed == 1  # the next invocation, with time to spare, finishes it
    reference_text = api.get(f"/jobs/{reference}/manuscript").body
    assert api.get(f"/jobs/{external_id}/manuscript").body == reference_text
    assert [row["n"] for row in _completed_attempts(database, external_id)] == [1, 1, 1]


def test_the_consumer_checkpoints_its_position_and_counters(api, run_consumer, database):
    for _ in range(2):
        external_id = api.create(section_count=1)
        api.post(f"/jobs/{external_id}/start")
    result = run_consumer(name="consumer-7")
    checkpoint = database.row("SELECT * FROM consumer_checkpoints WHERE consumer_name = 'consumer-7'")
    assert checkpoint["processed"] == result.processed == 2
    assert checkpoint["last_stream_id"] == result.last_id
    assert checkpoint["invocations"] == 1


def test_two_consumers_at_once_never_write_a_section_twice(api, start_consumer, database, redis_client):
    ids = []
    for n in range(4):
        ids.append(api.create(title=f"Book {n}", section_count=3, params={"max_tokens_per_section": 60}))
        api.post(f"/jobs/{ids[-1]}/start")
        api.post(f"/jobs/{ids[-1]}/start")  # duplicate messages make the race likelier
    first = start_consumer(name="consumer-a", fake_tokens_per_s=600.0)
    second = start_consumer(name="consumer-b", fake_tokens_per_s=600.0)
    results = [first.join(), second.join()]
    assert sum(r.completed for r in results) == 4
    for external_id in ids:
        assert [row["status"] for row in _sections(database, external_id)] == ["done"] * 3
        assert [row["n"] for row in _completed_attempts(database, external_id)] == [1, 1, 1]
        completed_events = [e for e in job_events(redis_client, external_id) if e["event"] == "section.completed"]
        assert sorted(e["data"]["index"] for e in completed_events) == [0, 1, 2]


def test_a_consumer_that_lost_its_lease_cannot_write(api, services, database):
    external_id = api.create(outline=[{"title": "Only"}])
    api.post(f"/jobs/{external_id}/start")
    jobs = services.jobs
    stale = jobs.take_for_run(external_id, "consumer-old", ttl_s=5)[1]
    database.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE external_id = :e", e=external_id)
    fresh = jobs.take_for_run(external_id, "consumer-new", ttl_s=5)[1]
    assert fresh is not None and fresh.version == stale.version + 1

    with pytest.raises(LeaseLost):
        jobs.complete_section(stale, 0, version=1, key="k", sha256="x", chars=1, attempts=[], start_next=[],
                              made_with={})
    with pytest.raises(LeaseLost):
        jobs.save_partial(stale, 0, "stale text")
    assert jobs.release_lease(stale) is None
    assert jobs.complete_section(fresh, 0, version=1, key="k", sha256="x", chars=1, attempts=[], start_next=[],
                                 made_with={})["attempts"] == 0
    assert [row["written_version"] for row in _sections(database, external_id)] == [fresh.version]


def test_a_live_lease_cannot_be_taken(api, services):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    assert services.jobs.take_for_run(external_id, "consumer-a", ttl_s=30)[1] is not None
    assert services.jobs.take_for_run(external_id, "consumer-b", ttl_s=30)[1] is None


def test_a_crashed_consumers_message_is_reclaimed_after_its_lease_expires(api, make_services, database, redis_client):
    external_id = api.create(section_count=2)
    api.post(f"/jobs/{external_id}/start")
    services = make_services()
    # The crashed consumer read the message and took the lease, then died.
    services.queue.ensure_group()
    [delivery] = services.queue.read("consumer-dead", count=1, block_ms=100)
    assert services.jobs.take_for_run(external_id, "consumer-dead", ttl_s=5)[1] is not None
    database.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE external_id = :e", e=external_id)

    survivor = Consumer(make_services(lease_ttl_s=1.0), name="consumer-alive")
    redis_client.xclaim(STREAM, GROUP, "consumer-dead", 0, [delivery.message_id], idle=2000, justid=True)
    result = survivor.drain(TimeBudget(10).get_remaining_time_in_millis)
    assert result.completed == 1
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 0


def test_a_message_claimed_before_the_dead_consumers_lease_expires_is_kept_not_dropped(
        api, make_services, database, redis_client):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    services = make_services()
    services.queue.ensure_group()
    [delivery] = services.queue.read("consumer-dead", count=1, block_ms=100)
    assert services.jobs.take_for_run(external_id, "consumer-dead", ttl_s=30)[1] is not None  # still live
    redis_client.xclaim(STREAM, GROUP, "consumer-dead", 0, [delivery.message_id], idle=5000, justid=True)

    survivor = Consumer(make_services(lease_ttl_s=1.0), name="consumer-alive")
    early = survivor.drain(TimeBudget(0.5).get_remaining_time_in_millis)
    assert early.skipped == 1 and early.processed == 0
    assert redis_client.xpending(STREAM, GROUP)["pending"] == 1  # the job's only message is still there

    database.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE external_id = :e", e=external_id)
    redis_client.xclaim(STREAM, GROUP, "consumer-alive", 0, [delivery.message_id], idle=5000, justid=True)
    assert survivor.drain(TimeBudget(5).get_remaining_time_in_millis).completed == 1


def test_runs_waiting_on_their_streams_give_their_turn_so_more_run_than_there_are_busy_turns(
        api, run_consumer, make_services, database):
    # One turn for a run's own work: each run gives it up while its sections stream, so all four
    # stream at once instead of one after another, and a job written in parallel still finishes.
    ids = [api.create(title=f"Turns {n}", section_count=2, params={"max_tokens_per_section": 60}) for n in range(3)]
    ids.append(api.create(title="Turns in parallel", section_count=4,
                          params={"max_tokens_per_section": 60, "parallel_sections": 2}))
    for external_id in ids:
        api.post(f"/jobs/{external_id}/start")
    result = run_consumer(services=make_services(consumer_busy_runs=1, max_in_flight=4, fake_tokens_per_s=100.0))
    assert result.completed == 4
    times = database.rows("SELECT started_at, finished_at FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))", e=ids)
    assert max(row["started_at"] for row in times) < min(row["finished_at"] for row in times)


def test_the_models_token_tables_are_built_before_the_first_run_not_in_the_middle_of_one(
        api, run_consumer, make_services, settings):
    # Building them holds the GIL for about a fifth of a second: mid-run, every stream of the process
    # and the pause or cancel of any of its jobs would wait behind it.
    external_id = api.create(section_count=1, params={"max_tokens_per_section": 30})
    api.post(f"/jobs/{external_id}/start")
    assert tokens.tokenizer_for(settings.default_model).exact, "the default model must have shipped tables"
    tokens._build_encoding.cache_clear()
    tokens.tokenizer_for.cache_clear()  # as in a process that has counted nothing yet
    built_when_streaming = []

    class Observing(FakeProvider):
        def stream(self, request, abort, on_delta, on_wait=None):
            built_when_streaming.append(tokens._build_encoding.cache_info().currsize)
            return super().stream(request, abort, on_delta, on_wait)

    assert run_consumer(services=make_services(provider=Observing())).completed == 1
    assert built_when_streaming[0] == 1  # the outline's call, the first of the run
