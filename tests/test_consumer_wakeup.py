"""Where consumers are invocations on a schedule (Lambda), a job started while none runs asks for
one at once instead of waiting for the next schedule, once however many jobs are started; not at
all while a consumer is reading the queue; and a consumer with every slot busy asks for as many
as the jobs waiting would fill. Lambda itself cannot run here: its Invoke API is played by a
local HTTP server, which the real boto3 client calls."""

from __future__ import annotations

import json
import logging
import threading
from http.server import BaseHTTPRequestHandler

import pytest
from chalice.app import CloudWatchEvent

from rtqcc.bus.consumer_wakeup import KICK_KEY, LISTENING_KEY, ConsumerWakeup, lambda_invoker
from rtqcc.run.sweeper import sweep
from rtqcc.settings import Settings

from conftest import LoopbackHTTPServer, send_answer, wait_for


class LambdaStandIn:
    """Lambda's Invoke API on 127.0.0.1: records each request, answers `status`."""

    def __init__(self, status: int = 202, on_invoke=None):
        self.requests: list[dict] = []
        self.status = status
        self.on_invoke = on_invoke  # what the invoked function does, on its own thread

    def _answer(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        self.requests.append({"path": request.path, "headers": dict(request.headers), "body": body})
        if self.status == 202:
            if self.on_invoke is not None:
                threading.Thread(target=self.on_invoke, daemon=True).start()
            send_answer(request, 202)
        else:
            send_answer(request, self.status, json.dumps({"Type": "User", "message": "Rate Exceeded."}).encode(),
                        x_amzn_ErrorType="TooManyRequestsException")

    def __enter__(self) -> "LambdaStandIn":
        self._server = LoopbackHTTPServer(self._answer)
        self.url = self._server.url
        return self

    def __exit__(self, *exc) -> None:
        self._server.stop()


def invoker_for(stand_in: LambdaStandIn, function: str = "rtqcc-prod-consumer"):
    return lambda_invoker(function, "us-east-1", endpoint_url=stand_in.url,
                          aws_access_key_id="test-key", aws_secret_access_key="test-secret")


@pytest.fixture
def invocations(services) -> list[str]:
    """The consumer invocations the API asks for, by services whose invoker records them."""
    asked: list[str] = []
    services.consumer_wakeup = ConsumerWakeup(services.redis, lambda: asked.append("consumer"))
    return asked


def test_jobs_started_while_no_consumer_reads_ask_for_one_invocation_however_many(api, invocations, redis_client):
    for _ in range(3):
        assert api.post(f"/jobs/{api.create()}/start").status_code == 202

    assert invocations == ["consumer"]
    assert redis_client.pttl(KICK_KEY) > 0  # asked again only once this lapses


def test_no_invocation_is_asked_for_while_a_consumer_reads_the_queue(api, invocations, start_consumer, redis_client):
    with start_consumer(budget_s=30, consumer_idle_exit_ms=10_000):
        wait_for(lambda: redis_client.zcard(LISTENING_KEY), what="the consumer reading the queue")
        job = api.create()
        assert api.post(f"/jobs/{job}/start").status_code == 202

        assert invocations == []
        wait_for(lambda: api.get(f"/jobs/{job}").json_body["status"] == "completed", timeout_s=20, interval_s=0.2,
                 what="its run")


def test_a_consumer_that_stops_for_want_of_work_stops_listening_so_the_next_start_asks(
        api, invocations, run_consumer, redis_client):
    job = api.create()
    api.post(f"/jobs/{job}/start")
    assert invocations == ["consumer"]
    redis_client.delete(KICK_KEY)  # the interval over

    assert run_consumer().completed == 1  # it ran the job, then went idle and ended
    assert redis_client.zcard(LISTENING_KEY) == 0
    api.post(f"/jobs/{api.create()}/start")
    assert invocations == ["consumer", "consumer"]


def test_a_job_started_as_a_consumer_stops_for_want_of_work_is_taken_by_its_last_look(api, make_services, run_consumer):
    """The start saw the consumer listening, so asked for no invocation: the consumer must take it."""
    job = api.create(section_count=1)

    class StartedJustThen(ConsumerWakeup):
        def stopped_listening(self, consumer: str) -> None:
            super().stopped_listening(consumer)
            if api.get(f"/jobs/{job}").json_body["status"] == "created":
                assert api.post(f"/jobs/{job}/start").status_code == 202

    services = make_services()
    services.consumer_wakeup = StartedJustThen(services.redis, invoke=None)
    assert run_consumer(services=services).completed == 1
    assert api.get(f"/jobs/{job}").json_body["status"] == "completed"


def test_a_job_started_with_no_consumer_running_is_run_by_the_invocation_it_asked_for(make_api, run_consumer):
    api, services = make_api()
    drains = []
    with LambdaStandIn(on_invoke=lambda: drains.append(run_consumer(name="invoked"))) as lambda_api:
        services.consumer_wakeup = ConsumerWakeup(services.redis, invoker_for(lambda_api))
        job = api.create(section_count=2)
        assert api.post(f"/jobs/{job}/start").status_code == 202
        wait_for(lambda: api.get(f"/jobs/{job}").json_body["status"] == "completed", timeout_s=30, interval_s=0.2,
                 what="its run")

    assert len(lambda_api.requests) == 1
    wait_for(lambda: drains, what="the invocation's end")
    assert drains[0].completed == 1


def test_the_request_reaches_lambda_as_an_asynchronous_scheduled_event_the_consumer_handler_takes(services):
    with LambdaStandIn() as lambda_api:
        wakeup = ConsumerWakeup(services.redis, invoker_for(lambda_api))
        assert wakeup.job_queued() is True

    [request] = lambda_api.requests
    assert request["path"] == "/2015-03-31/functions/rtqcc-prod-consumer/invocations"
    assert request["headers"]["X-Amz-Invocation-Type"] == "Event"
    assert request["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256 Credential=test-key/")
    event = CloudWatchEvent(json.loads(request["body"]), context=None)  # as @app.schedule reads it
    assert event.detail_type == "Scheduled Event"


def test_lambda_refusing_the_invocation_costs_the_start_nothing(make_api, redis_client, caplog):
    """Throttled (its reserved concurrency in use): the job is queued and answered as usual."""
    with LambdaStandIn(status=429) as lambda_api:
        api, services = make_api()
        services.consumer_wakeup = ConsumerWakeup(services.redis, invoker_for(lambda_api))
        job = api.create()
        with caplog.at_level(logging.WARNING, logger="rtqcc.bus.consumer_wakeup"):
            response = api.post(f"/jobs/{job}/start")

    assert response.status_code == 202
    assert response.json_body["status"] == "queued"
    assert len(lambda_api.requests) == 1  # no retries on a request's path
    assert redis_client.xlen("jobs:pending") == 1  # queued all the same: the schedule takes it
    assert "the next scheduled one takes the job" in caplog.text


def test_jobs_the_sweeper_puts_back_ask_for_an_invocation(api, services, invocations, redis_client):
    assert sweep(services).requeued == [] and invocations == []  # nothing to put back, nothing asked
    job = api.create(section_count=1)
    api.post(f"/jobs/{job}/start")
    redis_client.flushdb()  # a Redis restart without persistence: the queue and the kick's mark lost
    invocations.clear()

    assert sweep(services).requeued == [job]
    assert invocations == ["consumer"]


def test_the_api_asks_lambda_only_where_the_consumer_function_is_named(settings):
    assert Settings.from_env({"RTQCC_CONSUMER_FUNCTION": ""}).consumer_function is None
    named = Settings.from_env({"RTQCC_CONSUMER_FUNCTION": " rtqcc-prod-consumer "})
    assert named.consumer_function == "rtqcc-prod-consumer"


@pytest.mark.parametrize("jobs, asked", [(2, ["consumer"]), (1, [])])
def test_a_consumer_with_every_slot_busy_asks_for_another_invocation_only_while_jobs_wait_unread(
        jobs, asked, make_api, start_consumer, database):
    api, services = make_api(max_in_flight=1, fake_tokens_per_s=30.0)
    started = [api.create(section_count=1, params={"max_tokens_per_section": 60}) for _ in range(jobs)]
    for job in started:
        api.post(f"/jobs/{job}/start")
    invocations: list[str] = []
    services.consumer_wakeup = ConsumerWakeup(services.redis, lambda: invocations.append("consumer"))

    with start_consumer(services=services, budget_s=60, consumer_idle_exit_ms=200) as consumer:
        wait_for(lambda: database.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status = 'completed'")["n"] == jobs,
                 timeout_s=40, interval_s=0.05, what="every job run, one at a time")
    assert consumer.result.completed == jobs
    assert invocations == asked  # with two jobs, the second waited unread behind the first


def test_the_queue_counts_as_unread_only_what_no_consumer_has_read(services):
    queue = services.queue
    assert queue.unread(10) == 0  # no stream yet
    first, second = "RTQCC-01J00000000000000000000001", "RTQCC-01J00000000000000000000002"
    queue.enqueue(first)
    assert queue.unread(10) == 1  # no group yet: consumers make it at the start, so all of it is unread
    queue.ensure_group()
    queue.enqueue(second)
    queue.read("consumer-1", count=1, block_ms=10)
    assert queue.unread(10) == 1
    queue.forget("tenant-a", second)  # a deleted job's entry leaves the stream
    assert queue.unread(10) == 0  # though Redis 7.0's own count of the group's lag still says 1
    for n in range(5):
        queue.enqueue(f"RTQCC-01J0000000000000000000010{n}")
    assert queue.unread(3) == 3  # counted up to the limit


@pytest.mark.parametrize("waiting, asked", [(25, 4), (200, 10), (0, 0)])
def test_a_full_consumer_asks_for_as_many_invocations_as_would_take_the_waiting_jobs(services, waiting, asked):
    queue, invoked = services.queue, []
    queue.ensure_group()
    for n in range(waiting):
        queue.enqueue(f"RTQCC-01J{n:021d}")
    wakeup = ConsumerWakeup(services.redis, lambda: invoked.append("consumer"))
    wakeup.listening("consumer-1", 100)

    assert wakeup.slots_full("consumer-1", 8, queue.unread) == asked  # 8 slots each, at most 10 at once
    assert len(invoked) == asked  # its own mark, not yet lapsed, held nothing back
    assert wakeup.slots_full("consumer-1", 8, queue.unread) == 0  # looked a moment ago


def test_a_full_consumer_asks_for_nothing_while_another_reads_the_queue(services):
    queue, invoked = services.queue, []
    queue.ensure_group()
    queue.enqueue("RTQCC-01J00000000000000000000001")
    ConsumerWakeup(services.redis, None).listening("consumer-2", 100)  # another process, with a free slot

    wakeup = ConsumerWakeup(services.redis, lambda: invoked.append("consumer"))
    assert wakeup.slots_full("consumer-1", 8, queue.unread) == 0 and invoked == []


def test_on_lambda_the_consumer_asks_for_invocations_of_its_own_function(make_services):
    from types import SimpleNamespace

    from rtqcc.run.consumer import lambda_handler

    services = make_services()
    assert services.consumer_wakeup.invoke is None  # RTQCC_CONSUMER_FUNCTION is not set
    handler = lambda_handler(lambda: services)
    context = SimpleNamespace(function_name="rtqcc-api-prod-consumer", aws_request_id="r-1",
                              get_remaining_time_in_millis=lambda: 3_000)
    handler({}, context)
    assert services.consumer_wakeup.invoke is not None
