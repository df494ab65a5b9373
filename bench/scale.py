"""Ten thousand queued one-section jobs drained by one consumer process (the emulator's scheduled
invocation, `python -m rtqcc_emulator.invoke_consumer`), with the process's resident memory
sampled as it goes; and the gateway's memory and latency while the jobs pile up and after they
are done. Baseline: a bare XREADGROUP + XACK loop over as many no-op messages on the same Redis,
so the ratio says what our per-job work costs against the queue alone."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx

from rtqcc.ids import new_external_id
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.bus.work_queue import GROUP, STREAM


from .stack import BENCH_KEY, fresh_services, percentile, service_env

ROOT = Path(__file__).resolve().parent.parent
SAMPLE_EVERY_S = 0.5
CHUNK = 1000
CALLS_PER_ROUND = 40  # of each kind: GET /jobs?limit=100 and GET /jobs/{id}
TOKENS_PER_SECTION = 5

# The emulator's gateway over HTTP in its own process, serving the bench services; it stops when
# its stdin closes.
_GATEWAY = """
import sys
from rtqcc.api import create_app
from rtqcc.api.streaming import create_stream_handler
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc_emulator.gateway import Gateway
from rtqcc_emulator.server import ServerThread, create_http_app

services = Services(Settings.from_env())
gateway = Gateway(create_app(lambda: services), stream_handler=create_stream_handler(lambda: services))
server = ServerThread(create_http_app(gateway), port=0).start()
print(server.base_url, flush=True)
sys.stdin.read()
server.stop()
gateway.close()
services.close()
"""


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (the peak so far) of a live process, in kB."""
    found = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)


def _insert_jobs(services: Services, count: int) -> list[str]:
    """`count` queued one-section jobs in one statement, and their messages in one pipeline."""
    ids = [new_external_id() for _ in range(count)]
    services.db.run(
        "WITH made AS (INSERT INTO jobs (external_id, tenant, title, brief, model, params, section_count,"
        " outline_given, status)"
        " SELECT e, 'bench', 'Scale ' || n, 'scale', 'fake', CAST(:params AS jsonb), 1, true, 'queued'"
        " FROM unnest(CAST(:ids AS text[])) WITH ORDINALITY AS t(e, n) RETURNING id)"
        " INSERT INTO sections (job_id, idx, title, brief) SELECT id, 0, 'Only', 'scale' FROM made",
        ids=ids, params=json.dumps({"max_tokens_per_section": TOKENS_PER_SECTION}))
    # A deployment's autovacuum keeps the planner's statistics within a tenth of the table as jobs
    # arrive; a thousand rows loaded in one statement are ahead of it (its nap is a minute), and
    # plans made for a near-empty table would be measured instead of the API.
    services.db.run("ANALYZE jobs, sections")
    pipe = services.redis.pipeline(transaction=False)
    for external_id in ids:
        services.queue.enqueue(external_id, pipeline=pipe)
    pipe.execute()
    return ids


class _GatewayProcess:
    def __init__(self, env: dict[str, str]):
        self.process = subprocess.Popen([sys.executable, "-c", _GATEWAY], env=env, cwd=ROOT, text=True,
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.base_url = (self.process.stdout.readline() or "").strip()
        if not self.base_url.startswith("http://"):
            self.stop()
            raise RuntimeError("the gateway process did not start")
        self.http = httpx.Client(base_url=self.base_url, headers={"Authorization": f"Bearer {BENCH_KEY}"}, timeout=30)

    def round(self, services: Services, ids: list[str], jobs_so_far: int, rng: random.Random) -> dict:
        scans_before = _table_scans(services)
        timings: dict[str, list[float]] = {"list": [], "get": []}
        for _ in range(CALLS_PER_ROUND):
            for kind, path in (("list", "/jobs?limit=100"), ("get", f"/jobs/{rng.choice(ids)}")):
                started = time.perf_counter()
                response = self.http.get(path)
                timings[kind].append(time.perf_counter() - started)
                if response.status_code != 200:
                    raise RuntimeError(f"GET {path}: {response.status_code} {response.text[:300]}")
        rss_kb = memory_kb(self.process.pid)["VmRSS"]
        time.sleep(1.1)  # Postgres publishes a backend's table statistics at most once a second
        seq_scans = _table_scans(services)["seq_scan"] - scans_before["seq_scan"]
        return {"jobs": jobs_so_far, "rss_mb": _mb(rss_kb),
                "list_p50_ms": round(percentile(timings["list"], 50) * 1000, 2),
                "get_p50_ms": round(percentile(timings["get"], 50) * 1000, 2),
                "jobs_seq_scans": seq_scans}  # a sequential scan per list call would grow with the table

    def stop(self) -> None:
        if getattr(self, "http", None):
            self.http.close()
        try:
            self.process.stdin.close()
            self.process.wait(15)
        except (OSError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(5)


def _table_scans(services: Services) -> dict[str, int]:
    row = services.db.row("SELECT seq_scan, COALESCE(idx_scan, 0) AS idx_scan FROM pg_stat_user_tables"
                          " WHERE relname = 'jobs'")
    return {"seq_scan": row["seq_scan"], "idx_scan": row["idx_scan"]} if row else {"seq_scan": 0, "idx_scan": 0}


def _done(services: Services) -> int:
    """Messages the group has read and acknowledged."""
    for group in services.redis.xinfo_groups(STREAM):
        if group["name"] == GROUP:
            return (group.get("entries-read") or 0) - group["pending"]
    return 0


def _drain_in_subprocess(settings: Settings, services: Services, jobs: int, budget_s: float) -> dict:
    idle_exit_ms = 1500  # long enough that a sample lands after the last job and before the exit
    env = service_env(settings, RTQCC_CONSUMER_IDLE_EXIT_MS=str(idle_exit_ms))
    started = time.perf_counter()
    consumer = subprocess.Popen([sys.executable, "-m", "rtqcc_emulator.invoke_consumer", "--budget-s", str(budget_s)],
                                env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    samples: list[tuple[float, int, dict]] = []  # (seconds in, jobs done, memory)
    try:
        while consumer.poll() is None:
            try:
                memory = memory_kb(consumer.pid)
            except (FileNotFoundError, ProcessLookupError):
                break
            samples.append((time.perf_counter() - started, _done(services), memory))
            time.sleep(SAMPLE_EVERY_S)
        output, _ = consumer.communicate(timeout=budget_s + 30)
    finally:
        if consumer.poll() is None:
            consumer.terminate()
            consumer.wait(15)
    wall_s = time.perf_counter() - started
    summary = json.loads(output.strip().splitlines()[-1]) if output.strip() else {}
    span = services.db.row(
        "SELECT COUNT(*)::int AS completed, EXTRACT(EPOCH FROM MAX(finished_at) - MIN(started_at))::float AS span_s"
        " FROM jobs WHERE status = 'completed'")
    completed, span_s = span["completed"], span["span_s"] or float("nan")

    def at(fraction: float) -> dict | None:
        for seconds, done, memory in samples:
            if done >= fraction * jobs:
                return {"done": done, "at_s": round(seconds, 1), "rss_mb": _mb(memory.get("VmRSS"))}
        return None

    first_busy = next(((s, d, m) for s, d, m in samples if d > 0), samples[0] if samples else None)
    return {
        "jobs": jobs,
        "budget_s": budget_s,
        "completed": completed,
        "all_done": completed == jobs,
        "drain_s": round(span_s, 2),
        "jobs_per_s": round(completed / span_s, 1),
        "per_job_ms": round(span_s / max(completed, 1) * 1000, 2),
        "process_wall_s": round(wall_s, 1),
        "consumer_summary": {k: summary.get(k) for k in ("processed", "completed", "requeued", "failed", "skipped")},
        "rss_mb": {
            "first_job_done": _mb(first_busy[2].get("VmRSS")) if first_busy else None,
            "at_10pct": at(0.10), "at_50pct": at(0.50), "at_100pct": at(1.0),
            "peak": _mb(samples[-1][2].get("VmHWM")) if samples else None,
        },
        "samples": len(samples),
        "timing": "drain_s from the first job's start to the last one's finish (Postgres clock)",
    }


def baseline(services: Services, messages: int, batch: int) -> float:
    """Messages per second through a bare XREADGROUP + XACK loop, one XACK per message."""
    stream, group = "bench:raw-scale", "raw"
    redis = services.redis
    redis.delete(stream)
    for start in range(0, messages, CHUNK):
        pipe = redis.pipeline(transaction=False)
        for n in range(start, min(messages, start + CHUNK)):
            pipe.xadd(stream, {"externalId": f"raw-{n}"})
        pipe.execute()
    redis.xgroup_create(stream, group, id="0")
    done = 0
    started = time.perf_counter()
    while done < messages:
        for _, entries in redis.xreadgroup(group, "raw", {stream: ">"}, count=batch, block=1000) or []:
            for message_id, _fields in entries:
                redis.xack(stream, group, message_id)
                done += 1
    elapsed = time.perf_counter() - started
    redis.delete(stream)
    return messages / elapsed


def run(settings: Settings, *, jobs: int = 10_000, budget_s: float = 900.0) -> dict:  # the deployed consumer's timeout
    services = fresh_services(settings)
    services.blobs.put("bench/warm-up", b"warm")  # a fresh S3 server allocates its volumes on the first write
    services.queue.ensure_group()
    rng = random.Random(14)
    gateway = _GatewayProcess(service_env(settings, RTQCC_RATE_LIMIT_PER_MIN="0"))
    try:
        rounds = []
        ids: list[str] = []
        insert_s = 0.0
        while len(ids) < jobs:
            started = time.perf_counter()
            ids += _insert_jobs(services, min(CHUNK, jobs - len(ids)))
            insert_s += time.perf_counter() - started
            chunks, total_chunks = -(-len(ids) // CHUNK), -(-jobs // CHUNK)
            if chunks in (1, total_chunks // 4, total_chunks // 2, total_chunks):
                rounds.append(gateway.round(services, ids, len(ids), rng))
        drained = _drain_in_subprocess(settings, services, jobs, budget_s)
        after = gateway.round(services, ids, len(ids), rng)
        after["state"] = "all completed" if drained["all_done"] else "after the drain"
        rounds.append(after)
    finally:
        gateway.stop()
    base_rate = baseline(services, jobs, 1)
    services.close()
    fresh_services(settings).close()  # leave nothing queued behind
    return {
        "insert": {"jobs": jobs, "seconds": round(insert_s, 2)},
        "consumer": drained,
        "gateway": rounds,
        "baseline_xreadgroup_xack_per_s": round(base_rate, 1),
        "ratio_jobs_per_s_to_baseline": round(drained["jobs_per_s"] / base_rate, 4),
    }
