"""Sections per second through the consumer with an instant fake provider, with 1 and 2
consumers, beside bare loops (as many) doing the minimum storage work a section needs: one S3
PUT, one Postgres commit, one XADD."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time

from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.store.jobs import NewJob, OutlineItem
from rtqcc.writing.providers.base import GenerationRequest
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.services import Services

from .stack import fresh_services, service_env

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
    """Consumers as separate processes (like Lambda invocations); timed by Postgres, from the
    first job taken to the last one finished, so process start-up is not counted."""
    services = fresh_services(settings)
    _enqueue_jobs(services, jobs)
    env = service_env(settings, RTQCC_CONSUMER_IDLE_EXIT_MS="500")
    processes = [subprocess.Popen([sys.executable, "-m", "rtqcc_emulator.invoke_consumer", "--budget-s", "600"],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(consumers)]
    try:
        for process in processes:
            process.wait(600)  # each exits once the queue has stayed empty for half a second
    finally:
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                process.wait(30)
    row = services.db.row(
        "SELECT COUNT(*) FILTER (WHERE status = 'completed')::int AS done,"
        " EXTRACT(EPOCH FROM MAX(finished_at) - MIN(started_at))::float AS seconds FROM jobs")
    assert row["done"] == jobs, row
    return jobs * SECTIONS_PER_JOB / row["seconds"]


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
