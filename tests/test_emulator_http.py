"""The emulator over real HTTP, driven by an SSE client library, as a user's code would."""

from __future__ import annotations

import os
import signal

import httpx
import pytest
from conftest import consumer_env, job_events, wait_for

from rtqcc.bus.events import stream_id_tuple
from rtqcc_emulator.scheduler import ConsumerScheduler


def _after(published: list[dict], event_id: str) -> list[dict]:
    """The published events after `event_id`, by stream order ((ms, seq), not text)."""
    return [e for e in published if stream_id_tuple(e["id"]) > stream_id_tuple(event_id)]


def test_a_job_lives_its_whole_life_over_http(start_gateway, start_consumer):
    running = start_gateway()
    with running.client() as client:
        external_id = client.create(title="Over the wire", brief="b", section_count=2)["externalId"]
        assert client.control(external_id, "start")["status"] == "queued"
        start_consumer()
        events = list(client.events(external_id))
        assert events[0].type == "snapshot" and events[-1].type == "done"
        assert events[-1].data == {"status": "completed"}
        assert client.get(external_id)["progress"] == {"sections_total": 2, "sections_done": 2}
        assert client.manuscript(external_id).startswith("# Over the wire\n")
        assert [job["externalId"] for job in client.list()["jobs"]] == [external_id]


@pytest.mark.parametrize("hub", [True, False], ids=["event-hub", "function-generator"])
def test_streaming_mode_delivers_tokens_while_the_section_is_written(start_gateway, start_consumer, redis_client,
                                                                     hub):
    running = start_gateway(streaming=True, hub=hub)
    with running.client() as client:
        external_id = client.create(title="Live", brief="b", outline=[{"title": "One"}],
                                    params={"max_tokens_per_section": 150})["externalId"]
        client.control(external_id, "start")
        start_consumer(fake_tokens_per_s=150.0)  # about a second for the section
        # For each token as it reaches the client: was its section still being written?
        while_written = [not any(e["event"] == "section.completed" for e in job_events(redis_client, external_id))
                         for event in client.events(external_id) if event.type == "section.delta"]
    assert while_written and while_written[0], (
        "no token reached the client before its section was completed: the stream was buffered")


def test_buffered_mode_delivers_everything_through_reconnects_and_nothing_twice(start_gateway, start_consumer, redis_client):
    running = start_gateway(streaming=False)
    with running.client() as client:
        external_id = client.create(title="Polled", brief="b", section_count=2,
                                    params={"max_tokens_per_section": 80})["externalId"]
        client.control(external_id, "start")
        start_consumer(fake_tokens_per_s=300.0)
        received = list(client.events(external_id))
    snapshot = received[0]
    assert snapshot.type == "snapshot"
    published = _after(job_events(redis_client, external_id), snapshot.id)
    assert [(e.id, e.type, e.data) for e in received[1:]] == [(e["id"], e["event"], e["data"]) for e in published]
    assert len({e.id for e in received[1:]}) == len(received) - 1


def test_a_slow_handler_gets_api_gateways_504_over_http(start_gateway, api):
    external_id = api.create()
    running = start_gateway(streaming=False, integration_timeout_s=0.3)
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {running.key}"}) as http:
        first = http.get(f"/jobs/{external_id}/stream")
        last_id = first.text.split("id: ", 1)[1].split("\n", 1)[0]
        answer = http.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": last_id})
    assert answer.status_code == 504
    assert answer.json() == {"message": "Endpoint request timed out"}


def test_an_oversize_body_gets_a_413_over_http(start_gateway):
    running = start_gateway(max_request_bytes=2048)
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {running.key}"}) as http:
        answer = http.post("/jobs", content=b"{" + b" " * 4096 + b"}", headers={"Content-Type": "application/json"})
    assert answer.status_code == 413
    assert answer.json() == {"message": "Request Too Long"}


def test_the_web_page_is_served_at_the_root(start_gateway):
    running = start_gateway()
    page = httpx.get(running.base_url + "/")
    assert page.status_code == 200
    assert "text/html" in page.headers["content-type"]
    assert '<script src="/static/app.js"' in page.text
    script = httpx.get(running.base_url + "/static/app.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert "EventSource" in script.text
    style = httpx.get(running.base_url + "/static/app.css")
    assert style.status_code == 200 and style.headers["content-type"].startswith("text/css")


def test_a_consumer_killed_mid_section_is_replaced_and_the_job_completes_once(
        start_gateway, settings, s3_endpoint, database, tmp_path):
    running = start_gateway()
    env = consumer_env(settings, s3_endpoint, RTQCC_FAKE_TOKENS_PER_S="60", RTQCC_LEASE_TTL_S="2",
                       RTQCC_CONTROL_POLL_S="0.2")
    scheduler = ConsumerScheduler(concurrency=2, budget_s=30, env=env, log_dir=tmp_path).start()
    try:
        with running.client() as client:
            external_id = client.create(title="Crash", brief="b", section_count=3,
                                        params={"max_tokens_per_section": 60})["externalId"]
            client.control(external_id, "start")

            def holder_pid():
                row = database.row("SELECT j.lease_owner FROM jobs j JOIN sections s ON s.job_id = j.id"
                                   " WHERE j.external_id = :e AND s.status = 'running'", e=external_id)
                return row and row["lease_owner"] and int(row["lease_owner"].rsplit("-", 1)[1])

            victim = wait_for(holder_pid, timeout_s=20, what="a consumer writing a section")
            assert victim in scheduler.pids()
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: victim not in scheduler.pids() and len(scheduler.pids()) == 2, timeout_s=10,
                     what="the killed consumer to be replaced")

            events = [event for event in client.events(external_id)]
            assert events[-1].data["status"] == "completed"
        rows = database.rows(
            "SELECT a.section_idx, COUNT(*) FILTER (WHERE a.finish_reason IS NOT NULL)::int AS finished"
            " FROM generation_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.external_id = :e"
            " AND a.section_idx IS NOT NULL GROUP BY a.section_idx ORDER BY a.section_idx", e=external_id)
        assert [row["finished"] for row in rows] == [1, 1, 1]
        owners = database.row("SELECT lease_version FROM jobs WHERE external_id = :e", e=external_id)
        assert owners["lease_version"] >= 2  # the job really changed hands
    finally:
        scheduler.stop()
    assert scheduler.pids() == []


def test_many_clients_of_one_job_each_get_every_event_once_through_the_hub(start_gateway, start_consumer,
                                                                            redis_client):
    import concurrent.futures

    running = start_gateway(streaming=True, hub=True)
    with running.client() as client:
        external_id = client.create(title="Crowd", brief="b", section_count=2,
                                    params={"max_tokens_per_section": 60})["externalId"]
        client.control(external_id, "start")

    def watch(_):
        with running.client() as own:
            return [(e.id, e.type, e.data) for e in own.events(external_id)]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        futures = [pool.submit(watch, n) for n in range(20)]
        start_consumer(fake_tokens_per_s=300.0)
        seen = [future.result(timeout=60) for future in futures]
    published = [(e["id"], e["event"], e["data"]) for e in job_events(redis_client, external_id)]
    for events in seen:
        snapshot_id = events[0][0]
        assert events[0][1] == "snapshot"
        assert events[1:] == [e for e in published if stream_id_tuple(e[0]) > stream_id_tuple(snapshot_id)]

    middle = published[len(published) // 2]
    with running.client() as client:
        resumed = [(e.id, e.type, e.data) for e in client.events(external_id, last_event_id=middle[0])]
    assert resumed == published[len(published) // 2 + 1:]


def test_the_in_process_server_binds_its_free_port_itself_and_refuses_a_taken_one():
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route

    from rtqcc_emulator.server import ServerThread

    app = Starlette(routes=[Route("/", lambda request: PlainTextResponse("here"))])
    first, second = ServerThread(app).start(), ServerThread(app).start()
    try:
        # Each holds its socket from the moment it chose the port: no other start can get it.
        assert 0 not in (first.port, second.port) and first.port != second.port
        assert [httpx.get(s.base_url + "/", timeout=5).text for s in (first, second)] == ["here", "here"]
        with pytest.raises(RuntimeError, match=f"cannot listen on http://127.0.0.1:{first.port}: Address already in use"):
            ServerThread(app, port=first.port).start()
    finally:
        first.stop()
        second.stop()
