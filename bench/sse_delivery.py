"""Live delivery: many concurrent SSE clients on running jobs, through the emulator's gateway
(in its own process, with consumers in theirs), measuring each token event's latency from its
publication (the time in its Redis stream id) to the client, and events per second delivered.
Baseline in the same run: the same number of raw Redis pub/sub subscribers on the same events,
the floor under any SSE server."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import redis.asyncio as aioredis

from rtqcc_emulator.embedded import free_port

from .stack import BENCH_KEY, fresh_services, percentile

JOBS = 10
WARMUP_S = 4.0     # for every client to connect and catch up before the measured window
DURATION_S = 8.0


def _start_stack(settings, port: int, data_dir: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "S3_BUCKET": settings.s3_bucket,
        "RTQCC_API_KEYS": f"{BENCH_KEY}:bench",
        "RTQCC_RATE_LIMIT_PER_MIN": "0",
        # One tenant plays all 1,000 clients: lift its stream caps, or the bench measures the 429s.
        "RTQCC_MAX_STREAMS_PER_TENANT": "100000",
        "RTQCC_MAX_STREAMS_PER_KEY": "100000",
        "RTQCC_FAKE_TOKENS_PER_S": "40",
        "RTQCC_DELTA_FLUSH_MS": "0",
        "RTQCC_SSE_HEARTBEAT_S": "5",
    }
    log_path = data_dir / "stack.log"
    with open(log_path, "w") as log:  # a file, not a pipe nobody drains: a full pipe would stall the server
        process = subprocess.Popen(
            [sys.executable, "-m", "rtqcc.cli", "up", "--port", str(port), "--data-dir", str(data_dir),
             "--consumers", str(JOBS), "--consumer-budget-s", "120"],
            env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if "ready" in log_path.read_text().splitlines():
            return process
        time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"the stack did not become ready; see {log_path}")


def _stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


async def _client(http: httpx.AsyncClient, external_id: str, until: float, latencies: list[float],
                  window_start: float) -> int:
    """Count the token events published after `window_start` (every client is connected by then:
    what a late client catches up on is replay, not live delivery)."""
    received = 0
    async with http.stream("GET", f"/jobs/{external_id}/stream") as response:
        event_id, kind = None, None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                kind = line[7:]
            elif line == "" and kind:
                published_ms = int(event_id.split("-")[0]) if event_id else 0
                if published_ms >= window_start * 1000:
                    if kind == "section.delta":
                        latencies.append(time.time() * 1000 - published_ms)
                    received += 1
                kind = None
            if time.monotonic() >= until:
                break
    return received


async def _ours(base_url: str, job_ids: list[str], clients: int) -> dict:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients + 10, max_keepalive_connections=clients + 10)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(30, read=None),
                                 headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
        until = time.monotonic() + WARMUP_S + DURATION_S
        window_start = time.time() + WARMUP_S
        counts = await asyncio.gather(*(_client(http, job_ids[n % len(job_ids)], until, latencies, window_start)
                                        for n in range(clients)))
    return _figures(latencies, sum(counts), DURATION_S)


async def _baseline(redis_url: str, job_ids: list[str], clients: int) -> dict:
    latencies: list[float] = []
    counts = [0] * clients
    pool = aioredis.ConnectionPool.from_url(redis_url, max_connections=clients + 10, decode_responses=True)

    async def subscriber(n: int, until: float, window_start: float):
        conn = aioredis.Redis(connection_pool=pool)
        pubsub = conn.pubsub()
        await pubsub.subscribe(f"job:{job_ids[n % len(job_ids)]}:events")
        while time.monotonic() < until:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message:
                payload = json.loads(message["data"])
                published_ms = int(payload["id"].split("-")[0])
                if published_ms >= window_start * 1000:
                    if payload["type"] == "section.delta":
                        latencies.append(time.time() * 1000 - published_ms)
                    counts[n] += 1
        await pubsub.aclose()

    until = time.monotonic() + WARMUP_S + DURATION_S
    window_start = time.time() + WARMUP_S
    await asyncio.gather(*(subscriber(n, until, window_start) for n in range(clients)))
    await pool.aclose()
    return _figures(latencies, sum(counts), DURATION_S)


def _figures(latencies: list[float], events: int, elapsed: float) -> dict:
    return {"token_events": len(latencies), "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1), "events_per_s": round(events / elapsed)}


def _start_jobs(base_url: str, count: int) -> list[str]:
    ids = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
        for n in range(count):
            body = {"title": f"Live {n}", "brief": "b", "outline": [{"title": "long"}],
                    "params": {"max_tokens_per_section": 2000}}
            external_id = http.post("/jobs", json=body).json()["externalId"]
            http.post(f"/jobs/{external_id}/start")
            ids.append(external_id)
    return ids


def run(settings, *, client_counts: tuple[int, ...] = (100, 1000)) -> dict:
    fresh_services(settings)
    port = free_port()
    process = _start_stack(settings, port, Path(tempfile.mkdtemp(prefix="rtqcc-bench-sse-")))
    base_url = f"http://127.0.0.1:{port}"
    results: dict = {"jobs": JOBS, "measured_window_s": DURATION_S}
    try:
        job_ids = _start_jobs(base_url, JOBS)
        for clients in client_counts:
            results[f"clients_{clients}"] = {
                "ours": asyncio.run(_ours(base_url, job_ids, clients)),
                "baseline_redis_pubsub": asyncio.run(_baseline(settings.redis_url, job_ids, clients)),
            }
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
            for external_id in job_ids:
                http.post(f"/jobs/{external_id}/cancel")
    finally:
        _stop(process)
    results["goal_p99_ms"] = {"clients_100": 50, "clients_1000": 250}
    return results
