"""Sections per second through the consumer with an instant fake provider, with 1 and 2
consumers, beside bare loops (as many) doing the minimum storage work a section needs: one S3
PUT, one Postgres commit, one XADD."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from rtqcc.consumer import Consumer, TimeBudget
from rtqcc.jobs import NewJob, OutlineItem
from rtqcc.providers.base import GenerationRequest
from rtqcc.providers.fake import FakeProvider
from rtqcc.services import Services

from .stack import fresh_services

SECTIONS_PER_JOB = 5
TOKENS_PER_SECTION = 120


def _create_jobs(services: Services, jobs: int) -> list[str]:
    outline = [OutlineItem(title=f"Part {n}", brief="what it covers") for n in range(SECTIONS_PER_JOB)]
    return [services.jobs.create(NewJob(
        tenant="bench", title=f"Bench {n}", brief="throughput", model="fake", outline=outline,
        section_count=None, params={"max_tokens_per_section": TOKENS_PER_SECTION}, budget={}, metadata={},
    )).external_id for n in range(jobs)]


def _start(services: Services, ids: list[str]) -> None:
    for external_id in ids:
        services.jobs.transition("bench", external_id, "start")
    pipe = services.redis.pipeline(transaction=False)
    for external_id in ids:
        services.queue.enqueue(external_id, pipeline=pipe)
    pipe.execute()


def _enqueue_jobs(services: Services, jobs: int) -> None:
    _start(services, _create_jobs(services, jobs))


def ours(settings, jobs: int) -> float:
    services = fresh_services(settings)
    _enqueue_jobs(services, jobs)
    consumer = Consumer(services, name="bench-consumer")
    started = time.perf_counter()
    result = consumer.drain(TimeBudget(600).get_remaining_time_in_millis)
    elapsed = time.perf_counter() - started - settings.consumer_idle_exit_ms / 1000  # the idle wait at the end
    assert result.completed == jobs, result
    return jobs * SECTIONS_PER_JOB / elapsed


def ours_in_processes(settings, jobs: int, consumers: int) -> float:
    """Consumers as separate processes (like Lambda invocations), started and waiting before
    the jobs are enqueued; timed until Postgres says every job is completed."""
    from .cold_start import service_env

    services = fresh_services(settings)
    ids = _create_jobs(services, jobs)
    services.queue.ensure_group()
    env = service_env(settings, RTQCC_CONSUMER_IDLE_EXIT_MS="0")
    processes = [subprocess.Popen([sys.executable, "-m", "rtqcc_emulator.invoke_consumer", "--budget-s", "600"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(consumers)]
    try:
        deadline = time.monotonic() + 60
        while len(services.redis.xinfo_consumers(services.queue.stream, services.queue.group)) < consumers:
            if time.monotonic() > deadline:
                raise RuntimeError("the consumer processes did not start")
            time.sleep(0.05)
        started = time.perf_counter()
        _start(services, ids)
        while services.db.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status = 'completed'")["n"] < jobs:
            if time.perf_counter() - started > 600:
                raise RuntimeError("the jobs did not complete")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            process.wait(30)
    return jobs * SECTIONS_PER_JOB / elapsed


def baseline(settings, sections: int, loops: int = 1) -> float:
    services = fresh_services(settings)
    body = FakeProvider().full_text(GenerationRequest(model="fake", system="s", prompt="p",
                                                      max_tokens=TOKENS_PER_SECTION)).encode()
    services.db.run("CREATE TABLE IF NOT EXISTS bench_raw (id int PRIMARY KEY, body_key text)")
    services.db.run("TRUNCATE bench_raw")

    def loop(numbers: range) -> None:
        for n in numbers:
            key = f"bench/raw/{n}.md"
            services.blobs.put(key, body)
            services.db.run("INSERT INTO bench_raw (id, body_key) VALUES (:id, :key)", id=n, key=key)
            services.redis.xadd("bench:raw", {"section": n})

    threads = [threading.Thread(target=loop, args=(range(i, sections, loops),)) for i in range(loops)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return sections / (time.perf_counter() - started)


def run(settings, *, jobs: int = 40) -> dict:
    sections = jobs * SECTIONS_PER_JOB
    one, one_base = ours(settings, jobs), baseline(settings, sections)
    two, two_base = ours_in_processes(settings, jobs, 2), baseline(settings, sections, loops=2)
    return {
        "sections": sections,
        "consumers_1": {"ours_sections_per_s": round(one, 1), "baseline_sections_per_s": round(one_base, 1),
                        "ratio": round(one / one_base, 3)},
        "consumers_2": {"ours_sections_per_s": round(two, 1), "baseline_sections_per_s": round(two_base, 1),
                        "ratio": round(two / two_base, 3)},
        "goal_ratio": 0.7,
    }
