"""A burst of jobs on a deployment whose consumers are scheduled invocations (Lambda), started all
at once with no consumer running: how long until all are done, and when the invocations came.

Lambda's Invoke API is played by a local HTTP server that starts each asynchronous invocation as
a consumer process (`rtqcc consume --budget-s ...`, the consumer function's drain), up to the
function's reserved concurrency, and drops the requests past it (Lambda would hold them, then
drop them after the template's minute). Ours: each start asks for an invocation where none is
reading the queue, and a consumer with every slot busy asks for as many as the jobs waiting would
fill (bus/consumer_wakeup.py). Baseline, in the same run: the one invocation a schedule gives, at
the best moment (the burst's own), with nothing asked for; the next would come a minute later."""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from redis import Redis

from rtqcc.bus.consumer_wakeup import ConsumerWakeup, lambda_invoker
from rtqcc.bus.events import events_key
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.store.jobs import NewJob, OutlineItem

from .stack import fresh_services, service_env

ROOT = Path(__file__).resolve().parent.parent
JOBS = 128
SECTIONS = 3
TOKENS_PER_SECTION = 40
TOKENS_PER_S = 50
SLOTS = 16               # RTQCC_MAX_IN_FLIGHT of each invocation
RESERVED = 8             # the function's reserved concurrency: 128 slots in all
BUDGET_S = 120
FUNCTION = "rtqcc-bench-consumer"


class LambdaStandIn:
    """Lambda's Invoke API on 127.0.0.1: each request an invocation of the consumer, as a process."""

    def __init__(self, env: dict[str, str]):
        self.env = env
        self.processes: list[subprocess.Popen] = []
        self.started_at: list[float] = []  # time.monotonic() of each invocation's start
        self.dropped = 0
        self._lock = threading.Lock()
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                stand_in.invoke()
                self.send_response(202)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def invoke(self) -> None:
        with self._lock:
            if sum(process.poll() is None for process in self.processes) >= RESERVED:
                self.dropped += 1
                return
            self.processes.append(subprocess.Popen(
                [sys.executable, "-m", "rtqcc.cli", "consume", "--budget-s", str(BUDGET_S)], env=self.env, cwd=ROOT,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            self.started_at.append(time.monotonic())

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            process.wait(30)


def _queue_burst(services: Services) -> list[str]:
    outline = [OutlineItem(title=f"Part {n}", brief="what it covers") for n in range(SECTIONS)]
    params = {"max_tokens_per_section": TOKENS_PER_SECTION}
    ids = [services.jobs.create(NewJob(tenant="bench", title=f"Burst {n}", brief="a burst", model="fake",
                                       outline=outline, section_count=None, params=params, budget={},
                                       metadata={})).external_id for n in range(JOBS)]
    for external_id in ids:
        services.jobs.transition("bench", external_id, "start")
    return ids


def _burst(settings: Settings, *, asking: bool) -> dict:
    services = fresh_services(settings)
    extra = {"RTQCC_MAX_IN_FLIGHT": str(SLOTS), "RTQCC_MAX_RUNNING_PER_TENANT": "0",
             "RTQCC_FAKE_TOKENS_PER_S": str(TOKENS_PER_S), "RTQCC_CONSUMER_IDLE_EXIT_MS": "1000"}
    lambda_api = LambdaStandIn(service_env(settings, **extra))
    if asking:
        # The consumers ask botocore's Lambda client, pointed at the stand-in by its endpoint variable.
        lambda_api.env.update({"RTQCC_CONSUMER_FUNCTION": FUNCTION, "AWS_ENDPOINT_URL_LAMBDA": lambda_api.url})
        services.consumer_wakeup = ConsumerWakeup(services.redis, lambda_invoker(
            FUNCTION, settings.s3_region, endpoint_url=lambda_api.url))
    try:
        ids = _queue_burst(services)
        went, went_wall = time.monotonic(), time.time()
        for external_id in ids:  # as the API's start does for each
            services.queue.enqueue(external_id)
            services.consumer_wakeup.job_queued()
        if not asking:
            lambda_api.invoke()  # the schedule's
        _wait_until_done(services.redis, ids, deadline=went + BUDGET_S)
        seconds = time.monotonic() - went
        peak, first_running = _running_at_once(services, since=went_wall)
    finally:
        lambda_api.stop()
        services.close()
    return {"seconds": round(seconds, 2), "peak_running": peak, "invocations": len(lambda_api.started_at),
            "invoked_after_s": [round(at - went, 2) for at in lambda_api.started_at], "dropped": lambda_api.dropped,
            "first_running_after_s": round(first_running, 2)}


def _wait_until_done(redis: Redis, ids: list[str], *, deadline: float) -> None:
    """Block on the jobs' event streams (one XREAD over all of them) until each has said `done`."""
    after = {events_key(external_id): "0-0" for external_id in ids}
    done: set[str] = set()
    while len(done) < len(ids):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the burst did not finish within {BUDGET_S} s: {len(done)} of {len(ids)} done")
        for key, entries in redis.xread(after, block=1000) or []:
            for entry_id, fields in entries:
                after[key] = entry_id
                if fields.get("type") == "done":
                    done.add(key)


def _running_at_once(services: Services, *, since: float) -> tuple[int, float]:
    """From the jobs' rows: the most running at once, and when the first started (s after `since`)."""
    rows = services.db.rows("SELECT EXTRACT(EPOCH FROM started_at)::float AS started,"
                            " EXTRACT(EPOCH FROM finished_at)::float AS finished FROM jobs")
    moves = sorted([(row["started"], 1) for row in rows] + [(row["finished"], -1) for row in rows])
    running = peak = 0
    for _, move in moves:
        running += move
        peak = max(peak, running)
    return peak, min(row["started"] for row in rows) - since


def run(settings: Settings) -> dict:
    # In the order ours, baseline, baseline, ours, so that drift hits both.
    rounds = [_burst(settings, asking=asking) for asking in (True, False, False, True)]
    ours, baseline = [rounds[0], rounds[3]], [rounds[1], rounds[2]]
    mean_s = {side: statistics.fmean(run["seconds"] for run in runs)
              for side, runs in (("ours", ours), ("baseline", baseline))}
    return {"jobs": JOBS, "sections_per_job": SECTIONS, "tokens_per_section": TOKENS_PER_SECTION,
            "tokens_per_s": TOKENS_PER_S, "slots_per_invocation": SLOTS, "reserved_concurrency": RESERVED,
            "ours": ours, "baseline": baseline, "ratio": round(mean_s["ours"] / mean_s["baseline"], 2)}
