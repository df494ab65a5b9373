"""A job's events: each one on the pub/sub channel `job:{externalId}:events` (outside subscribers
rely on it) with the id of its stream entry, resumable from `lastEventId` or `last_event_id`, and
the text a stalled provider already sent published on time, not held back; one flusher carrying
every open section's deltas, in order, through an outage."""

from __future__ import annotations

import json
import socket
import time

import pytest
from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from conftest import job_events, parse_sse, wait_for

from rtqcc.bus.events import EventLog, events_key, stream_id_tuple
from rtqcc.run.deltas import DeltaFlusher
from rtqcc.services import Services

pytest_plugins = ["openai_fixtures"]  # the local OpenAI-compatible server and its providers

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]


def test_a_subscriber_on_the_channel_receives_every_event_with_its_stream_id(api, run_consumer, redis_client):
    external_id = api.create(outline=OUTLINE)
    pubsub = redis_client.pubsub()
    try:
        pubsub.subscribe(events_key(external_id))
        # The confirmation: from here on, Redis delivers every PUBLISH on the channel to us.
        assert pubsub.get_message(timeout=5)["type"] == "subscribe"
        subscribed_after = redis_client.xrevrange(events_key(external_id), count=1)[0][0]
        api.post(f"/jobs/{external_id}/start")
        assert run_consumer().completed == 1

        stored = [e for e in job_events(redis_client, external_id)
                  if stream_id_tuple(e["id"]) > stream_id_tuple(subscribed_after)]
        assert stored[-1]["event"] == "done" and len(stored) > 6
        received: list[dict] = []
        deadline = time.monotonic() + 10
        while len(received) < len(stored) and time.monotonic() < deadline:
            message = pubsub.get_message(timeout=1)
            if message is not None and message["type"] == "message":
                published = json.loads(message["data"])
                received.append({"id": published["id"], "event": published["type"], "data": published["data"]})
    finally:
        pubsub.close()
    assert received == stored


def test_the_stream_resumes_from_the_query_parameter_in_either_spelling(api, run_consumer, redis_client):
    external_id = api.create(outline=OUTLINE)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 1
    published = job_events(redis_client, external_id)

    for name in ("lastEventId", "last_event_id"):
        answer = api.get(f"/jobs/{external_id}/stream?{name}={published[3]['id']}")
        assert answer.status_code == 200
        assert parse_sse(answer.body.decode()) == published[4:], name
    refused = api.get(f"/jobs/{external_id}/stream?last_event_id=yesterday")
    assert refused.status_code == 400
    assert "Last-Event-ID" in refused.json_body["error"]["message"]


def test_text_sent_before_a_provider_stalls_reaches_the_event_log_during_the_stall(
        api, start_consumer, make_openai_services, llm, redis_client, database, blob_store):
    openai = make_openai_services(RTQCC_OPENAI_IDLE_TIMEOUT_S="120")  # the stall must not end as a cut
    # An interval far longer than the gaps between the tokens before the stall: all but the first
    # are held by the buffer when the provider goes silent.
    services = Services(openai.settings.with_overrides(delta_flush_ms=1000), redis=redis_client, db=database,
                        blobs=blob_store, provider=openai.provider)
    llm.add_faults({"kind": "stall", "after_tokens": 6, "seconds": 120})
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 200})
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(services=services, budget_s=90)  # its budget must not end the stall either

    stalled = wait_for(lambda: llm.requests and llm.requests[0].pieces_sent == 6 and llm.requests[0],
                       what="the server to go silent after 6 pieces")

    def streamed_text() -> str:
        return "".join(e["data"]["text"] for e in job_events(redis_client, external_id) if e["event"] == "section.delta")

    wait_for(lambda: streamed_text() == stalled.text_sent, timeout_s=20,
             what="the text sent before the stall in the job's events")
    assert stalled.finish_reason is None and stalled.disconnected_at is None  # still stalled: nothing ended it

    assert api.post(f"/jobs/{external_id}/pause").json_body["status"] == "paused"
    assert consumer.join().stopped == 1
    assert streamed_text() == stalled.text_sent  # nothing published twice


def test_events_published_after_redis_lost_its_scripts_are_each_appended_once(services, redis_client):
    """A restarted (or flushed) Redis has forgotten the append-and-publish script: the first
    publish after loads it again, and no event is appended twice or lost."""
    log = services.events
    log.publish("RTQCC-01J00000000000000000000000", "status", {"status": "created"})
    redis_client.script_flush()
    ids = log.publish_many("RTQCC-01J00000000000000000000000", [("one", {"n": 1}), ("two", {"n": 2})])
    redis_client.script_flush()
    ids.append(log.publish("RTQCC-01J00000000000000000000000", "three", {"n": 3}))
    entries = redis_client.xrange(events_key("RTQCC-01J00000000000000000000000"))
    assert [fields["type"] for _, fields in entries] == ["status", "one", "two", "three"]
    assert [entry_id for entry_id, _ in entries][1:] == ids


def _deltas(redis_client, external_id: str) -> list[dict]:
    return [e["data"] for e in job_events(redis_client, external_id) if e["event"] == "section.delta"]


def test_one_flush_publishes_what_every_open_section_holds_and_a_closing_one_keeps_its_order(redis_client):
    # An interval no test waits for: only the flushes the test makes publish.
    flusher = DeltaFlusher(EventLog(redis_client), interval_s=3600)
    jobs = [f"RTQCC-FLUSH{n}" for n in range(3)]
    buffers = [flusher.open(job, index=0, version=1) for job in jobs]
    for buffer in buffers:
        buffer.add("Hello")
        buffer.add(", world")
    assert all(_deltas(redis_client, job) == [] for job in jobs)  # held back until the interval ends

    flusher.flush()
    for job in jobs:
        assert _deltas(redis_client, job) == [{"index": 0, "version": 1, "text": "Hello, world"}]

    buffers[0].add(" and more")
    buffers[0].close()  # what is left goes out at once, after what the flusher took before
    flusher.flush()     # the closed buffer is no longer the flusher's; the others hold nothing
    assert [d["text"] for d in _deltas(redis_client, jobs[0])] == ["Hello, world", " and more"]
    assert all(len(_deltas(redis_client, job)) == 1 for job in jobs[1:])


def test_a_detached_buffer_hands_back_what_it_holds_and_is_flushed_no_more(redis_client):
    flusher = DeltaFlusher(EventLog(redis_client), interval_s=3600)
    buffer = flusher.open("RTQCC-DETACH", index=1, version=2)
    buffer.add("Hello")
    flusher.flush()
    buffer.add(", world")
    assert buffer.detach() == [("section.delta", {"index": 1, "version": 2, "text": ", world"})]
    flusher.flush()
    assert [d["text"] for d in _deltas(redis_client, "RTQCC-DETACH")] == ["Hello"]  # the rest is the caller's
    assert buffer.detach() == []


class RecordingEventLog(EventLog):
    """The real event log, noting the events of each script call."""

    def __init__(self, redis):
        super().__init__(redis)
        self.calls: list[list[tuple[str, str]]] = []

    def publish_across(self, events):
        self.calls.append([(type_, data.get("text", "")) for _, type_, data in events])
        return super().publish_across(events)


def test_a_sections_last_text_goes_out_with_its_completion_and_the_deltas_add_up_to_it(
        api, run_consumer, redis_client, make_services):
    external_id = api.create(outline=OUTLINE)
    api.post(f"/jobs/{external_id}/start")
    # Deltas held (the tests' default publishes each token at once), for longer than the job takes.
    consuming = make_services(delta_flush_ms=3_600_000)
    consuming.events = RecordingEventLog(redis_client)
    assert run_consumer(services=consuming).completed == 1

    completions = [call for call in consuming.events.calls if ("section.completed", "") in call]
    assert len(completions) == len(OUTLINE)
    # One round trip: the section's last text (here all of it: no flush came), then its completion.
    assert all(call[0][0] == "section.delta" and call[1][0] == "section.completed" for call in completions)
    events = job_events(redis_client, external_id)
    for index in range(len(OUTLINE)):
        streamed = "".join(e["data"]["text"] for e in events
                           if e["event"] == "section.delta" and e["data"]["index"] == index)
        assert streamed == api.get(f"/jobs/{external_id}/sections/{index}").json_body["content"]


def test_a_flush_that_fails_keeps_the_text_and_the_section_meets_the_error_at_its_next_token(redis_client):
    unreachable = Redis(host="127.0.0.1", port=_closed_port(), socket_connect_timeout=1)
    flusher = DeltaFlusher(EventLog(unreachable), interval_s=3600)
    buffer = flusher.open("RTQCC-FLUSHFAIL", index=2, version=1)
    buffer.add("kept ")
    flusher.flush()  # Redis is away: nothing is lost, and the run is told
    with pytest.raises(RedisConnectionError):
        buffer.add("through the outage")

    flusher.events = EventLog(redis_client)  # Redis is back
    buffer.close()
    assert _deltas(redis_client, "RTQCC-FLUSHFAIL") == [{"index": 2, "version": 1, "text": "kept through the outage"}]


def test_with_no_interval_every_token_is_its_own_event_at_once(redis_client):
    flusher = DeltaFlusher(EventLog(redis_client), interval_s=0)
    buffer = flusher.open("RTQCC-FLUSHNOW", index=0, version=1)
    for token in ("one", " two", " three"):
        buffer.add(token)
    assert [d["text"] for d in _deltas(redis_client, "RTQCC-FLUSHNOW")] == ["one", " two", " three"]
    buffer.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed when the block ends: connections to it are refused
