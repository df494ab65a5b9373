"""Per-task overhead beside two well-kept Python task queues on the same Redis: the same no-op
work queued N times and drained by one worker of arq and of Celery, and our consumer draining
sections whose generation is instant (the fake provider at full speed, a few tokens each).

Ours does per section what a durable job needs (a lease, fenced Postgres writes, an S3 object,
events on a Redis stream); arq and Celery do per task what a task queue needs. The ratio is what
that durability costs per unit of work, not a like-for-like race."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.store.jobs import NewJob, OutlineItem
from rtqcc.services import Services
from rtqcc.settings import Settings

from .stack import fresh_services

ROOT = Path(__file__).resolve().parent.parent
SECTIONS_PER_JOB = 5
TOKENS_PER_SECTION = 5
CELERY_WARM_QUEUE = "bench.warm"
CELERY_QUEUE = "bench.peers"


# ---- arq: a burst worker in this process, one job at a time -----------------------------------

async def _arq_noop(ctx: dict) -> None:
    return None


async def _arq(redis_url: str, tasks: int) -> tuple[float, float]:
    from arq import create_pool
    from arq.connections import RedisSettings
    from arq.worker import Worker, func

    redis_settings = RedisSettings.from_dsn(redis_url)
    pool = await create_pool(redis_settings)
    try:
        started = time.perf_counter()
        for _ in range(tasks):
            await pool.enqueue_job("noop")
        enqueue_s = time.perf_counter() - started
        # poll_delay=0: arq's default (0.5 s) with one job at a time would measure the poll delay.
        worker = Worker(functions=[func(_arq_noop, name="noop")], redis_pool=pool, burst=True, max_jobs=1,
                        poll_delay=0, handle_signals=False, log_results=False)
        started = time.perf_counter()
        await worker.async_run()
        drain_s = time.perf_counter() - started
        if worker.jobs_complete != tasks:
            raise RuntimeError(f"arq completed {worker.jobs_complete} of {tasks} jobs")
    finally:
        await pool.aclose()
    return enqueue_s, drain_s


def arq_figures(settings: Settings, tasks: int) -> dict:
    fresh_services(settings).close()  # an empty db
    enqueue_s, drain_s = asyncio.run(_arq(settings.redis_url, tasks))
    return {"per_task_ms": round(drain_s / tasks * 1000, 3), "tasks_per_s": round(tasks / drain_s, 1),
            "enqueue_per_task_ms": round(enqueue_s / tasks * 1000, 3),
            "worker": "in-process burst worker, max_jobs=1, poll_delay=0, results kept (arq's default)"}


# ---- Celery: a solo worker in a subprocess ---------------------------------------------------

def celery_app(redis_url: str):
    """The bench's Celery app; the worker subprocess builds the same one."""
    from celery import Celery

    app = Celery("rtqcc_bench_peers", broker=redis_url, backend=redis_url)
    app.conf.update(task_default_queue=CELERY_WARM_QUEUE, broker_connection_retry_on_startup=True,
                    worker_hijack_root_logger=False, result_expires=600)

    @app.task(name="bench.noop", ignore_result=True)
    def noop() -> None:
        return None

    @app.task(name="bench.marker")
    def marker() -> str:
        return "done"

    return app


_CELERY_WORKER = """
import sys
from bench.peers import celery_app
celery_app(sys.argv[1]).worker_main(["worker", "--pool=solo", "--concurrency=1", "--queues=" + sys.argv[2],
    "--hostname=bench-peers@%h", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
    "--without-heartbeat"])
"""


def celery_figures(settings: Settings, tasks: int) -> dict:
    fresh_services(settings).close()
    app = celery_app(settings.redis_url)
    log = tempfile.TemporaryFile()
    worker = subprocess.Popen([sys.executable, "-c", _CELERY_WORKER, settings.redis_url, CELERY_WARM_QUEUE],
                              cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        # Up and consuming: one task through the warm-up queue.
        app.tasks["bench.marker"].apply_async(queue=CELERY_WARM_QUEUE).get(timeout=60)
        # Between two markers, N tasks wait in a queue the worker does not read yet, as ours wait in
        # jobs:pending. The drain is timed between the markers' finishing times, by the worker's clock:
        # the worker only notices the new queue when its current blocking read (1 s) returns.
        marker, noop = app.tasks["bench.marker"], app.tasks["bench.noop"]
        first = marker.apply_async(queue=CELERY_QUEUE)
        started = time.perf_counter()
        with app.producer_or_acquire() as producer:
            for _ in range(tasks):
                noop.apply_async(queue=CELERY_QUEUE, producer=producer)
        enqueue_s = time.perf_counter() - started
        last = marker.apply_async(queue=CELERY_QUEUE)
        app.control.add_consumer(CELERY_QUEUE, reply=False)
        if last.get(timeout=300) != "done" or first.get(timeout=10) != "done":
            raise RuntimeError("the Celery marker tasks did not finish")
        drain_s = (last.date_done - first.date_done).total_seconds()
    except Exception as exc:
        log.seek(0)
        raise RuntimeError(f"Celery bench failed; the worker said: {log.read()[-1500:].decode(errors='replace')}") from exc
    finally:
        worker.terminate()  # warm shutdown
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait(5)
        log.close()
        app.close()
    done = tasks + 1  # the last marker too
    return {"per_task_ms": round(drain_s / done * 1000, 3), "tasks_per_s": round(done / drain_s, 1),
            "enqueue_per_task_ms": round(enqueue_s / tasks * 1000, 3),
            "worker": "subprocess, --pool solo --concurrency 1, Redis broker and result backend (db of the bench), "
                      "no-op results ignored, default prefetch; timed from the first marker's end to the last's"}


# ---- ours -------------------------------------------------------------------------------------

def _enqueue_jobs(services: Services, jobs: int) -> None:
    outline = [OutlineItem(title=f"Part {n}", brief="b") for n in range(SECTIONS_PER_JOB)]
    for n in range(jobs):
        job = services.jobs.create(NewJob(
            tenant="bench", title=f"Peers {n}", brief="peers", model="fake", outline=outline, section_count=None,
            params={"max_tokens_per_section": TOKENS_PER_SECTION}, budget={}, metadata={}))
        services.jobs.transition("bench", job.external_id, "start")
        services.queue.enqueue(job.external_id)


def our_figures(settings: Settings, sections: int) -> dict:
    jobs = max(1, sections // SECTIONS_PER_JOB)
    # A 1 ms idle exit: the drain returns right after its last job (one empty 1 ms read and its
    # checkpoint), so its wall time is the work's, with nothing to subtract.
    services = fresh_services(settings, fake_tokens_per_s=0.0, consumer_idle_exit_ms=1)
    consumer = Consumer(services, name="bench-peers")
    # One job first: connections open, and the S3 server past its first write (which allocates volumes).
    _enqueue_jobs(services, 1)
    consumer.drain(TimeBudget(120).get_remaining_time_in_millis)
    started = time.perf_counter()
    _enqueue_jobs(services, jobs)
    enqueue_s = time.perf_counter() - started
    started = time.perf_counter()
    result = consumer.drain(TimeBudget(600).get_remaining_time_in_millis)
    drain_s = time.perf_counter() - started
    services.close()
    if result.completed != jobs:
        raise RuntimeError(f"our consumer completed {result.completed} of {jobs} jobs: {result}")
    done = jobs * SECTIONS_PER_JOB
    return {"jobs": jobs, "sections_per_job": SECTIONS_PER_JOB, "per_section_ms": round(drain_s / done * 1000, 3),
            "per_job_ms": round(drain_s / jobs * 1000, 3), "sections_per_s": round(done / drain_s, 1),
            "enqueue_per_job_ms": round(enqueue_s / jobs * 1000, 3),
            "worker": "one Consumer in this process, fake provider at full speed, "
                      f"{TOKENS_PER_SECTION} tokens a section, create+start+enqueue not timed in the drain"}


def run(settings: Settings, *, tasks: int = 500) -> dict:
    ours = our_figures(settings, tasks)
    arq = arq_figures(settings, tasks)
    celery = celery_figures(settings, tasks)
    fresh_services(settings).close()  # leave nothing queued behind
    return {
        "tasks": tasks,
        "ours": ours,
        "arq": arq,
        "celery": celery,
        "ratio_ours_per_section_to_arq_per_task": round(ours["per_section_ms"] / arq["per_task_ms"], 2),
        "ratio_ours_per_section_to_celery_per_task": round(ours["per_section_ms"] / celery["per_task_ms"], 2),
    }
