"""Many jobs at once on the local stack (`rtqcc up`, its default consumers and slots), the fake
provider paced at 50 tokens a second, three-section jobs with their outline given:

- together: N jobs started at once against one job alone (the baseline, measured in the same
  run, before and after): how much longer N take than one, the peak of jobs running at once, and
  the consumers' memory per job in flight (their RSS at the peak beside their RSS running one),
  the CPU a job of each process serving the jobs, with the time that CPU alone takes on this
  machine's cores (`cpu_floor_s`, a lower bound: the gateway and this bench are not counted), and
  how busy all the cores were over the run (`machine_busy_share`);
- fairness: tenant A starts 300 jobs, then tenant B one, on a stack with the production cap on a
  tenant's running jobs (32): how long B's job waits to start, beside how long A's last one waits;
- parallel sections: a 12-section job with `parallel_sections: 4` beside the same job in order.

Jobs are started as the API would (Postgres queued, then one XADD each, pipelined), so that the
clock measures the consumers, not an HTTP client."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path

from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.store.jobs import NewJob, OutlineItem

from .stack import fresh_services, start_local_stack, stop_local_stack

TOKENS_PER_S = 50
TOKENS_PER_SECTION = 120
SECTIONS = 3
PRODUCTION_TENANT_CAP = 32
WARM_UP_JOBS = 32  # four reads' worth at 8 a read (RTQCC_CONSUMER_READ_BATCH): each consumer takes some
POLL_S = 0.1  # how often Postgres and Redis are asked whether the jobs are done, the consumers up


def _create(services: Services, count: int, tenant: str = "bench", *, sections: int = SECTIONS,
            **params: int) -> list[str]:
    outline = [OutlineItem(title=f"Part {n}", brief="what it covers") for n in range(sections)]
    return [services.jobs.create(NewJob(
        tenant=tenant, title=f"Capacity {n}", brief="many at once", model="fake", outline=outline,
        section_count=None, params={"max_tokens_per_section": TOKENS_PER_SECTION, **params}, budget={}, metadata={},
    )).external_id for n in range(count)]


def _start(services: Services, ids: list[str]) -> float:
    """Queue every job in Postgres, then put them all on the stream at once; when they went."""
    services.db.run("UPDATE jobs SET status = 'queued', updated_at = now() WHERE external_id = ANY(CAST(:e AS text[]))",
                    e=ids)
    pipe = services.redis.pipeline(transaction=False)
    for external_id in ids:
        services.queue.enqueue(external_id, pipeline=pipe)
    went = time.time()
    pipe.execute()
    return went


class Sampler:
    """While jobs run: the most running at once (Postgres), and the consumers' RSS then (/proc)."""

    def __init__(self, services: Services, stack_pid: int):
        self.services = services
        self.stack_pid = stack_pid
        self.peak_running = 0
        self.rss_at_peak_kb = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(0.05):
            running = self.services.db.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status = 'running'")["n"]
            if running > self.peak_running:
                self.peak_running, self.rss_at_peak_kb = running, consumers_rss_kb(self.stack_pid)
            elif running == self.peak_running:
                self.rss_at_peak_kb = max(self.rss_at_peak_kb, consumers_rss_kb(self.stack_pid))


def _is_consumer(cmdline: bytes) -> bool:
    return b"invoke_consumer" in cmdline or b" consume" in cmdline


def consumers_rss_kb(stack_pid: int) -> int:
    """The resident memory of the stack's consumer processes (its children running `consume`)."""
    total = 0
    for child in _children(stack_pid):
        try:
            cmdline = Path(f"/proc/{child}/cmdline").read_bytes().replace(b"\0", b" ")
            if not _is_consumer(cmdline):
                continue
            for line in Path(f"/proc/{child}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
    return total


def cpu_seconds(stack_pid: int) -> dict[str, dict[int, float]]:
    """CPU time so far (user + system, /proc/<pid>/stat) of each process serving the jobs, by
    kind: the stack's consumers, the S3 server, Postgres (its server processes, every database's),
    Redis."""
    consumers = set(_children(stack_pid))
    tick = os.sysconf("SC_CLK_TCK")
    found: dict[str, dict[int, float]] = {"consumers": {}, "s3_server": {}, "postgres": {}, "redis": {}}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ") if int(entry.name) in consumers else b""
        except OSError:
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        kind = ("consumers" if _is_consumer(cmdline)
                else "s3_server" if name == "weed" else "postgres" if name.startswith("postgres")
                else "redis" if name.startswith("redis-server") else None)
        if kind:
            found[kind][int(entry.name)] = (int(fields[11]) + int(fields[12])) / tick
    return found


def machine_jiffies() -> tuple[int, int]:
    """(busy, all) time of every core since boot, in clock ticks (/proc/stat): idle and I/O wait
    are the only times not busy."""
    ticks = [int(value) for value in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(ticks) - ticks[3] - ticks[4], sum(ticks)


def cpu_ms_per_job(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]], jobs: int) -> dict:
    """Each kind's CPU between two readings, a job (a process that ended between them is not counted)."""
    return {kind: round(sum(seconds - before[kind].get(pid, 0.0) for pid, seconds in after[kind].items())
                        * 1000 / jobs, 1) for kind in after}


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def _wait_done(services: Services, ids: list[str], timeout_s: float) -> float:
    """When the last of `ids` completed (wall clock, from Postgres)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        row = services.db.row(
            "SELECT COUNT(*) FILTER (WHERE status = 'completed')::int AS done,"
            " COUNT(*) FILTER (WHERE status = 'failed')::int AS failed, EXTRACT(EPOCH FROM MAX(finished_at)) AS last"
            " FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))", e=ids)
        if row["failed"]:
            raise RuntimeError(f"{row['failed']} of {len(ids)} jobs failed")
        if row["done"] == len(ids):
            return float(row["last"])
        time.sleep(POLL_S)
    raise RuntimeError(f"{len(ids)} jobs did not complete within {timeout_s:.0f}s")


def wait_for_consumers(services: Services, count: int = 2, timeout_s: float = 60) -> None:
    """Until `count` consumers are reading the queue (up and waiting for work). Redis lists a
    consumer in XINFO CONSUMERS only once it was handed a message, so the connections blocked in
    XREADGROUP on the queue's database are counted instead."""
    db = services.redis.connection_pool.connection_kwargs.get("db", 0)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        readers = [client for client in services.redis.client_list()
                   if client.get("cmd") == "xreadgroup" and int(client.get("db", -1)) == db]
        if len(readers) >= count:
            return
        time.sleep(POLL_S)
    raise RuntimeError(f"fewer than {count} consumers read the queue within {timeout_s:.0f}s")


def _together(services: Services, stack_pid: int, count: int) -> dict:
    ids = _create(services, count)
    idle_kb = consumers_rss_kb(stack_pid)  # the same consumer processes, waiting for work
    cpu_before, machine_before = cpu_seconds(stack_pid), machine_jiffies()
    with Sampler(services, stack_pid) as sampler:
        went = _start(services, ids)
        ended = _wait_done(services, ids, timeout_s=600)
    machine_after = machine_jiffies()
    return {"jobs": count, "seconds": round(ended - went, 2), "peak_running": sampler.peak_running,
            "cpu_ms_per_job": cpu_ms_per_job(cpu_before, cpu_seconds(stack_pid), count),
            "machine_busy_share": round((machine_after[0] - machine_before[0])
                                        / max(1, machine_after[1] - machine_before[1]), 2),
            "consumers_rss_kb_idle": idle_kb, "consumers_rss_kb_at_peak": sampler.rss_at_peak_kb,
            "rss_kb_per_job_in_flight": round((sampler.rss_at_peak_kb - idle_kb) / max(1, sampler.peak_running), 1)}


def _stack(settings: Settings, *args: str) -> tuple:
    data_dir = Path(tempfile.mkdtemp(prefix="rtqcc-bench-capacity-"))
    process, _ = start_local_stack(settings, data_dir, args=("--consumer-budget-s", "600", *args),
                                   RTQCC_FAKE_TOKENS_PER_S=str(TOKENS_PER_S))
    return process, data_dir


def together(settings: Settings, counts: tuple[int, ...]) -> dict:
    services = fresh_services(settings)
    process, data_dir = _stack(settings)
    try:
        wait_for_consumers(services)
        # Not measured: every consumer makes its clients (S3's runtime and pools among them) on
        # first use, which would count as memory of the first run's jobs in flight.
        _together(services, process.pid, WARM_UP_JOBS)
        alone = [_together(services, process.pid, 1)]
        runs = [_together(services, process.pid, count) for count in counts]
        alone.append(_together(services, process.pid, 1))
    finally:
        stop_local_stack(process)
        services.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    one = statistics.mean(run["seconds"] for run in alone)
    result: dict = {"baseline_one_job": {"seconds_each": [run["seconds"] for run in alone],
                                         "rss_kb_per_job_in_flight": [run["rss_kb_per_job_in_flight"] for run in alone]}}
    cores = os.cpu_count() or 1
    for run in runs:
        # However the jobs are spread over consumers and slots, they cannot end sooner than their
        # CPU takes on every core at once: a ratio below cpu_floor_ratio needs less CPU a job.
        floor_s = sum(run["cpu_ms_per_job"].values()) * run["jobs"] / 1000 / cores
        result[f"jobs_{run['jobs']}"] = {**run, "ratio_to_one_alone": round(run["seconds"] / one, 2),
                                         "cpu_floor_s": round(floor_s, 2), "cpu_floor_ratio": round(floor_s / one, 2)}
    result["cores"] = cores
    result["goals"] = {"jobs_200_ratio": 1.3, "jobs_1000_ratio": 2.0, "rss_kb_per_job": 1024}
    return result


def fairness(settings: Settings, flood: int = 300) -> dict:
    services = fresh_services(settings)
    process, data_dir = _stack(settings, "--max-running-per-tenant", str(PRODUCTION_TENANT_CAP))
    try:
        wait_for_consumers(services)
        flooding = _create(services, flood, tenant="tenant-a")
        lone = _create(services, 1, tenant="tenant-b")
        went_a = _start(services, flooding)
        went_b = _start(services, lone)
        _wait_done(services, [*flooding, *lone], timeout_s=900)
        started = {row["external_id"]: float(row["started"]) for row in services.db.rows(
            "SELECT external_id, EXTRACT(EPOCH FROM started_at) AS started FROM jobs"
            " WHERE external_id = ANY(CAST(:e AS text[]))", e=[*flooding, *lone])}
    finally:
        stop_local_stack(process)
        services.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    a_waits = sorted(started[e] - went_a for e in flooding)
    return {"tenant_a_jobs": flood, "cap_per_tenant": PRODUCTION_TENANT_CAP,
            "tenant_b_wait_s": round(started[lone[0]] - went_b, 3),
            "tenant_a_first_wait_s": round(a_waits[0], 3), "tenant_a_last_wait_s": round(a_waits[-1], 3),
            "goal_tenant_b_wait_s": 2.0}


def parallel_sections(settings: Settings, sections: int = 12, width: int = 4) -> dict:
    services = fresh_services(settings)
    process, data_dir = _stack(settings)
    try:
        wait_for_consumers(services)
        timings: dict[str, list[float]] = {"in_order": [], "parallel": []}
        for side in ("in_order", "parallel", "parallel", "in_order"):  # ABBA: drift hits both alike
            ids = _create(services, 1, sections=sections, **({"parallel_sections": width} if side == "parallel" else {}))
            went = _start(services, ids)
            timings[side].append(_wait_done(services, ids, timeout_s=600) - went)
    finally:
        stop_local_stack(process)
        services.close()
    shutil.rmtree(data_dir, ignore_errors=True)
    in_order, parallel = statistics.mean(timings["in_order"]), statistics.mean(timings["parallel"])
    return {"sections": sections, "parallel_sections": width, "in_order_s": [round(t, 2) for t in timings["in_order"]],
            "parallel_s": [round(t, 2) for t in timings["parallel"]], "ratio": round(parallel / in_order, 3),
            "goal_ratio": 0.35}


def run(settings: Settings, *, counts: tuple[int, ...] = (50, 200, 1000)) -> dict:
    return {"tokens_per_s": TOKENS_PER_S, "sections_per_job": SECTIONS, "tokens_per_section": TOKENS_PER_SECTION,
            "together": together(settings, counts), "fairness": fairness(settings),
            "parallel_sections": parallel_sections(settings)}
