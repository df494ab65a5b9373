"""Live delivery: many concurrent SSE clients on running jobs, through the emulator's gateway
(in its own process, with consumers in theirs), measuring each token event's latency from its
publication (the time in its Redis stream id) to the client, and events per second delivered.
Baseline: as many raw Redis pub/sub subscribers on the same jobs' events, the floor under any SSE
server. Both take turns on one supply of events (the same jobs, streaming from the same
consumers), in windows ordered ours, baseline, baseline, ours, so that drift in the supply (or a
busy moment on the machine) falls on both alike. Each window connects its own clients (ours from
the job's latest event, as a reconnecting browser does, so nothing is replayed), lets them settle,
then counts only the events published inside the measured part of the window, beside how many
were published for its clients then (each event times the clients following its job)."""

from __future__ import annotations

import asyncio
import json
import math
import multiprocessing
import shutil
import subprocess
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import httpx
import redis.asyncio as aioredis
from redis import Redis

from rtqcc.bus.events import events_key

from .stack import BENCH_KEY, fresh_services, percentile, start_local_stack, stop_local_stack

JOBS = 10
TOKENS_PER_S = 40
WARMUP_S = 4.0     # for every client to connect before the measured part of a window
DURATION_S = 8.0
ROUNDS = 2         # of (ours, baseline) windows per client count, in the order ABBA
# The clients of a window are spread over this many processes (each with its own event loop), so
# that one Python process parsing every event is less of a ceiling on both sides.
CLIENT_PROCESSES = 2
# Every job must stream through all the windows: 2 client counts x 2 rounds x 2 sides x 12 s,
# plus connecting, is under 2 minutes; 12,000 tokens at 40/s is 5.
TOKENS_PER_JOB = 12_000


def _start_stack(settings, data_dir: Path) -> tuple[subprocess.Popen, str]:
    # One tenant plays all 1,000 clients: lift its stream caps, or the bench measures the 429s.
    return start_local_stack(settings, data_dir, args=("--consumers", str(JOBS), "--consumer-budget-s", "600"),
                             RTQCC_MAX_STREAMS_PER_TENANT="100000", RTQCC_MAX_STREAMS_PER_KEY="100000",
                             RTQCC_FAKE_TOKENS_PER_S=str(TOKENS_PER_S), RTQCC_DELTA_FLUSH_MS="0",
                             RTQCC_SSE_HEARTBEAT_S="5")


class Window:
    """The measured part of a window: events published in [start, end), by the wall clock that
    Redis stream ids carry; the clients listen until `until` (monotonic, the same clock in every
    process on the machine), a little after `end`. Each client process fills its own copy."""

    def __init__(self):
        self.start = time.time() + WARMUP_S
        self.end = self.start + DURATION_S
        self.until = time.monotonic() + WARMUP_S + DURATION_S + 0.5
        self.latencies: list[float] = []
        self.events = 0
        self.offered = 0  # events published in the window, times the clients of their job

    def saw(self, event_id: str, kind: str) -> None:
        published_ms = int(event_id.split("-")[0])
        if self.start * 1000 <= published_ms < self.end * 1000:
            if kind == "section.delta":
                self.latencies.append(time.time() * 1000 - published_ms)
            self.events += 1

    def add(self, part: "Window") -> None:
        self.latencies += part.latencies
        self.events += part.events

    def count_offered(self, redis_url: str, job_ids: list[str], clients: int) -> None:
        redis = Redis.from_url(redis_url, decode_responses=True)
        first_ms, after_ms = math.ceil(self.start * 1000), math.ceil(self.end * 1000)
        for n, external_id in enumerate(job_ids):
            published = redis.xrange(events_key(external_id), min=str(first_ms), max=str(after_ms - 1))
            self.offered += len(published) * len(range(n, clients, len(job_ids)))  # client k follows job k % jobs
        redis.close()


async def _client(http: httpx.AsyncClient, external_id: str, after_id: str | None, window: Window) -> None:
    headers = {"Last-Event-ID": after_id} if after_id else {}
    async with http.stream("GET", f"/jobs/{external_id}/stream", headers=headers) as response:
        if response.status_code != 200:
            raise RuntimeError(f"the stream of {external_id} answered {response.status_code}")
        event_id, kind = None, None
        async for line in response.aiter_lines():
            if line.startswith("id: "):
                event_id = line[4:]
            elif line.startswith("event: "):
                kind = line[7:]
            elif line == "" and kind:
                if event_id:
                    window.saw(event_id, kind)
                kind = None
            if time.monotonic() >= window.until:
                break


async def _ours(window: Window, base_url: str, job_ids: list[str], latest: dict[str, str | None],
                clients: list[int]) -> None:
    limits = httpx.Limits(max_connections=len(clients) + 10, max_keepalive_connections=len(clients) + 10)
    async with httpx.AsyncClient(base_url=base_url, limits=limits, timeout=httpx.Timeout(30, read=None),
                                 headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
        await asyncio.gather(*(_client(http, job_ids[n % len(job_ids)], latest[job_ids[n % len(job_ids)]], window)
                               for n in clients))


async def _baseline(window: Window, redis_url: str, job_ids: list[str], clients: list[int]) -> None:
    pool = aioredis.ConnectionPool.from_url(redis_url, max_connections=len(clients) + 10, decode_responses=True)

    async def subscriber(n: int):
        conn = aioredis.Redis(connection_pool=pool)
        pubsub = conn.pubsub()
        await pubsub.subscribe(events_key(job_ids[n % len(job_ids)]))
        while time.monotonic() < window.until:
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.5)
            if message:
                payload = json.loads(message["data"])
                window.saw(payload["id"], payload["type"])
        await pubsub.aclose()

    await asyncio.gather(*(subscriber(n) for n in clients))
    await pool.aclose()


def _client_part(side: str, window: Window, base_url: str, redis_url: str, job_ids: list[str],
                 latest: dict[str, str | None], clients: list[int]) -> Window:
    """One client process's share of a window (run in the pool)."""
    if side == "ours":
        asyncio.run(_ours(window, base_url, job_ids, latest, clients))
    else:
        asyncio.run(_baseline(window, redis_url, job_ids, clients))
    return window


def _window(pool: ProcessPoolExecutor, side: str, base_url: str, redis_url: str, job_ids: list[str],
            clients: int) -> Window:
    # Ours from each job's latest event: a client that connected at the job's start would first be
    # sent the whole backlog (replay), which is not what live delivery measures.
    redis = Redis.from_url(redis_url, decode_responses=True)
    latest = {}
    for external_id in job_ids:
        last = redis.xrevrange(events_key(external_id), count=1)
        latest[external_id] = last[0][0] if last else None
    redis.close()
    window = Window()
    shares = [list(range(k, clients, CLIENT_PROCESSES)) for k in range(CLIENT_PROCESSES)]
    parts = [pool.submit(_client_part, side, window, base_url, redis_url, job_ids, latest, share) for share in shares]
    for part in parts:
        window.add(part.result())
    window.count_offered(redis_url, job_ids, clients)
    return window


def _figures(windows: list[Window]) -> dict:
    latencies = [latency for window in windows for latency in window.latencies]
    events, offered = sum(window.events for window in windows), sum(window.offered for window in windows)
    seconds = DURATION_S * len(windows)
    return {"windows": len(windows), "token_events": len(latencies), "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1), "events_per_s": round(events / seconds),
            "offered_events_per_s": round(offered / seconds),
            "delivered_in_window": round(events / offered, 3) if offered else None,
            "p99_ms_per_window": [round(percentile(window.latencies, 99), 1) for window in windows]}


def _start_jobs(base_url: str, count: int) -> list[str]:
    ids = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
        for n in range(count):
            body = {"title": f"Live {n}", "brief": "b", "outline": [{"title": "long"}],
                    "params": {"max_tokens_per_section": TOKENS_PER_JOB}}
            external_id = http.post("/jobs", json=body).json()["externalId"]
            http.post(f"/jobs/{external_id}/start")
            ids.append(external_id)
    return ids


def run(settings, *, client_counts: tuple[int, ...] = (100, 1000)) -> dict:
    fresh_services(settings).close()
    data_dir = Path(tempfile.mkdtemp(prefix="rtqcc-bench-sse-"))
    process, base_url = _start_stack(settings, data_dir)
    results: dict = {"jobs": JOBS, "tokens_per_s_per_job": TOKENS_PER_S, "measured_s_per_window": DURATION_S,
                     "order": "ours, baseline, baseline, ours (per client count)", "client_processes": CLIENT_PROCESSES}
    try:
        job_ids = _start_jobs(base_url, JOBS)
        with ProcessPoolExecutor(CLIENT_PROCESSES, mp_context=multiprocessing.get_context("spawn")) as pool:
            list(pool.map(time.sleep, [0.5] * CLIENT_PROCESSES))  # every client process up before a window opens
            for clients in client_counts:
                windows: dict[str, list[Window]] = {"ours": [], "baseline": []}
                for n in range(ROUNDS):
                    for side in (("ours", "baseline") if n % 2 == 0 else ("baseline", "ours")):
                        window = _window(pool, side, base_url, settings.redis_url, job_ids, clients)
                        if not window.events:
                            raise RuntimeError(f"no events reached the {side} clients in a window: did the jobs end?")
                        windows[side].append(window)
                ours, base = _figures(windows["ours"]), _figures(windows["baseline"])
                results[f"clients_{clients}"] = {
                    "ours": ours, "baseline_redis_pubsub": base,
                    "ratio_p50": round(ours["p50_ms"] / base["p50_ms"], 2),
                    "ratio_p99": round(ours["p99_ms"] / base["p99_ms"], 2),
                    "ratio_events_per_s": round(ours["events_per_s"] / base["events_per_s"], 3),
                }
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
            for external_id in job_ids:
                http.post(f"/jobs/{external_id}/cancel")
    finally:
        stop_local_stack(process)
    shutil.rmtree(data_dir, ignore_errors=True)  # kept after a failure: its stack.log says why
    results["goal_p99_ms"] = {"clients_100": 50, "clients_1000": 250}
    return results
