"""Server-Sent Events: snapshot first, exact replay from Last-Event-ID, both gateway modes."""

from __future__ import annotations

import threading

from conftest import job_events, parse_sse, wait_for

from rtqcc.bus.events import events_key, stream_id_tuple
from rtqcc.store.jobs import NewJob
from rtqcc.streaming.stream import HEARTBEAT, JobEventStream


def _finished_job(api, run_consumer, **fields):
    external_id = api.create(section_count=2, **fields)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 1
    return external_id


def test_a_new_client_gets_a_snapshot_from_postgres_then_done_for_a_finished_job(api, run_consumer, redis_client):
    external_id = _finished_job(api, run_consumer)
    response = api.get(f"/jobs/{external_id}/stream")
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/event-stream")
    body = response.body.decode()
    assert body.startswith("retry: ")
    events = parse_sse(body)
    assert [e["event"] for e in events] == ["snapshot", "done"]
    snapshot = events[0]["data"]
    assert snapshot["status"] == "completed"
    assert snapshot["progress"] == {"sections_total": 2, "sections_done": 2}
    assert events[0]["id"] == job_events(redis_client, external_id)[-1]["id"]
    assert events[1]["data"] == {"status": "completed"}


def test_a_reconnect_with_last_event_id_gets_exactly_the_missed_events(api, run_consumer, redis_client):
    external_id = _finished_job(api, run_consumer)
    published = job_events(redis_client, external_id)
    assert len(published) > 6
    seen = published[3]
    response = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": seen["id"]})
    assert parse_sse(response.body.decode()) == published[4:]
    assert published[-1]["event"] == "done"


def test_a_client_that_saw_done_is_told_to_stop_reconnecting(api, run_consumer, redis_client):
    external_id = _finished_job(api, run_consumer)
    last = job_events(redis_client, external_id)[-1]
    response = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": last["id"]})
    assert response.status_code == 204


def test_buffered_long_polls_deliver_a_live_job_completely_and_nothing_twice(api, start_consumer, redis_client):
    external_id = api.create(section_count=2, params={"max_tokens_per_section": 60})
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(fake_tokens_per_s=300.0)

    received, last_id, polls = [], None, 0
    while not received or received[-1]["event"] != "done":
        headers = {"Last-Event-ID": last_id} if last_id else {}
        response = api.get(f"/jobs/{external_id}/stream", headers=headers)
        assert response.status_code == 200
        batch = parse_sse(response.body.decode())
        received.extend(batch)
        last_id = batch[-1]["id"] if batch else last_id
        polls += 1
        assert polls < 500
    consumer.join()

    assert received[0]["event"] == "snapshot"
    published = job_events(redis_client, external_id)
    after_snapshot = [e for e in published if stream_id_tuple(e["id"]) > stream_id_tuple(received[0]["id"])]
    assert received[1:] == after_snapshot
    assert polls > 2  # it really took several answers
    deltas = "".join(e["data"]["text"] for e in received if e["event"] == "section.delta" and e["data"]["index"] == 0)
    content = api.get(f"/jobs/{external_id}/sections/0").json_body["content"]
    assert deltas == content


def test_streaming_mode_delivers_tokens_as_they_happen(api, services, start_consumer):
    external_id = api.create(section_count=1, params={"max_tokens_per_section": 120})
    job = services.jobs.get("tenant-a", external_id)
    api.post(f"/jobs/{external_id}/start")
    frames = JobEventStream(services.events, services.jobs, job, None).frames(heartbeat_s=0.5)
    received = []

    def read_all():
        for frame in frames:
            received.extend(parse_sse(frame))

    reader = threading.Thread(target=read_all, daemon=True)
    reader.start()
    consumer = start_consumer(fake_tokens_per_s=200.0)
    # The first token reaches the client while the section is still being written.
    wait_for(lambda: any(e["event"] == "section.delta" for e in received), what="a token event")
    assert not any(e["event"] == "section.completed" for e in received)
    consumer.join()
    reader.join(10)
    assert not reader.is_alive(), "the stream did not end after done"
    kinds = [e["event"] for e in received]
    assert kinds[0] == "snapshot" and kinds[-1] == "done"
    assert kinds.index("outline") < kinds.index("section.started") < kinds.index("section.delta") < kinds.index("section.completed")


def test_an_idle_stream_sends_heartbeats(api, services):
    external_id = api.create(section_count=1)
    job = services.jobs.get("tenant-a", external_id)
    frames = JobEventStream(services.events, services.jobs, job, None).frames(heartbeat_s=0.2)
    assert parse_sse(next(frames))[0]["event"] == "snapshot"
    assert next(frames) == HEARTBEAT


def test_a_buffered_poll_on_an_idle_job_answers_with_a_heartbeat_after_the_poll_time(api):
    external_id = api.create(section_count=1)
    first = api.get(f"/jobs/{external_id}/stream")
    snapshot = parse_sse(first.body.decode())[0]
    again = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": snapshot["id"]})
    assert again.status_code == 200
    assert parse_sse(again.body.decode()) == []
    assert ": keep-alive" in again.body.decode()


def test_an_entry_that_is_not_an_event_is_passed_over_as_a_position_in_both_gateway_modes(api, services,
                                                                                          redis_client):
    external_id = api.create(section_count=1)
    snapshot = parse_sse(api.get(f"/jobs/{external_id}/stream").body.decode())[0]
    foreign = redis_client.xadd(events_key(external_id), {"note": "written by hand"})

    # Buffered: the answer is the entry's id alone, so the next poll starts after it.
    answer = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": snapshot["id"]}).body.decode()
    assert f"id: {foreign}\n\n" in answer and parse_sse(answer) == []
    published = services.events.publish(external_id, "status", {"status": "queued"})
    answer = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": foreign}).body.decode()
    assert [(e["id"], e["event"]) for e in parse_sse(answer)] == [(published, "status")]

    # Streaming: the id goes by, the events after it follow.
    job = services.jobs.get("tenant-a", external_id)
    frames = JobEventStream(services.events, services.jobs, job, snapshot["id"]).frames(heartbeat_s=5)
    assert next(frames) == f"id: {foreign}\n\n"
    assert parse_sse(next(frames)) == [{"id": published, "event": "status", "data": {"status": "queued"}}]


def test_a_position_lost_to_trimming_restarts_from_a_snapshot(api, run_consumer, redis_client):
    external_id = _finished_job(api, run_consumer)
    published = job_events(redis_client, external_id)
    redis_client.xtrim(f"job:{external_id}:events", maxlen=2, approximate=False)
    response = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": published[1]["id"]})
    assert [e["event"] for e in parse_sse(response.body.decode())] == ["snapshot", "done"]


def test_a_malformed_last_event_id_is_a_400(api):
    external_id = api.create()
    response = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": "yesterday"})
    assert response.status_code == 400
    assert "Last-Event-ID" in response.json_body["error"]["message"]


def test_an_idle_stream_outlives_the_redis_clients_default_read_timeout(settings, database, blob_store):
    """redis-py cuts socket reads after 5 s by default: an idle SSE wait must not be cut."""
    from rtqcc.services import Services

    services = Services(settings.with_overrides(sse_heartbeat_s=6.0), db=database, blobs=blob_store)
    try:
        job = services.jobs.create(NewJob(
            tenant="tenant-a", title="Idle", brief="b", model="m", outline=None, section_count=1,
            params={}, budget={}, metadata={}))
        frames = JobEventStream(services.events, services.jobs, job, None).frames(heartbeat_s=6.0)
        assert parse_sse(next(frames))[0]["event"] == "snapshot"
        assert next(frames) == HEARTBEAT  # after a 6 s blocking read on the Services' own client
    finally:
        services.redis.close()
