"""The services a benchmark runs against: the configured ones, or local ones it starts."""

from __future__ import annotations

import os
import re
import secrets
import signal
import subprocess
import sys
import time
import shutil
import statistics
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rtqcc.store.db import Database
from rtqcc.store.migrate import ensure_database, migrate
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc_emulator.embedded import SeaweedS3

BENCH_KEY = "bench-key"


@contextmanager
def bench_settings() -> Iterator[Settings]:
    server = None
    data_dir = None
    endpoint = os.environ.get("S3_ENDPOINT_URL")
    if not endpoint:
        data_dir = Path(tempfile.mkdtemp(prefix="rtqcc-bench-s3-"))
        server = SeaweedS3(data_dir).start()
        endpoint = server.endpoint_url
        os.environ["AWS_ACCESS_KEY_ID"] = server.credentials["access_key_id"]  # the only identity it takes
        os.environ["AWS_SECRET_ACCESS_KEY"] = server.credentials["secret_access_key"]
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "rtqcc-bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rtqcc-bench")
    try:
        yield Settings.from_env({
            "REDIS_URL": os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14"),
            "DATABASE_URL": os.environ.get("BENCH_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/rtqcc_bench"),
            "S3_ENDPOINT_URL": endpoint,
            "S3_BUCKET": "rtqcc-bench",
            "S3_CREATE_BUCKET": "true",
            "RTQCC_API_KEYS": f"{BENCH_KEY}:bench",
            "RTQCC_STREAM_TOKEN_SECRET": secrets.token_urlsafe(32),
            # One tenant plays every client here: the per-tenant caps would measure themselves.
            "RTQCC_MAX_STREAMS_PER_TENANT": "100000",
            "RTQCC_MAX_STREAMS_PER_KEY": "100000",
            "RTQCC_RATE_LIMIT_PER_MIN": "0",
            "RTQCC_FAKE_TOKENS_PER_S": "0",
            "RTQCC_CONSUMER_IDLE_EXIT_MS": "200",
            "RTQCC_CONSUMER_SAFETY_MARGIN_MS": "0",
        })
    finally:
        if server:
            server.stop()
            shutil.rmtree(data_dir, ignore_errors=True)


def fresh_services(settings: Settings, **overrides) -> Services:
    ensure_database(settings.database_url)
    db = Database(settings.database_url)
    migrate(db)
    db.run("TRUNCATE jobs, consumer_checkpoints, idempotency_keys, api_keys RESTART IDENTITY CASCADE")
    services = Services(settings.with_overrides(**overrides), db=db)
    services.redis.flushdb()
    services.blobs.ensure_bucket()
    # SeaweedFS allocates its volumes on the first write (seconds): keep that out of every figure.
    services.blobs.put("bench/warm-up.md", b"warm")
    return services


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def summary_ms(values_s: list[float]) -> dict:
    ms = [v * 1000 for v in values_s]
    return {"n": len(ms), "p50_ms": round(percentile(ms, 50), 2), "p99_ms": round(percentile(ms, 99), 2),
            "mean_ms": round(statistics.fmean(ms), 2) if ms else None}


def service_env(settings: Settings, **extra: str) -> dict[str, str]:
    """The environment a function sees, pointing at the bench services (nothing from the caller's
    RTQCC_, OPENAI_ or service variables leaks in)."""
    dropped = ("RTQCC_", "OPENAI_", "REDIS_", "DATABASE_", "S3_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(dropped)}
    env.update({
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url or "",
        "S3_BUCKET": settings.s3_bucket,
        "S3_CREATE_BUCKET": "false",  # the bucket exists, as in a deployment
        "AWS_DEFAULT_REGION": settings.s3_region,
        "RTQCC_PROVIDER": "fake",
        "RTQCC_API_KEYS": ",".join(f"{key}:{tenant}" for key, tenant in settings.api_keys.items()),
        "RTQCC_STREAM_TOKEN_SECRET": settings.stream_token_secret or "",
        "RTQCC_MAX_STREAMS_PER_TENANT": str(settings.max_streams_per_tenant),
        "RTQCC_MAX_STREAMS_PER_KEY": str(settings.max_streams_per_key),
        "RTQCC_FAKE_TOKENS_PER_S": str(settings.fake_tokens_per_s),
        "RTQCC_CONSUMER_IDLE_EXIT_MS": str(settings.consumer_idle_exit_ms),
        "RTQCC_CONSUMER_SAFETY_MARGIN_MS": str(settings.consumer_safety_margin_ms),
    })
    # Unset in the settings: the caller's own credential chain (bench_settings puts keys in os.environ).
    if settings.aws_access_key_id:
        env["AWS_ACCESS_KEY_ID"] = settings.aws_access_key_id
    if settings.aws_secret_access_key:
        env["AWS_SECRET_ACCESS_KEY"] = settings.aws_secret_access_key
    env.update(extra)
    return env


def start_local_stack(settings: Settings, data_dir: Path, *, args: tuple[str, ...] = (),
                      **env: str) -> tuple[subprocess.Popen, str]:
    """`rtqcc up` over the bench's services, on a port it binds itself, with `args` and `env`
    added; the process and the base URL it printed. Stop it with `stop_local_stack`."""
    environment = {
        **os.environ,
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "S3_ENDPOINT_URL": settings.s3_endpoint_url,
        "S3_BUCKET": settings.s3_bucket,
        "RTQCC_API_KEYS": f"{BENCH_KEY}:bench",
        "RTQCC_RATE_LIMIT_PER_MIN": "0",
        **env,
    }
    return start_announcing(["up", "--port", "0", "--data-dir", str(data_dir), *args], environment,
                            data_dir / "stack.log", ready=lambda printed: "ready" in printed.splitlines(),
                            address=r"local stack at (http://\S+)")


def start_announcing(rtqcc_args: list[str], env: dict[str, str], log_path: Path, *, address: str,
                     ready=None) -> tuple[subprocess.Popen, str]:
    """`rtqcc <rtqcc_args>` in a process of its own, its output in `log_path`; the process and the
    address it printed (group 1 of `address`) once `ready(printed)` holds (by default: once the
    address is printed). Raises, with the log's path, if it exits or is not ready within 60 s."""
    with open(log_path, "w") as log:  # a file, not a pipe nobody drains: a full pipe would stall the server
        process = subprocess.Popen([sys.executable, "-m", "rtqcc.cli", *rtqcc_args], env=env, stdout=log,
                                   stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        printed = log_path.read_text()
        found = re.search(address, printed)
        if found and (ready is None or ready(printed)):
            return process, found.group(1)
        try:  # look at the log again in a moment, or at once if the process died
            process.wait(0.1)
            break
        except subprocess.TimeoutExpired:
            continue
    process.kill()
    process.wait(5)
    raise RuntimeError(f"`rtqcc {rtqcc_args[0]}` did not become ready; see {log_path}")


def stop_local_stack(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)
