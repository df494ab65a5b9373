"""Sections per second through 1 and 2 consumers with an instant fake provider, beside as many
bare loops doing the minimum storage work a section needs: one S3 PUT, one Postgres commit, one
XADD. The consumers run one job at a time (`RTQCC_MAX_IN_FLIGHT=1`, like for like with a bare
loop's one section at a time: the per-section overhead), and then with their default slots. Both are processes (`python -m bench.throughput worker ...`) started the same way: each
builds its clients and makes one call to each service, says it is ready, and waits; when all are
ready they are told to go at once, and each reports the wall-clock time its work ended. A race
lasts from the go to the last end, by the same clock for both. The consumer's end is when its
drain returns: its last job, then one empty 1 ms read of the queue and its checkpoint."""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.store.jobs import NewJob, OutlineItem
from rtqcc.writing.providers.base import GenerationRequest
from rtqcc.writing.providers.fake import FakeProvider

from .stack import fresh_services, service_env

ROOT = Path(__file__).resolve().parent.parent
SECTIONS_PER_JOB = 5
TOKENS_PER_SECTION = 120
RAW_STREAM = "bench:raw"
GOAL_RATIO = 0.7


def _create_jobs(services: Services, jobs: int) -> None:
    outline = [OutlineItem(title=f"Part {n}", brief="what it covers") for n in range(SECTIONS_PER_JOB)]
    ids = [services.jobs.create(NewJob(
        tenant="bench", title=f"Bench {n}", brief="throughput", model="fake", outline=outline,
        section_count=None, params={"max_tokens_per_section": TOKENS_PER_SECTION}, budget={}, metadata={},
    )).external_id for n in range(jobs)]
    for external_id in ids:
        services.jobs.transition("bench", external_id, "start")
    pipe = services.redis.pipeline(transaction=False)
    for external_id in ids:
        services.queue.enqueue(external_id, pipeline=pipe)
    pipe.execute()


def _section_body() -> bytes:
    return FakeProvider().full_text(GenerationRequest(model="fake", system="s", prompt="p",
                                                      max_tokens=TOKENS_PER_SECTION)).encode()


# ---- the worker processes ---------------------------------------------------------------------

def _warm(services: Services, name: str) -> None:
    """One call to each service: connections open, clients built (boto3's takes tens of ms)."""
    services.redis.ping()
    services.db.row("SELECT 1 AS one")
    services.blobs.put(f"bench/warm/{name}.md", b"warm")


def _bare_loop(services: Services, numbers: range) -> int:
    body = _section_body()
    for n in numbers:
        key = f"bench/raw/{n}.md"
        services.blobs.put(key, body)
        services.db.run("INSERT INTO bench_raw (id, body_key) VALUES (:id, :key)", id=n, key=key)
        services.redis.xadd(RAW_STREAM, {"section": n})
    return len(numbers)


def worker(argv: list[str]) -> None:
    """`worker consumer NAME` or `worker bare NAME START STEP SECTIONS`: warm up, print `ready`,
    wait for a line on stdin, work, print what was done and when the work ended."""
    kind, name = argv[0], argv[1]
    services = Services(Settings.from_env())
    _warm(services, name)
    consumer = Consumer(services, name=name) if kind == "consumer" else None
    print("ready", flush=True)
    sys.stdin.readline()
    if consumer is not None:
        result = consumer.drain(TimeBudget(600).get_remaining_time_in_millis)
        done = {"jobs": result.completed, "sections": result.completed * SECTIONS_PER_JOB}
    else:
        start, step, sections = (int(value) for value in argv[2:5])
        done = {"sections": _bare_loop(services, range(start, sections, step))}
    ended = time.time()
    services.close()
    print(json.dumps({**done, "ended": ended}), flush=True)


# ---- the races --------------------------------------------------------------------------------

def _race(settings: Settings, commands: list[list[str]], **env: str) -> tuple[float, list[dict]]:
    """Start the workers, let them go together; (seconds from the go to the last end, their reports)."""
    env = service_env(settings, RTQCC_CONSUMER_IDLE_EXIT_MS="1", **env)
    processes = [subprocess.Popen([sys.executable, "-m", "bench.throughput", "worker", *command], cwd=ROOT, env=env,
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                 for command in commands]
    try:
        for process in processes:
            if process.stdout.readline().strip() != "ready":
                raise RuntimeError("a throughput worker did not start; see its stderr above")
        went = time.time()
        for process in processes:
            process.stdin.write("go\n")
            process.stdin.flush()
        reports = []
        for process in processes:
            line = process.stdout.readline()
            if process.wait(600) != 0 or not line:
                raise RuntimeError("a throughput worker failed; see its stderr above")
            reports.append(json.loads(line))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(5)
    return max(report["ended"] for report in reports) - went, reports


def ours(settings: Settings, jobs: int, consumers: int, in_flight: int | None = 1) -> float:
    services = fresh_services(settings)
    _create_jobs(services, jobs)
    services.close()
    slots = {"RTQCC_MAX_IN_FLIGHT": str(in_flight)} if in_flight else {}
    seconds, reports = _race(settings, [["consumer", f"bench-consumer-{n}"] for n in range(consumers)], **slots)
    completed = sum(report["jobs"] for report in reports)
    if completed != jobs:
        raise RuntimeError(f"the consumers completed {completed} of {jobs} jobs: {reports}")
    return jobs * SECTIONS_PER_JOB / seconds


def baseline(settings: Settings, sections: int, loops: int) -> float:
    services = fresh_services(settings)
    services.db.run("CREATE TABLE IF NOT EXISTS bench_raw (id int PRIMARY KEY, body_key text)")
    services.db.run("TRUNCATE bench_raw")
    services.redis.delete(RAW_STREAM)
    services.close()
    seconds, reports = _race(settings, [["bare", f"bench-bare-{n}", str(n), str(loops), str(sections)]
                                        for n in range(loops)])
    assert sum(report["sections"] for report in reports) == sections, reports
    return sections / seconds


# Sections a race: long enough that it measures sections per second, not a consumer's start (its
# first reads, connections, prepared statements, threads). With its default slots a consumer gave
# 198-201 sections/s over 60 jobs, 289-291 over 300 and 337-345 over 1,000: about 0.6 s of a
# 60-job race was its start. A bare loop has none: its one call to each service warms it.
JOBS_PER_RACE = 300


def run(settings: Settings, *, jobs: int = JOBS_PER_RACE, rounds: int = 3) -> dict:
    sections = jobs * SECTIONS_PER_JOB
    result: dict = {"sections_per_race": sections, "sections_per_job": SECTIONS_PER_JOB,
                    "tokens_per_section": TOKENS_PER_SECTION, "rounds": rounds,
                    "timing": "from the go, given to every ready process at once, to the last one's end; one clock"}
    for consumers in (1, 2):
        races: dict[str, list[float]] = {"ours": [], "ours_default_slots": [], "baseline": []}
        for n in range(rounds):  # ours first, then the bare loops first: drift hits both alike
            order = ("ours", "ours_default_slots", "baseline") if n % 2 == 0 else ("baseline", "ours_default_slots", "ours")
            for side in order:
                races[side].append(ours(settings, jobs, consumers) if side == "ours"
                                   else ours(settings, jobs, consumers, in_flight=None) if side == "ours_default_slots"
                                   else baseline(settings, sections, consumers))
        fresh_services(settings).close()
        rates = {side: statistics.median(values) for side, values in races.items()}
        result[f"consumers_{consumers}"] = {
            "ours_sections_per_s": round(rates["ours"], 1), "baseline_sections_per_s": round(rates["baseline"], 1),
            "ratio": round(rates["ours"] / rates["baseline"], 3),
            "ours_default_slots_sections_per_s": round(rates["ours_default_slots"], 1),
            "ratio_default_slots": round(rates["ours_default_slots"] / rates["baseline"], 3),
            **{f"{side}_per_race": [round(rate, 1) for rate in values] for side, values in races.items()},
        }
    result["goal_ratio"] = GOAL_RATIO
    return result


if __name__ == "__main__":
    if sys.argv[1:2] != ["worker"]:
        raise SystemExit("usage: python -m bench.throughput worker consumer NAME | worker bare NAME START STEP SECTIONS")
    worker(sys.argv[2:])
