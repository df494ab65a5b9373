"""The cold start of each deployed function, on the artefacts a deployment ships: the layer as
infra/build_layer.py builds it (once with its bytecode, as it ships, and once source only), and
the functions' own zips (Chalice's deployment.zip for the API and the scheduled consumer,
`app.app` and `app.consumer`; stream.zip for the streaming function).

Each run is a fresh interpreter of the Lambda runtime's Python (3.13, when this machine has one)
on a fresh tree of the unpacked layer and function code, laid out as Lambda lays them out (the code
first on sys.path, then the layer's python/), writing no bytecode (`-B`: Lambda's /opt and
/var/task are read-only) and seeing no site-packages of this machine (`-S -E`). It imports the
entry module and serves the first invocation. Baseline in the same run: `import boto3` from the
same layer copy, measured the same way. One extra run under `-X importtime` shows which packages
the API function's cold path spends its time importing."""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zipfile
from collections import defaultdict
from pathlib import Path
from types import ModuleType

from rtqcc.api import create_app
from rtqcc.run.consumer import Consumer, TimeBudget
from rtqcc.settings import Settings
from rtqcc.store.jobs import NewJob, OutlineItem
from rtqcc_emulator.gateway import STREAM_RESOURCE, Gateway, GatewayRequest

from .stack import BENCH_KEY, fresh_services, percentile, service_env

ROOT = Path(__file__).resolve().parent.parent
INFRA = ROOT / "infra"
# kind -> (the function's zip, the module Lambda imports, what it calls); as infra/package.py
# and the template deploy them (the consumer is Chalice's `app.consumer`, a schedule in app.py).
FUNCTIONS = {"api": ("api", "app"), "consumer": ("api", "app"), "stream": ("stream", "stream_function")}
KINDS = ("baseline", "api", "consumer", "stream")
VARIANTS = ("bytecode", "source")  # the layer as it ships; and without its bytecode
GOAL_API_MS = 250
CONSUMER_BUDGET_MS = 20  # the consumer's first invocation waits at most this long on the empty queue
MARKER = "COLD-START-RESULT "

# Runs in the fresh interpreter. The clock starts after the brief is parsed, right before the entry
# module is imported, so all that is timed is what a Lambda container pays after its runtime is up.
_SCRIPT = r'''
import json, sys, time
brief = json.loads(sys.argv[1])
sys.path[:0] = [brief["task"], brief["layer"]]  # /var/task, then /opt/python
started = time.perf_counter()

class Context:
    """The parts of a Lambda context the handlers use; cheaper to import than chalice.local."""
    def __init__(self, budget_ms):
        self._deadline = time.monotonic() + budget_ms / 1000
        self.aws_request_id = "cold-start"
        self.function_name = brief["kind"]
        self.memory_limit_in_mb = 1024
        self.invoked_function_arn = "arn:aws:lambda:us-east-1:000000000000:function:" + brief["kind"]
    def get_remaining_time_in_millis(self):
        return max(0, int((self._deadline - time.monotonic()) * 1000))

marks = {}
kind = brief["kind"]
if kind == "baseline":
    import boto3
    marks["import_ms"] = time.perf_counter() - started
else:
    import importlib
    module = importlib.import_module(brief["module"])
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
        summary = module.consumer(brief["schedule"], Context(brief["budget_ms"]))
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

# What EventBridge hands a scheduled function (Chalice's CloudWatchEvent reads each field).
_SCHEDULE_EVENT = {
    "version": "0", "id": "cold-start", "detail-type": "Scheduled Event", "source": "aws.events",
    "account": "000000000000", "time": "2026-01-01T00:00:00Z", "region": "us-east-1",
    "resources": ["arn:aws:events:us-east-1:000000000000:rule/consumer"], "detail": {},
}


def _load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
            "schedule": _SCHEDULE_EVENT,
        }
    finally:
        gateway.close()


class Artefacts:
    """The deployable zips, built once into `folder` by infra/build_layer.py and infra/package.py,
    each unpacked once. A run gets its own tree of hard links to the unpacked files: new folders,
    so no __pycache__ a run could write reaches the next, without copying 100+ MB each time."""

    def __init__(self, folder: Path):
        package = _load(INFRA / "package.py", "rtqcc_bench_package")  # it puts infra/ on sys.path
        build_layer = sys.modules["build_layer"]
        self.runtime_python = build_layer.find_runtime_python()
        if self.runtime_python:
            self.python_version = build_layer.LAMBDA_PYTHON_VERSION
        else:  # no interpreter of the Lambda runtime's version: the layer built for this one instead
            self.runtime_python = sys.executable
            self.python_version = "%d.%d" % sys.version_info[:2]
        self.python = subprocess.run([self.runtime_python, "-c", "import platform; print(platform.python_version())"],
                                     capture_output=True, text=True, check=True).stdout.strip()
        zips = {
            "bytecode": build_layer.build_layer(folder / "layer-bytecode", python_version=self.python_version,
                                                bytecode_python=self.runtime_python),
            "source": build_layer.build_layer(folder / "layer-source", python_version=self.python_version,
                                              bytecode=False),
            "api": package.chalice_package(folder / "chalice", stage="prod", pkg_format="cloudformation",
                                           bytecode_python=self.runtime_python) / "deployment.zip",
            "stream": package.build_stream_zip(folder / "stream", bytecode_python=self.runtime_python),
        }
        self.sizes_kib = {name: path.stat().st_size // 1024 for name, path in zips.items()}
        self.unpacked: dict[str, Path] = {}
        for name, path in zips.items():
            target = folder / "unpacked" / name
            with zipfile.ZipFile(path) as archive:
                archive.extractall(target)
            self.unpacked[name] = target
        self.scratch = folder / "run"

    def fresh_copy(self, variant: str, kind: str) -> tuple[Path, Path]:
        """(/var/task, /opt/python) for one run, with no bytecode but what the layer ships."""
        if self.scratch.exists():
            shutil.rmtree(self.scratch)
        task = self.scratch / "task"
        task.mkdir(parents=True)
        if kind != "baseline":
            shutil.copytree(self.unpacked[FUNCTIONS[kind][0]], task, dirs_exist_ok=True, copy_function=os.link)
        opt = self.scratch / "opt"
        shutil.copytree(self.unpacked[variant], opt, copy_function=os.link)
        return task, opt / "python"


def _run_once(artefacts: Artefacts, variant: str, kind: str, events: dict[str, dict], env: dict[str, str],
              *flags: str) -> tuple[dict, float, str]:
    """One fresh interpreter: its own figures, the wall time of the whole process, and its stderr."""
    task, layer = artefacts.fresh_copy(variant, kind)
    brief = {"kind": kind, "task": str(task), "layer": str(layer), "budget_ms": CONSUMER_BUDGET_MS, **events}
    if kind != "baseline":
        brief["module"] = FUNCTIONS[kind][1]
    command = [artefacts.runtime_python, "-B", "-S", "-E", *flags, "-c", _SCRIPT, json.dumps(brief)]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=task, capture_output=True, text=True, timeout=120)
    wall_s = time.perf_counter() - started
    found = [line for line in done.stdout.splitlines() if line.startswith(MARKER)]
    if done.returncode != 0 or not found:
        raise RuntimeError(f"cold start of {kind} ({variant}) failed ({done.returncode}): {done.stderr[-2000:]}")
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
    events = _events(external_id)
    # As deployed: the template makes the bucket, so no function checks for it as it starts (with
    # a local S3 endpoint the settings would, by default).
    env = service_env(settings, S3_CREATE_BUCKET="false")
    with tempfile.TemporaryDirectory(prefix="rtqcc-bench-cold-") as tmp:
        artefacts = Artefacts(Path(tmp))
        runs = [(variant, kind) for variant in VARIANTS for kind in KINDS]
        for variant, kind in runs:  # once each untimed: the services and the page cache are warm
            _run_once(artefacts, variant, kind, events, env)
        samples: dict[tuple[str, str], list[dict]] = {run: [] for run in runs}
        walls: dict[tuple[str, str], list[float]] = {run: [] for run in runs}
        for _ in range(repeats):  # interleaved, so a busy moment on the machine hits every one alike
            for variant, kind in runs:
                figures, wall_ms, _ = _run_once(artefacts, variant, kind, events, env)
                samples[variant, kind].append(figures)
                walls[variant, kind].append(wall_ms)
        _, _, stderr = _run_once(artefacts, "bytecode", "api", events, env, "-X", "importtime")

    result: dict = {
        "interpreter": f"Python {artefacts.python} ({platform.machine()})"
                       + ("" if artefacts.python_version == _lambda_python_version() else
                          f": no Python {_lambda_python_version()} here, the layer built for this one"),
        "artefact_kib": artefacts.sizes_kib,
        "repeats": repeats,
    }
    for variant in VARIANTS:
        figures: dict = {kind: _summary(samples[variant, kind], walls[variant, kind]) for kind in KINDS}
        base_p50 = figures["baseline"]["total_ms"]["p50"]
        for kind in KINDS[1:]:
            figures[kind]["ratio_total_p50_to_baseline"] = round(figures[kind]["total_ms"]["p50"] / base_p50, 2)
        result[variant] = figures
    result["ratio_bytecode_to_source_total_p50"] = {
        kind: round(result["bytecode"][kind]["total_ms"]["p50"] / result["source"][kind]["total_ms"]["p50"], 2)
        for kind in KINDS}
    api_p50 = result["bytecode"]["api"]["total_ms"]["p50"]
    result["goal_api_ms"] = GOAL_API_MS
    result["goal_api_met"] = api_p50 < GOAL_API_MS
    result["goal_measure"] = ("p50 of import + first GET /healthz + first GET /jobs/{id}, inside the process,"
                              " on the layer with its bytecode (as it ships)")
    result["api_heaviest_imports"] = heaviest_imports(stderr)
    return result


def _lambda_python_version() -> str:
    return sys.modules["build_layer"].LAMBDA_PYTHON_VERSION
