"""Sections per second through the consumer with an instant fake provider, beside a bare loop
doing the minimum storage work a section needs: one S3 PUT, one Postgres commit, one XADD."""

from __future__ import annotations

import time

from rtqcc.consumer import Consumer, TimeBudget
from rtqcc.jobs import NewJob, OutlineItem
from rtqcc.providers.base import GenerationRequest
from rtqcc.providers.fake import FakeProvider
from rtqcc.services import Services

from .stack import fresh_services

SECTIONS_PER_JOB = 5
TOKENS_PER_SECTION = 120


def _enqueue_jobs(services: Services, jobs: int) -> None:
    outline = [OutlineItem(title=f"Part {n}", brief="what it covers") for n in range(SECTIONS_PER_JOB)]
    for n in range(jobs):
        job = services.jobs.create(NewJob(
            tenant="bench", title=f"Bench {n}", brief="throughput", model="fake", outline=outline,
            section_count=None, params={"max_tokens_per_section": TOKENS_PER_SECTION}, budget={}, metadata={}))
        services.jobs.transition("bench", job.external_id, "start")
        services.queue.enqueue(job.external_id)


def ours(settings, jobs: int) -> float:
    services = fresh_services(settings)
    _enqueue_jobs(services, jobs)
    consumer = Consumer(services, name="bench-consumer")
    started = time.perf_counter()
    result = consumer.drain(TimeBudget(600).get_remaining_time_in_millis)
    elapsed = time.perf_counter() - started - settings.consumer_idle_exit_ms / 1000  # the idle wait at the end
    assert result.completed == jobs, result
    return jobs * SECTIONS_PER_JOB / elapsed


def baseline(settings, sections: int) -> float:
    services = fresh_services(settings)
    body = FakeProvider().full_text(GenerationRequest(model="fake", system="s", prompt="p",
                                                      max_tokens=TOKENS_PER_SECTION)).encode()
    services.db.run("CREATE TABLE IF NOT EXISTS bench_raw (id int PRIMARY KEY, body_key text)")
    services.db.run("TRUNCATE bench_raw")
    started = time.perf_counter()
    for n in range(sections):
        key = f"bench/raw/{n}.md"
        services.blobs.put(key, body)
        services.db.run("INSERT INTO bench_raw (id, body_key) VALUES (:id, :key)", id=n, key=key)
        services.redis.xadd("bench:raw", {"section": n})
    return sections / (time.perf_counter() - started)


def run(settings, *, jobs: int = 40) -> dict:
    ours_rate = ours(settings, jobs)
    base_rate = baseline(settings, jobs * SECTIONS_PER_JOB)
    return {
        "sections": jobs * SECTIONS_PER_JOB,
        "ours_sections_per_s": round(ours_rate, 1),
        "baseline_sections_per_s": round(base_rate, 1),
        "ratio": round(ours_rate / base_rate, 3),
    }
