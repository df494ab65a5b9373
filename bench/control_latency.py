"""Latency from a control request (pause or cancel, over HTTP through the emulator's gateway) to
the provider's aborted stream, beside two floors measured in the same run: one Redis PUBLISH
reaching a subscriber on another thread, and one HTTP round trip through the same gateway."""

from __future__ import annotations

import threading
import time

import httpx

from rtqcc.api import create_app
from rtqcc.api.streaming import create_stream_handler
from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc_emulator.gateway import Gateway
from rtqcc_emulator.server import ServerThread, create_http_app

from .stack import BENCH_KEY, fresh_services, summary_ms


class _ObservedProvider:
    """The fake provider, noting when a stream starts and when an aborted one returns."""

    name = "fake"

    def __init__(self):
        self.inner = FakeProvider(tokens_per_s=50)
        self.streaming = threading.Event()
        self.aborted = threading.Event()
        self.aborted_at = 0.0

    def stream(self, request, abort, on_delta, on_wait=None):
        def first_delta(text):
            self.streaming.set()
            on_delta(text)

        result = self.inner.stream(request, abort, first_delta, on_wait)
        if result.aborted:
            self.aborted_at = time.perf_counter()
            self.aborted.set()
        return result


def ours(settings, samples: int) -> dict[str, list[float]]:
    provider = _ObservedProvider()
    services = fresh_services(settings, control_poll_s=5.0)  # Postgres polling must not be what stops it
    services.provider = provider
    consumer = Consumer(services, name="bench-control")
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            consumer.drain(TimeBudget(5).get_remaining_time_in_millis)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    gateway = Gateway(create_app(lambda: services), stream_handler=create_stream_handler(lambda: services))
    server = ServerThread(create_http_app(gateway), port=0).start()
    latencies: dict[str, list[float]] = {"cancel": [], "pause": [], "http_round_trip": []}
    try:
        with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
            for n in range(samples):
                verb = ("cancel", "pause")[n % 2]
                provider.streaming.clear()
                provider.aborted.clear()
                body = {"title": f"Control {n}", "brief": "b", "outline": [{"title": "long"}],
                        "params": {"max_tokens_per_section": 5000}}
                external_id = http.post("/jobs", json=body).json()["externalId"]
                http.post(f"/jobs/{external_id}/start")
                if not provider.streaming.wait(10):
                    raise RuntimeError("the consumer never started streaming")
                started = time.perf_counter()
                response = http.post(f"/jobs/{external_id}/{verb}")
                assert response.status_code == 202, response.text
                if not provider.aborted.wait(10):
                    raise RuntimeError(f"the provider stream was not aborted by {verb}")
                latencies[verb].append(provider.aborted_at - started)
                if verb == "pause":
                    http.post(f"/jobs/{external_id}/cancel")  # leave nothing runnable behind
                started = time.perf_counter()
                http.get("/healthz")
                latencies["http_round_trip"].append(time.perf_counter() - started)
    finally:
        stop.set()
        consumer.shut_down()
        worker.join(10)
        server.stop()
        gateway.close()
    return latencies


def publish_floor(settings, samples: int) -> list[float]:
    services = fresh_services(settings)
    pubsub = services.redis.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe("bench:control")
    received = threading.Event()
    received_at = [0.0]

    def listen():
        while True:
            message = pubsub.get_message(timeout=1.0)
            if message and message["data"] == "stop":
                return
            if message:
                received_at[0] = time.perf_counter()
                received.set()

    listener = threading.Thread(target=listen, daemon=True)
    listener.start()
    latencies = []
    for _ in range(samples):
        received.clear()
        started = time.perf_counter()
        services.redis.publish("bench:control", "cancel")
        received.wait(5)
        latencies.append(received_at[0] - started)
    services.redis.publish("bench:control", "stop")
    listener.join(5)
    pubsub.close()
    return latencies


def run(settings, *, samples: int = 100) -> dict:
    measured = ours(settings, samples)
    result = {
        "cancel": summary_ms(measured["cancel"]),
        "pause": summary_ms(measured["pause"]),
        "baseline_http_round_trip": summary_ms(measured["http_round_trip"]),
        "baseline_publish_to_subscriber": summary_ms(publish_floor(settings, samples)),
        "goal_p99_ms": 100,
    }
    result["ratio_cancel_p50_to_http"] = round(result["cancel"]["p50_ms"] / max(result["baseline_http_round_trip"]["p50_ms"], 1e-6), 2)
    return result
