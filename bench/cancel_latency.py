"""Latency from a cancel request (the API handler called) to the provider's aborted stream,
beside the floor under it: one Redis PUBLISH reaching a subscriber on another thread."""

from __future__ import annotations

import json
import threading
import time

from chalice.test import Client

from rtqcc.api import create_app
from rtqcc.consumer import Consumer, TimeBudget
from rtqcc.providers.fake import FakeProvider

from .stack import BENCH_KEY, fresh_services, summary_ms


class _ObservedProvider:
    """The fake provider, noting when a stream starts and when an aborted one returns."""

    name = "fake"

    def __init__(self):
        self.inner = FakeProvider(tokens_per_s=50)
        self.streaming = threading.Event()
        self.aborted = threading.Event()
        self.aborted_at = 0.0

    def stream(self, request, abort, on_delta):
        def first_delta(text):
            self.streaming.set()
            on_delta(text)

        result = self.inner.stream(request, abort, first_delta)
        if result.aborted:
            self.aborted_at = time.perf_counter()
            self.aborted.set()
        return result


def ours(settings, samples: int) -> list[float]:
    provider = _ObservedProvider()
    services = fresh_services(settings, control_poll_s=5.0)  # Postgres polling must not be what stops it
    services.provider = provider
    consumer = Consumer(services, name="bench-cancel")
    stop = threading.Event()

    def consume():
        while not stop.is_set():
            consumer.drain(TimeBudget(5).get_remaining_time_in_millis)

    worker = threading.Thread(target=consume, daemon=True)
    worker.start()
    headers = {"Authorization": f"Bearer {BENCH_KEY}", "Content-Type": "application/json"}
    latencies = []
    with Client(create_app(lambda: services)) as client:
        for n in range(samples):
            provider.streaming.clear()
            provider.aborted.clear()
            body = {"title": f"Cancel {n}", "brief": "b", "outline": [{"title": "long"}],
                    "params": {"max_tokens_per_section": 5000}}
            external_id = client.http.post("/jobs", headers=headers, body=json.dumps(body)).json_body["externalId"]
            client.http.post(f"/jobs/{external_id}/start", headers=headers)
            if not provider.streaming.wait(10):
                raise RuntimeError("the consumer never started streaming")
            started = time.perf_counter()
            response = client.http.post(f"/jobs/{external_id}/cancel", headers=headers)
            assert response.status_code == 202, response.body
            if not provider.aborted.wait(10):
                raise RuntimeError("the provider stream was not aborted")
            latencies.append(provider.aborted_at - started)
    stop.set()
    worker.join(10)
    return latencies


def baseline(settings, samples: int) -> list[float]:
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
    ours_s = ours(settings, samples)
    base_s = baseline(settings, samples)
    result = {"ours": summary_ms(ours_s), "baseline_publish_to_subscriber": summary_ms(base_s)}
    result["ratio_p50"] = round(result["ours"]["p50_ms"] / max(result["baseline_publish_to_subscriber"]["p50_ms"], 1e-6), 1)
    return result
