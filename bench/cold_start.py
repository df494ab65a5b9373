"""The cold start of each function: a fresh interpreter imports the entry module (loaded by path,
as Lambda loads it) and serves its first invocation; beside `import boto3` in a fresh interpreter,
measured the same way. One extra run under `-X importtime` shows which packages the API
function's cold path spends its time importing."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from rtqcc.api import create_app
from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.store.jobs import NewJob, OutlineItem
from rtqcc.settings import Settings
from rtqcc_emulator.gateway import STREAM_RESOURCE, Gateway, GatewayRequest

from .stack import BENCH_KEY, fresh_services, percentile, service_env

ROOT = Path(__file__).resolve().parent.parent
ENTRY_MODULES = {
    "api": (ROOT / "functions/api/app.py", "app"),
    "consumer": (ROOT / "functions/consumer/consumer_function.py", "consumer_function"),
    "stream": (ROOT / "functions/stream/stream_function.py", "stream_function"),
}
GOAL_API_MS = 250
CONSUMER_BUDGET_MS = 20  # the consumer's first invocation waits at most this long on the empty queue
MARKER = "COLD-START-RESULT "

# Runs in the fresh interpreter. The clock starts after the brief is parsed, right before the entry
# module is loaded, so all that is timed is what a Lambda container pays after its runtime is up.
_SCRIPT = r'''
import json, sys, time
brief = json.loads(sys.argv[1])
started = time.perf_counter()

class Context:
    """The parts of a Lambda context the handlers use; cheaper to import than chalice.local."""
    def __init__(self, budget_ms):
        self._deadline = time.monotonic() + budget_ms / 1000
        self.aws_request_id = "cold-start"
        self.function_name = brief["kind"]
        self.memory_limit_in_mb = 512
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:" + brief["kind"]
    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.monotonic()) * 1000))

def load(path, name):
    import importlib.util
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

marks = {}
kind = brief["kind"]
if kind == "baseline":
    import boto3
    marks["import_ms"] = time.perf_counter() - started
else:
    module = load(brief["path"], brief["module"])
    marks["import_ms"] = time.perf_counter() - started
    if kind == "api":
        for label, event in (("healthz_ms", brief["healthz"]), ("get_job_ms", brief["get_job"])):
            before = time.perf_counter()
            answer = module.app(event, Context(29000))
            marks[label] = time.perf_counter() - before
            if answer["statusCode"] != 200:
                raise SystemExit(f"{label}: {answer['statusCode']} {answer.get('body')}")
    elif kind == "consumer":
        before = time.perf_counter()
        summary = module.handler({}, Context(brief["budget_ms"]))
        marks["drain_ms"] = time.perf_counter() - before
        if summary.get("processed") != 0:
            raise SystemExit(f"the queue was not empty: {summary}")
    elif kind == "stream":
        before = time.perf_counter()
        answer = module.handler(brief["stream"], Context(900000))
        body = b"".join(answer.chunks)
        marks["stream_ms"] = time.perf_counter() - before
        if answer.status != 200 or b"event: done" not in body:
            raise SystemExit(f"stream: {answer.status} {body[:300]!r}")
marks["total_ms"] = time.perf_counter() - started
print(MARKER + json.dumps({k: round(v * 1000, 2) for k, v in marks.items()}), flush=True)
'''.replace("MARKER", repr(MARKER))


def _completed_job(settings: Settings) -> str:
    """A finished one-section job, so `GET /jobs/{id}` has a full document and its stream ends."""
    services = fresh_services(settings)
    job = services.jobs.create(NewJob(
        tenant="bench", title="Cold start", brief="b", model="fake", outline=[OutlineItem(title="Only")],
        section_count=None, params={"max_tokens_per_section": 20}, budget={}, metadata={}))
    services.jobs.transition("bench", job.external_id, "start")
    services.queue.enqueue(job.external_id)
    result = Consumer(services, name="bench-cold-start").drain(TimeBudget(60).get_remaining_time_in_millis)
    assert result.completed == 1, result
    services.close()
    return job.external_id


def _events(external_id: str) -> dict[str, dict]:
    """Real API Gateway REST proxy events, built by the emulator's gateway."""
    gateway = Gateway(create_app(lambda: None))
    try:
        auth = [("authorization", f"Bearer {BENCH_KEY}"), ("user-agent", "rtqcc-bench")]
        return {
            "healthz": gateway.build_event(GatewayRequest("GET", "/healthz", headers=auth[1:]), "/healthz", {}),
            "get_job": gateway.build_event(GatewayRequest("GET", f"/jobs/{external_id}", headers=auth),
                                           "/jobs/{external_id}", {"external_id": external_id}),
            "stream": gateway.build_event(GatewayRequest("GET", f"/jobs/{external_id}/stream", headers=auth),
                                          STREAM_RESOURCE, {"external_id": external_id}),
        }
    finally:
        gateway.close()


def _brief(kind: str, events: dict[str, dict]) -> dict:
    if kind == "baseline":
        return {"kind": kind}
    path, module = ENTRY_MODULES[kind]
    return {"kind": kind, "path": str(path), "module": module, "budget_ms": CONSUMER_BUDGET_MS, **events}


def _run_once(kind: str, events: dict[str, dict], env: dict[str, str], *flags: str) -> tuple[dict, float, str]:
    """One fresh interpreter: its own figures, the wall time of the whole process, and its stderr."""
    command = [sys.executable, *flags, "-c", _SCRIPT, json.dumps(_brief(kind, events))]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=120)
    wall_s = time.perf_counter() - started
    found = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"cold start of {kind} failed ({done.returncode}): {done.stderr[-2000:]}")
    return json.loads(found[-1][len(MARKER):]), wall_s * 1000, done.stderr


def _summary(samples: list[dict], walls_ms: list[float]) -> dict:
    figures = {}
    for key in samples[0]:
        values = [sample[key] for sample in samples]
        figures[key] = {"p50": round(percentile(values, 50), 1), "mean": round(statistics.fmean(values), 1)}
    figures["process_wall_ms"] = {"p50": round(percentile(walls_ms, 50), 1),
                                  "mean": round(statistics.fmean(walls_ms), 1)}
    return {"n": len(samples), **figures}


_IMPORT_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)")


def heaviest_imports(stderr: str, top: int = 5) -> dict:
    """From `-X importtime` output: import time per top-level package (the self time of all its
    modules, so nothing is counted twice), the `top` heaviest with the chain of imports that first
    pulled each one in, and the modules of our own package that cost the most with what they import."""
    entries = []  # (level, module, self_us, cumulative_us); children are listed before their parent
    for line in stderr.splitlines():
        match = _IMPORT_LINE.match(line)
        if match:
            entries.append((len(match.group(3)) // 2, match.group(4), int(match.group(1)), int(match.group(2))))

    def chain(n: int) -> str:
        names, level = [entries[n][1]], entries[n][0]
        for lv, module, _, _ in entries[n + 1:]:
            if level == 0:
                break
            if lv == level - 1:
                names.append(module)
                level = lv
        return " <- ".join([*names, "(entry)"])

    by_package: dict[str, int] = defaultdict(int)
    first_seen: dict[str, int] = {}
    for n, (_, module, self_us, _) in enumerate(entries):
        package = module.split(".")[0]
        by_package[package] += self_us
        first_seen.setdefault(package, n)
    # The package's own entry (its __init__), listed after the submodules it imported itself.
    own_entry = {module: n for n, (_, module, _, _) in enumerate(entries) if "." not in module}
    total_us = sum(by_package.values())
    heaviest = sorted(by_package.items(), key=lambda item: item[1], reverse=True)[:top]
    ours = sorted(((cumulative, n) for n, (_, module, _, cumulative) in enumerate(entries)
                   if module.startswith("rtqcc.") and cumulative < 0.5 * total_us), reverse=True)[:top]
    return {
        "all_imports_ms": round(total_us / 1000, 1),
        f"top{top}_packages_sum_ms": round(sum(us for _, us in heaviest) / 1000, 1),
        f"top{top}_packages": [{"package": p, "ms": round(us / 1000, 1),
                                "imported_via": chain(own_entry.get(p, first_seen[p]))} for p, us in heaviest],
        "rtqcc_modules_by_cumulative_ms": [{"module": entries[n][1], "ms": round(us / 1000, 1), "imported_via": chain(n)}
                                           for us, n in ours],
        "note": "-X importtime adds its own overhead; compare these with each other, not with the runs above",
    }


def run(settings: Settings, *, repeats: int = 10) -> dict:
    external_id = _completed_job(settings)
    load_before = os.getloadavg()[0]
    events = _events(external_id)
    env = service_env(settings)
    kinds = ["baseline", "api", "consumer", "stream"]
    for kind in kinds:  # once each untimed: the bytecode caches are written, the services are warm
        _run_once(kind, events, env)
    samples: dict[str, list[dict]] = {kind: [] for kind in kinds}
    walls: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(repeats):  # interleaved, so a busy moment on the machine hits every kind alike
        for kind in kinds:
            figures, wall_ms, _ = _run_once(kind, events, env)
            samples[kind].append(figures)
            walls[kind].append(wall_ms)
    result: dict = {"baseline_import_boto3": _summary(samples["baseline"], walls["baseline"])}
    base_p50 = result["baseline_import_boto3"]["total_ms"]["p50"]
    for kind in kinds[1:]:
        result[kind] = _summary(samples[kind], walls[kind])
        result[kind]["ratio_total_p50_to_baseline"] = round(result[kind]["total_ms"]["p50"] / base_p50, 2)
    api_p50 = result["api"]["total_ms"]["p50"]
    result["goal_api_ms"] = GOAL_API_MS
    result["goal_api_met"] = api_p50 < GOAL_API_MS
    result["goal_measure"] = "p50 of import + first GET /healthz + first GET /jobs/{id}, inside the process"

    _, _, stderr = _run_once("api", events, env, "-X", "importtime")
    result["api_heaviest_imports"] = heaviest_imports(stderr)
    result["load_avg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]  # a shared machine
    return result
