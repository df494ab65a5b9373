"""Live delivery: many concurrent SSE clients on running jobs, through the production gateway
(`rtqcc serve`, its worker processes in their own processes, the jobs' consumers in `rtqcc up`),
measuring each token event's latency from its publication (the time in its Redis stream id) to the
client, and events per second delivered. Baseline: as many raw Redis pub/sub subscribers on the
same jobs' events, the floor under any SSE server. Both take turns on one supply of events (the
same jobs, streaming from the same consumers), in windows ordered ours, baseline, baseline, ours,
so that drift in the supply (or a busy moment on the machine) falls on both alike.

Each window connects its own clients (ours as a new browser tab does: a snapshot, then the live
tail, so nothing is replayed); its measured part starts once every client is connected and
counts only the events published inside it, beside how many were published for its clients then
(each event times the clients following its job). The clients on both sides are alike and lean:
asyncio sockets on uvloop reading whole buffers and finding each event's id in the bytes (an SSE
`id:` line; the `"id"` of a pub/sub message), so that the client processes, on the same two
cores, take as little as they can from what is measured."""

from __future__ import annotations

import asyncio
import math
import multiprocessing
import shutil
import subprocess
import sys
import tempfile
import time
from array import array
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
from redis import Redis

from rtqcc.bus.events import events_key

from .stack import (BENCH_KEY, fresh_services, percentile, service_env, start_announcing, start_local_stack,
                    stop_local_stack)

JOBS = 10
TOKENS_PER_S = 40
GATEWAY_WORKERS = 2
DURATION_S = 8.0
SETTLE_S = 1.0     # after the last client connected, before the measured part begins
LATE_S = 3.0       # the clients listen this long past the measured part, for its late events
ROUNDS = 2         # of (ours, baseline) windows per client count, in the order ABBA
# The clients of a window are spread over this many processes (each with its own event loop), so
# that one Python process parsing every event is less of a ceiling on both sides.
CLIENT_PROCESSES = 2
CONNECTING_AT_ONCE = 200  # per client process: a burst of thousands of SYNs overflows any backlog
# Every job must stream through all the windows (3 client counts x 4 windows, each with its
# connecting (minutes for 5,000, on a busy gateway), settling and 12 s of listening); they are
# cancelled at the end: three sections of 30,000 tokens (the most a section may ask for) at 40/s
# would last 37 minutes.
SECTIONS_PER_JOB = 3
TOKENS_PER_SECTION = 30_000
DELTA = b"section.delta"


@dataclass
class Part:
    """One client process's share of a window: when all its clients were connected, when they
    stopped listening (wall clock, as Redis stream ids carry it) and every event they received:
    its publication time (ms) and, for token events, its latency (ms)."""

    connected_at: float = 0.0
    stopped_at: float = 0.0
    published_ms: array = field(default_factory=lambda: array("q"))
    delta_published_ms: array = field(default_factory=lambda: array("q"))
    delta_latency_ms: array = field(default_factory=lambda: array("d"))

    def saw(self, event_id: bytes, is_delta: bool, now_ms: float) -> None:
        published = int(event_id.split(b"-", 1)[0])
        self.published_ms.append(published)
        if is_delta:
            self.delta_published_ms.append(published)
            self.delta_latency_ms.append(now_ms - published)


async def _sse_client(port: int, external_id: str, part: Part, connected: asyncio.Event,
                      opening: asyncio.Semaphore) -> None:
    async with opening:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(f"GET /jobs/{external_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {BENCH_KEY}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the stream of {external_id} answered {head[:40]!r}")
    connected.set()
    tail, event_id = b"", None
    try:
        while data := await reader.read(1 << 16):
            now_ms = time.time() * 1000
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:  # id:, event:, data: and blank lines, and chunked encoding's sizes
                if line.startswith(b"id: "):
                    event_id = line[4:]
                elif line.startswith(b"event: ") and event_id is not None:
                    part.saw(event_id, line[7:] == DELTA, now_ms)
                    event_id = None
    finally:
        writer.close()


async def _pubsub_client(port: int, channel: str, part: Part, connected: asyncio.Event,
                         opening: asyncio.Semaphore) -> None:
    async with opening:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
        writer.write(f"*2\r\n$9\r\nSUBSCRIBE\r\n${len(channel)}\r\n{channel}\r\n".encode())
        await reader.readuntil(b":1\r\n")  # the subscription's confirmation
    connected.set()
    tail = b""
    try:
        while data := await reader.read(1 << 16):
            now_ms = time.time() * 1000
            lines = (tail + data).split(b"\r\n")
            tail = lines.pop()
            for line in lines:  # RESP's framing lines, the channel, and each message's JSON
                if line.startswith(b'{"id":"'):
                    end = line.index(b'"', 7)
                    part.saw(line[7:end], line.startswith(b'","type":"section.delta"', end), now_ms)
    finally:
        writer.close()


async def _clients(side: str, port: int, job_ids: list[str], clients: list[int], listen_s: float,
                   all_connected) -> Part:
    part = Part()
    opening = asyncio.Semaphore(CONNECTING_AT_ONCE)
    connected = [asyncio.Event() for _ in clients]
    tasks = []
    for n, ready in zip(clients, connected):
        job = job_ids[n % len(job_ids)]  # client k follows job k % jobs
        tasks.append(asyncio.create_task(
            _sse_client(port, job, part, ready, opening) if side == "ours"
            else _pubsub_client(port, events_key(job), part, ready, opening)))
    waiting = asyncio.gather(*(ready.wait() for ready in connected))
    done, _ = await asyncio.wait([asyncio.ensure_future(waiting), *tasks], return_when=asyncio.FIRST_COMPLETED)
    for task in tasks:
        if task in done:  # a client ended before all were connected: its error says why
            task.result()
            raise RuntimeError(f"a {side} client's stream ended while the window was connecting")
    # Every client process waits here for the others (their clients meanwhile read on), so the
    # measured part starts with every client of the window connected.
    await asyncio.get_running_loop().run_in_executor(None, all_connected.wait, 900)
    part.connected_at = time.time()
    await asyncio.sleep(listen_s)
    part.stopped_at = time.time()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return part


def _client_part(side: str, port: int, job_ids: list[str], clients: list[int], listen_s: float,
                 all_connected) -> Part:
    """One client process's share of a window (run in the pool)."""
    import uvloop

    return uvloop.run(_clients(side, port, job_ids, clients, listen_s, all_connected))


@dataclass
class Window:
    """A window's measured part: the events published in [start, end), by the wall clock."""

    start: float
    end: float
    latencies: list[float]
    events: int
    offered: int  # events published in the window, times the clients of their job
    connecting_s: float


def _window(pool: ProcessPoolExecutor, barrier, side: str, port: int, redis_url: str, job_ids: list[str],
            clients: int) -> Window:
    redis = Redis.from_url(redis_url, decode_responses=True)
    began = time.time()
    listen_s = SETTLE_S + DURATION_S + LATE_S + 1.0
    shares = [list(range(k, clients, CLIENT_PROCESSES)) for k in range(CLIENT_PROCESSES)]
    parts = [part.result() for part in [pool.submit(_client_part, side, port, job_ids, share, listen_s, barrier)
                                         for share in shares]]
    start = max(part.connected_at for part in parts) + SETTLE_S
    end = min(start + DURATION_S, min(part.stopped_at for part in parts) - LATE_S)
    if end - start < DURATION_S / 2:
        raise RuntimeError(f"the {side} client processes finished connecting too far apart to share a window")
    first_ms, after_ms = math.ceil(start * 1000), math.ceil(end * 1000)
    latencies, events = [], 0
    for part in parts:
        events += sum(1 for ms in part.published_ms if first_ms <= ms < after_ms)
        latencies += [lat for ms, lat in zip(part.delta_published_ms, part.delta_latency_ms) if first_ms <= ms < after_ms]
    offered = 0
    for n, external_id in enumerate(job_ids):
        published = redis.xrange(events_key(external_id), min=str(first_ms), max=str(after_ms - 1))
        offered += len(published) * len(range(n, clients, len(job_ids)))
    redis.close()
    return Window(start, end, latencies, events, offered, round(max(p.connected_at for p in parts) - began, 2))


def _figures(windows: list[Window]) -> dict:
    latencies = [latency for window in windows for latency in window.latencies]
    events, offered = sum(window.events for window in windows), sum(window.offered for window in windows)
    seconds = sum(window.end - window.start for window in windows)
    return {"windows": len(windows), "token_events": len(latencies), "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1), "events_per_s": round(events / seconds),
            "offered_events_per_s": round(offered / seconds),
            "delivered_in_window": round(events / offered, 3) if offered else None,
            "p99_ms_per_window": [round(percentile(window.latencies, 99), 1) for window in windows],
            "connecting_s_per_window": [window.connecting_s for window in windows]}


def _start_jobs(base_url: str, count: int) -> list[str]:
    ids = []
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
        for n in range(count):
            body = {"title": f"Live {n}", "brief": "b", "outline": [{"title": f"long {k}"} for k in range(SECTIONS_PER_JOB)],
                    "params": {"max_tokens_per_section": TOKENS_PER_SECTION}}
            external_id = http.post("/jobs", json=body).json()["externalId"]
            http.post(f"/jobs/{external_id}/start")
            ids.append(external_id)
    return ids


def _start_gateway(settings, data_dir: Path, workers: int) -> tuple[subprocess.Popen, str]:
    """`rtqcc serve` over the bench's services, as a container runs it."""
    env = service_env(settings, RTQCC_SSE_HEARTBEAT_S="5", RTQCC_DELTA_FLUSH_MS="0", RTQCC_RATE_LIMIT_PER_MIN="0")
    return start_announcing(["serve", "--port", "0", "--workers", str(workers)], env, data_dir / "gateway.log",
                            address=r"listening on (http://\S+)")


def run(settings, *, client_counts: tuple[int, ...] = (100, 1000, 5000)) -> dict:
    fresh_services(settings).close()
    data_dir = Path(tempfile.mkdtemp(prefix="rtqcc-bench-sse-"))
    # `rtqcc up` runs the jobs (one consumer each); one tenant plays every client: its stream caps are lifted.
    stack, stack_url = start_local_stack(
        settings, data_dir, args=("--consumers", str(JOBS), "--consumer-budget-s", "900"),
        RTQCC_MAX_STREAMS_PER_TENANT="100000", RTQCC_MAX_STREAMS_PER_KEY="100000",
        RTQCC_FAKE_TOKENS_PER_S=str(TOKENS_PER_S), RTQCC_DELTA_FLUSH_MS="0")
    gateway = None
    results: dict = {"jobs": JOBS, "tokens_per_s_per_job": TOKENS_PER_S, "measured_s_per_window": DURATION_S,
                     "gateway": f"rtqcc serve --workers {GATEWAY_WORKERS}",
                     "order": "ours, baseline, baseline, ours (per client count)", "client_processes": CLIENT_PROCESSES}
    try:
        gateway, gateway_url = _start_gateway(settings, data_dir, GATEWAY_WORKERS)
        job_ids = _start_jobs(stack_url, JOBS)
        ports = {"ours": urlsplit(gateway_url).port, "baseline": urlsplit(settings.redis_url).port or 6379}
        context = multiprocessing.get_context("spawn")
        with context.Manager() as manager, ProcessPoolExecutor(CLIENT_PROCESSES, mp_context=context) as pool:
            barrier = manager.Barrier(CLIENT_PROCESSES)
            list(pool.map(time.sleep, [0.5] * CLIENT_PROCESSES))  # every client process up before a window opens
            for clients in client_counts:
                windows: dict[str, list[Window]] = {"ours": [], "baseline": []}
                for n in range(ROUNDS):
                    for side in (("ours", "baseline") if n % 2 == 0 else ("baseline", "ours")):
                        window = _window(pool, barrier, side, ports[side], settings.redis_url, job_ids, clients)
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
                print(f"  {clients} clients: ours p99 {ours['p99_ms']} ms, baseline p99 {base['p99_ms']} ms", file=sys.stderr)
        with httpx.Client(base_url=stack_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
            for external_id in job_ids:
                http.post(f"/jobs/{external_id}/cancel")
    finally:
        if gateway is not None:
            stop_local_stack(gateway)
        stop_local_stack(stack)
    shutil.rmtree(data_dir, ignore_errors=True)  # kept after a failure: its logs say why
    results["goal_p99_ms"] = {"clients_100": 50, "clients_1000": 250, "clients_5000": 1000}
    return results
