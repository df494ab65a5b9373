"""Pause, resume and cancel reach a running section mid-stream."""

from __future__ import annotations

import pytest

from conftest import job_events, section_texts, wait_for

from rtqcc.writing.tokens import count_tokens

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]
SLOW = {"fake_tokens_per_s": 150.0}


def _reference_texts(api, run_consumer, **fields):
    """The same job run without interruption: what every interrupted run must end up with."""
    reference = api.create(**fields)
    api.post(f"/jobs/{reference}/start")
    assert run_consumer().completed == 1
    return section_texts(api, reference)


def _first_delta(redis_client, external_id, timeout_s=10.0):
    return wait_for(lambda: [e for e in job_events(redis_client, external_id) if e["event"] == "section.delta"],
                    timeout_s=timeout_s, what="the first token event")


def test_pause_mid_section_then_resume_writes_each_section_once(api, run_consumer, start_consumer, redis_client, database):
    fields = {"outline": OUTLINE, "params": {"max_tokens_per_section": 150}}
    expected = _reference_texts(api, run_consumer, **fields)

    external_id = api.create(**fields)
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(**SLOW)
    _first_delta(redis_client, external_id)

    paused = api.post(f"/jobs/{external_id}/pause")
    assert paused.status_code == 202
    assert paused.json_body["status"] == "paused"
    result = consumer.join()
    assert result.stopped == 1

    partial = database.row(
        "SELECT s.status, s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id"
        " WHERE j.external_id = :e AND s.idx = 0", e=external_id)
    assert partial["status"] == "pending"
    assert 0 < len(partial["partial_text"]) < len(expected[0])
    assert expected[0].startswith(partial["partial_text"])
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "paused"

    assert api.post(f"/jobs/{external_id}/resume").json_body["status"] == "queued"
    assert run_consumer().completed == 1

    assert section_texts(api, external_id) == expected
    manuscript = api.get(f"/jobs/{external_id}/manuscript").body.decode()
    for title, text in zip(("Beginnings", "Endings"), expected):
        assert manuscript.count(f"## {title}") == 1
        assert manuscript.count(text.strip()) == 1
    # No token generated twice: the aborted attempt and its continuation add up to the text.
    attempts = database.rows(
        "SELECT a.counted_completion_tokens, a.aborted, a.finish_reason FROM generation_attempts a"
        " JOIN jobs j ON j.id = a.job_id WHERE j.external_id = :e AND a.section_idx = 0 ORDER BY a.id",
        e=external_id)
    assert [(a["aborted"], a["finish_reason"]) for a in attempts] == [("pause", None), (None, "stop")]
    assert sum(a["counted_completion_tokens"] for a in attempts) == count_tokens(expected[0], "gpt-4o-mini")


def test_the_paused_section_is_billed_by_local_count_and_flagged_estimated(api, start_consumer, redis_client):
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 150})
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(**SLOW)
    _first_delta(redis_client, external_id)
    api.post(f"/jobs/{external_id}/pause")
    consumer.join()
    usage = api.get(f"/jobs/{external_id}").json_body["sections"][0]["usage"]
    assert usage["estimated"] is True
    assert usage["reported"]["completion_tokens"] is None
    assert usage["completion_tokens"] == usage["counted"]["completion_tokens"] > 0


def test_cancel_mid_section_stops_the_stream_and_ends_cancelled(api, start_consumer, redis_client, database):
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 300})
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(**SLOW)
    _first_delta(redis_client, external_id)

    cancelled = api.post(f"/jobs/{external_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json_body["status"] == "cancelled"
    result = consumer.join()
    assert result.stopped == 1 and result.completed == 0

    assert api.get(f"/jobs/{external_id}").json_body["status"] == "cancelled"
    aborted = database.row(
        "SELECT a.aborted FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
        " WHERE j.external_id = :e AND a.section_idx = 0", e=external_id)
    assert aborted["aborted"] == "cancel"
    events = [e["event"] for e in job_events(redis_client, external_id)]
    assert events.count("done") == 1
    assert "section.completed" not in events
    assert api.get(f"/jobs/{external_id}/manuscript").status_code == 409


def test_cancel_before_a_consumer_runs_it_means_it_never_runs(api, run_consumer):
    external_id = api.create(section_count=2)
    api.post(f"/jobs/{external_id}/start")
    api.post(f"/jobs/{external_id}/cancel")
    result = run_consumer()
    assert result.skipped == 1 and result.completed == 0
    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "cancelled"
    assert job["usage"]["total_tokens"] == 0


def test_impossible_transitions_are_409_with_a_reason(api, run_consumer):
    external_id = api.create(section_count=1)
    response = api.post(f"/jobs/{external_id}/resume")
    assert response.status_code == 409
    assert response.json_body["error"] == {
        "code": "invalid_transition",
        "message": f"Cannot resume job {external_id}: it is created; only a paused job can be resumed.",
    }
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    for verb in ("start", "pause", "resume", "cancel"):
        refused = api.post(f"/jobs/{external_id}/{verb}")
        assert refused.status_code == 409, verb
        assert "it is completed" in refused.json_body["error"]["message"]


def test_a_paused_queued_job_is_not_run_until_resumed(api, run_consumer):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    api.post(f"/jobs/{external_id}/pause")
    assert run_consumer().completed == 0
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "paused"
    api.post(f"/jobs/{external_id}/resume")
    assert run_consumer().completed == 1


@pytest.mark.parametrize("verb", ["pause", "cancel"])
def test_control_reaches_the_running_stream_through_redis_not_the_postgres_poll(api, start_consumer, redis_client,
                                                                              database, verb):
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 2000})
    api.post(f"/jobs/{external_id}/start")
    # Postgres is polled once as the run starts, then an hour later: within the wait below, only
    # the message on Redis can stop the stream.
    consumer = start_consumer(fake_tokens_per_s=100.0, control_poll_s=3600.0)
    _first_delta(redis_client, external_id)
    api.post(f"/jobs/{external_id}/{verb}")
    wait_for(lambda: database.row(
        "SELECT COUNT(*)::int AS n FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
        " WHERE j.external_id = :e AND a.aborted IS NOT NULL", e=external_id)["n"], timeout_s=20,
        what=f"the {verb} to stop the provider stream")
    consumer.consumer.shut_down()
    consumer.join()


def test_pausing_one_job_among_a_hundred_in_flight_stops_its_stream_alone(api, start_consumer, database, redis_client):
    """One consumer runs a hundred jobs at once; a pause reaches the one job it names through the
    consumer's single control subscription, its stream stops and keeps its text, and the other
    ninety-nine go on streaming."""
    ids = [api.create(outline=[{"title": "Long"}], params={"max_tokens_per_section": 4000}) for _ in range(100)]
    for external_id in ids:
        api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(budget_s=120, fake_tokens_per_s=20.0, max_in_flight=100, max_running_per_tenant=None,
                              control_poll_s=3600.0)  # Postgres polling is not what stops it
    running = lambda: database.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status = 'running'")["n"]  # noqa: E731
    try:
        wait_for(lambda: running() == 100, timeout_s=60, interval_s=0.1, what="all hundred to run")
        paused, others = ids[37], [e for e in ids if e != ids[37]]
        _first_delta(redis_client, paused, timeout_s=30)  # a pause before any token would keep no text
        assert api.post(f"/jobs/{paused}/pause").status_code == 202
        wait_for(lambda: database.row(
            "SELECT COUNT(*)::int AS n FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
            " WHERE j.external_id = :e AND a.aborted = 'pause'", e=paused)["n"] == 1,
            timeout_s=20, what="the paused job's stream to stop")
        before = {e: redis_client.xlen(f"job:{e}:events") for e in others}
        wait_for(lambda: all(redis_client.xlen(f"job:{e}:events") > before[e] for e in others), timeout_s=30,
                 interval_s=0.1, what="every other job to go on streaming")
        assert running() == 99
        partial = database.row("SELECT s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id"
                               " WHERE j.external_id = :e", e=paused)["partial_text"]
        assert partial, "the paused stream's text was not kept"
    finally:
        for external_id in ids:
            api.post(f"/jobs/{external_id}/cancel")
    result = consumer.join(60)
    assert result.stopped == 100  # one paused, ninety-nine cancelled
    assert {row["status"] for row in database.rows(
        "SELECT status FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))", e=others)} == {"cancelled"}
