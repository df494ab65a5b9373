"""Token latency with 20, then 200 jobs in flight, each watched: from the provider handing a token over to an
SSE client receiving it, through the local stack's gateway (`rtqcc up`, its live-tail hub, deltas
coalesced every `RTQCC_DELTA_FLUSH_MS` as by default).

The consumers are this bench's own processes (`python -m bench.token_latency consumer OUT`): the
product's Consumer with the fake provider paced at 50 tokens/s, each token stamped with the wall
clock as the provider hands it to the run. The clients stamp each `section.delta` as it arrives,
and a token's latency is from its stamp to the first delta that holds it. Baseline, in the same
run and on the same tokens: the jobs' Redis event streams read raw, by one XREAD BLOCK over all of
them in a process of its own, stamping the same way; the floor under any SSE path, the coalescing
included. One clock for all: every process is on this machine.

The 200 are measured twice. Started together, as the goal asks: every job then ends a section at
the same moment (every 2.4 s), and those moments, 200 stores, statements and events at once on
two cores, hold the tail. Then started one after another over one section's length, the
consumers already up: the same 200 in flight, their sections' ends spread out, as jobs
started by people rather than in one batch would have them."""

from __future__ import annotations

import asyncio
import json
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import redis.asyncio as aioredis
from redis import Redis

from rtqcc.bus.events import events_key
from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.writing.providers.fake import FakeProvider

from .stack import BENCH_KEY, fresh_services, percentile, service_env, start_local_stack, stop_local_stack

JOB_COUNTS = (20, 200)  # in flight at once, each watched: a light load, then the goal's
SECTIONS = 3
TOKENS_PER_SECTION = 120
TOKENS_PER_S = 50
SECTION_S = TOKENS_PER_SECTION / TOKENS_PER_S  # how long a section streams: the spread of the staggered starts
CONSUMERS = 2  # processes, with slots enough between them for every job at once
CLIENT_PROCESSES = 2
GOAL_P99_MS = 100
CONNECTED = "bench:latency:connected"  # a list: one entry per watcher (ours and the baseline's) following
CONSUMERS_UP = "bench:latency:consumers"  # a list: one entry per consumer process with its connections open
_PROMPT = re.compile(r"Document: (?P<title>[^\n]+).*?Write section (?P<section>\d+),", re.S)


class StampingProvider(FakeProvider):
    """The fake provider, noting when each token is handed over: {(title, section): [(chars so far, time)]}."""

    def __init__(self, stamps: dict, **pace):
        super().__init__(**pace)
        self.stamps = stamps

    def stream(self, request, abort, on_delta, on_wait=None):
        found = _PROMPT.search(request.prompt)
        marks = self.stamps.setdefault(f"{found['title']}\0{int(found['section']) - 1}", [])
        written = [len(request.prefix)]

        def stamped(piece: str) -> None:
            written[0] += len(piece)
            marks.append((written[0], time.time()))
            on_delta(piece)

        return super().stream(request, abort, stamped)


def consumer(out: str) -> None:
    """One consumer process: drain until idle, then write the stamps to `out`."""
    settings = Settings.from_env()
    stamps: dict = {}
    services = Services(settings, provider=StampingProvider(stamps, tokens_per_s=settings.fake_tokens_per_s))
    try:
        services.db.row("SELECT 1 AS one")  # connected before it says so
        services.redis.rpush(CONSUMERS_UP, os.getpid())
        Consumer(services, name=f"latency-{os.getpid()}").drain(TimeBudget(600).get_remaining_time_in_millis)
    finally:
        services.close()
        Path(out).write_text(json.dumps(stamps))


# ---- the watchers ---------------------------------------------------------------------------

async def _watch_sse(port: int, external_id: str, redis: aioredis.Redis, seen: list) -> None:
    """A lean SSE client (a socket, whole buffers split into lines), so that the client processes,
    on the same two cores, take as little as they can from what is measured."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
    try:
        writer.write(f"GET /jobs/{external_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                     f"Authorization: Bearer {BENCH_KEY}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(f"the stream of {external_id} answered {head[:40]!r}")
        received: dict[int, int] = {}
        tail, kind = b"", None
        while data := await reader.read(1 << 16):
            now = time.time()
            lines = (tail + data).split(b"\n")
            tail = lines.pop()
            for line in lines:  # event:, data:, id: and blank lines, and chunked encoding's sizes
                if line.startswith(b"event: "):
                    kind = line[7:]
                elif line.startswith(b"data: ") and kind == b"section.delta":
                    delta = json.loads(line[6:])
                    received[delta["index"]] = received.get(delta["index"], 0) + len(delta["text"])
                    seen.append((external_id, delta["index"], received[delta["index"]], now))
                elif line.startswith(b"data: ") and kind == b"snapshot":
                    await redis.rpush(CONNECTED, external_id)
                elif line.startswith(b"data: ") and kind == b"done":
                    return
    finally:
        writer.close()


async def _read_redis(redis: aioredis.Redis, job_ids: list[str], seen: list) -> None:
    """Every job's events by one XREAD over all their streams, the cheapest way to read them."""
    job_of = {events_key(external_id): external_id for external_id in job_ids}
    cursors = {key: "0-0" for key in job_of}
    received: dict[tuple[str, int], int] = {}
    for external_id in job_ids:
        await redis.rpush(CONNECTED, external_id)
    while cursors:
        found = await redis.xread(cursors, block=2000)
        for key, entries in found or []:
            for entry_id, fields in entries:
                cursors[key] = entry_id
                if fields["type"] == "section.delta":
                    data = json.loads(fields["data"])
                    at = (job_of[key], data["index"])
                    received[at] = received.get(at, 0) + len(data["text"])
                    seen.append((job_of[key], data["index"], received[at], time.time()))
                elif fields["type"] == "done":
                    del cursors[key]
                    break


async def _watchers(side: str, base_url: str, redis_url: str, job_ids: list[str]) -> list:
    seen: list = []
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True, max_connections=len(job_ids) + 10,
                                    socket_timeout=60)  # longer than a blocking read waits
    try:
        if side == "ours":
            port = urlsplit(base_url).port
            await asyncio.gather(*(_watch_sse(port, e, redis, seen) for e in job_ids))
        else:
            await _read_redis(redis, job_ids, seen)
    finally:
        await redis.aclose()
    return seen


def _watch(side: str, base_url: str, redis_url: str, job_ids: list[str]) -> list:
    import uvloop

    return uvloop.run(_watchers(side, base_url, redis_url, job_ids))


# ---- the run -------------------------------------------------------------------------------------

def _latencies(stamps: dict, seen: list, title_of: dict[str, str]) -> tuple[list[float], int]:
    """Each stamped token's latency to the first delta that holds it; and how many never arrived."""
    arrivals: dict[tuple[str, int], tuple[list[int], list[float]]] = {}
    for external_id, idx, chars, at in sorted(seen, key=lambda s: (s[0], s[1], s[2])):
        sizes, times = arrivals.setdefault((title_of[external_id], idx), ([], []))
        sizes.append(chars)
        times.append(at)
    latencies, missing = [], 0
    for key, marks in stamps.items():
        title, idx = key.split("\0")
        sizes, times = arrivals.get((title, int(idx)), ([], []))
        for chars, emitted in marks:
            at = bisect_left(sizes, chars)
            if at == len(sizes):
                missing += 1
            else:
                latencies.append((times[at] - emitted) * 1000)
    return latencies, missing


def _summary(latencies: list[float], missing: int) -> dict:
    return {"tokens": len(latencies), "missing": missing, "p50_ms": round(percentile(latencies, 50), 1),
            "p99_ms": round(percentile(latencies, 99), 1), "max_ms": round(max(latencies), 1)}


def run(settings: Settings) -> dict:
    runs = {str(jobs): _run(settings, jobs) for jobs in JOB_COUNTS}
    runs[f"{JOB_COUNTS[-1]} staggered"] = _run(settings, JOB_COUNTS[-1], started_over_s=SECTION_S)
    return {"runs": runs, "goal_jobs": JOB_COUNTS[-1], "goal_p99_ms": GOAL_P99_MS}


def _run(settings: Settings, jobs: int, started_over_s: float = 0.0) -> dict:
    services = fresh_services(settings)
    data_dir = Path(tempfile.mkdtemp(prefix="rtqcc-bench-latency-"))
    stack, base_url = start_local_stack(settings, data_dir, args=("--consumers", "0"),
                                        RTQCC_MAX_STREAMS_PER_TENANT="100000", RTQCC_MAX_STREAMS_PER_KEY="100000",
                                        RTQCC_SSE_HEARTBEAT_S="5")
    redis = Redis.from_url(settings.redis_url, decode_responses=True)
    consumers: list[subprocess.Popen] = []
    try:
        outline = [{"title": f"Part {n}"} for n in range(SECTIONS)]
        title_of: dict[str, str] = {}
        with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
            for n in range(jobs):
                body = {"title": f"Latency {n}", "brief": "watched", "outline": outline,
                        "params": {"max_tokens_per_section": TOKENS_PER_SECTION}}
                title_of[http.post("/jobs", json=body).json()["externalId"]] = body["title"]
        job_ids = list(title_of)
        redis.delete(CONNECTED, CONSUMERS_UP)
        env = service_env(settings, RTQCC_MAX_IN_FLIGHT=str(jobs // CONSUMERS + 10), RTQCC_MAX_RUNNING_PER_TENANT="0",
                          RTQCC_FAKE_TOKENS_PER_S=str(TOKENS_PER_S), RTQCC_CONSUMER_IDLE_EXIT_MS="3000",
                          RTQCC_API_KEYS=f"{BENCH_KEY}:bench")
        outputs = [data_dir / f"stamps-{n}.json" for n in range(CONSUMERS)]
        with ProcessPoolExecutor(CLIENT_PROCESSES + 1, mp_context=multiprocessing.get_context("spawn")) as pool:
            shares = [job_ids[k::CLIENT_PROCESSES] for k in range(CLIENT_PROCESSES)]
            ours = [pool.submit(_watch, "ours", base_url, settings.redis_url, share) for share in shares]
            baseline = pool.submit(_watch, "baseline", base_url, settings.redis_url, job_ids)
            deadline = time.monotonic() + 120
            _await_pushes(redis, CONNECTED, 2 * jobs, deadline, "watchers following their jobs")
            with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}) as http:
                if started_over_s:
                    # The consumers up first, then one start every started_over_s / jobs.
                    consumers = _start_consumers(outputs, env)
                    _await_pushes(redis, CONSUMERS_UP, CONSUMERS, deadline, "consumers connected")
                    began = time.monotonic()
                    for n, external_id in enumerate(job_ids):
                        time.sleep(max(0.0, began + n * started_over_s / jobs - time.monotonic()))
                        http.post(f"/jobs/{external_id}/start")
                else:
                    # Every job queued first, then the consumers started: they take the jobs
                    # together, so all of them are in flight at once.
                    for external_id in job_ids:
                        http.post(f"/jobs/{external_id}/start")
                    consumers = _start_consumers(outputs, env)
            peak = 0
            while running := [c for c in consumers if c.poll() is None]:
                peak = max(peak, services.db.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status = 'running'")["n"])
                try:  # sampled until every consumer has exited
                    running[0].wait(0.2)
                except subprocess.TimeoutExpired:
                    pass
            seen_ours = [s for part in ours for s in part.result()]
            seen_baseline = baseline.result()
        stamps: dict = {}
        for out in outputs:
            stamps.update(json.loads(out.read_text()))
        completed = services.db.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status = 'completed'")["n"]
    finally:
        for process in consumers:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        redis.close()
        services.close()
        stop_local_stack(stack)
        shutil.rmtree(data_dir, ignore_errors=True)
    ours_ms, ours_missing = _latencies(stamps, seen_ours, title_of)
    base_ms, base_missing = _latencies(stamps, seen_baseline, title_of)
    figures = {"jobs": jobs, "started_over_s": started_over_s, "completed": completed, "sections_per_job": SECTIONS,
               "tokens_per_section": TOKENS_PER_SECTION, "tokens_per_s_per_job": TOKENS_PER_S,
               "delta_flush_ms": settings.delta_flush_ms, "consumers": CONSUMERS, "peak_running": peak,
               "ours": _summary(ours_ms, ours_missing), "baseline": _summary(base_ms, base_missing),
               "baseline_reader": "one XREAD"}
    figures["ratio_p99"] = round(figures["ours"]["p99_ms"] / figures["baseline"]["p99_ms"], 2)
    return figures


def _await_pushes(redis: Redis, key: str, count: int, deadline: float, what: str) -> None:
    """Block until `count` entries were pushed on `key` (one by each process when it is ready)."""
    for pushed in range(count):
        if not redis.blpop([key], timeout=max(1, int(deadline - time.monotonic()))):
            raise RuntimeError(f"only {pushed} of {count} {what}")


def _start_consumers(outputs: list[Path], env: dict[str, str]) -> list[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-m", "bench.token_latency", "consumer", str(out)],
                             env=env, cwd=Path(__file__).resolve().parent.parent) for out in outputs]


if __name__ == "__main__":
    if sys.argv[1:2] == ["consumer"]:
        consumer(sys.argv[2])
