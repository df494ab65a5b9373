"""Fixtures: real Redis, Postgres and S3, started or reached once per session, cleaned per test."""

from __future__ import annotations

import logging
import os
import re
import secrets
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlsplit

import pytest
from redis import Redis

from rtqcc.store.blobs import S3BlobStore
from rtqcc.run.consumer import Consumer, DrainResult, TimeBudget
from rtqcc.store.db import Database
from rtqcc.store.migrate import ensure_database, migrate
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc_emulator.embedded import EmbeddedPostgres, EmbeddedRedis, SeaweedS3

API_KEY = "test-key-tenant-a"
OTHER_KEY = "test-key-tenant-b"
# Random per run, like a deployment's: nothing in the suite may depend on a known value.
STREAM_TOKEN_SECRET = secrets.token_urlsafe(32)
METRICS_TOKEN = secrets.token_urlsafe(32)
EVENTS_DIR = Path(__file__).parent / "events"

MAX_WORKERS = 4  # each worker starts its own S3 server and OpenAI-compatible server, and holds a Redis database


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto` (pyproject's addopts): a worker a core, at most MAX_WORKERS."""
    return max(1, min(MAX_WORKERS, getattr(os, "process_cpu_count", os.cpu_count)() or 1))


def pytest_terminal_summary(terminalreporter) -> None:
    """What tests noted for the end of the run (their "summary" property: the random kills' seed
    and their oracle's tally); a worker's own output is not shown."""
    lines = [value for reports in terminalreporter.stats.values() for report in reports
             if getattr(report, "when", None) == "call"
             for name, value in getattr(report, "user_properties", ()) if name == "summary"]
    if lines:
        terminalreporter.write_sep("-", "noted by the tests")
        for line in lines:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory) -> Iterator[str]:
    configured = os.environ.get("S3_ENDPOINT_URL")
    if configured:
        yield configured
        return
    server = SeaweedS3(tmp_path_factory.mktemp("seaweedfs")).start()
    # It accepts its own identity only; boto3 (base_settings, consumer processes) reads it from here.
    os.environ["AWS_ACCESS_KEY_ID"] = server.credentials["access_key_id"]
    os.environ["AWS_SECRET_ACCESS_KEY"] = server.credentials["secret_access_key"]
    try:
        yield server.endpoint_url
    finally:
        server.stop()


def _reachable(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


# Redis databases a run may claim on a shared server (0 is left to people; 14 is the benches').
_CLAIMABLE_REDIS_DBS = range(1, 14)
_CLAIM_KEY = "rtqcc-tests:claim:db{}"


def _claim_redis_db(token: str) -> int:
    """A database of the shared Redis no other run holds: the claim is a key in db 0 (so this
    run's FLUSHDB cannot drop it) that expires if the run dies without releasing it."""
    admin = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        for db in _CLAIMABLE_REDIS_DBS:
            if admin.set(_CLAIM_KEY.format(db), token, nx=True, ex=4 * 3600):
                return db
    finally:
        admin.close()
    raise RuntimeError(f"every Redis database {_CLAIMABLE_REDIS_DBS.start}-{_CLAIMABLE_REDIS_DBS.stop - 1} "
                       "is held by another test run; set TEST_REDIS_URL")


def _release_redis_db(db: int, token: str) -> None:
    admin = Redis.from_url("redis://127.0.0.1:6379/0")
    try:
        Redis.from_url(f"redis://127.0.0.1:6379/{db}").flushdb()
        if admin.get(_CLAIM_KEY.format(db)) == token.encode():
            admin.delete(_CLAIM_KEY.format(db))
    finally:
        admin.close()


def drop_database(database_url: str) -> None:
    import pg8000.native

    from rtqcc.store.db import connect_kwargs

    name = connect_kwargs(database_url)["database"]
    admin = pg8000.native.Connection(**{**connect_kwargs(database_url), "database": "postgres"})
    try:
        admin.run(f"DROP DATABASE IF EXISTS {pg8000.native.identifier(name)} WITH (FORCE)")
    finally:
        admin.close()


@pytest.fixture(scope="session")
def service_urls(tmp_path_factory) -> Iterator[dict[str, str]]:
    """TEST_REDIS_URL / TEST_DATABASE_URL when set; else the servers on 127.0.0.1's standard
    ports, with a Redis database and a Postgres database of this run's own (two runs on one
    machine never collide); else embedded ones, so the suite runs on a laptop with nothing installed."""
    token = f"{os.getpid()}-{secrets.token_hex(4)}"
    started, cleanups = [], []
    redis_url = os.environ.get("TEST_REDIS_URL")
    if not redis_url:
        if _reachable(6379):
            db = _claim_redis_db(token)
            cleanups.append(lambda: _release_redis_db(db, token))
            redis_url = f"redis://127.0.0.1:6379/{db}"
        else:
            started.append(EmbeddedRedis(tmp_path_factory.mktemp("redis")).start())
            redis_url = started[-1].url
    database_url = os.environ.get("TEST_DATABASE_URL")
    if not database_url:
        if _reachable(5432):
            database_url = f"postgresql://postgres@127.0.0.1:5432/rtqcc_test_{token.replace('-', '_')}"
            cleanups.append(lambda: drop_database(database_url))
        else:
            started.append(EmbeddedPostgres(tmp_path_factory.mktemp("postgres")).start())
            database_url = started[-1].url
    try:
        yield {"REDIS_URL": redis_url, "DATABASE_URL": database_url}
    finally:
        for cleanup in cleanups:
            cleanup()
        for server in reversed(started):
            server.stop()


@pytest.fixture
def redis_server(tmp_path) -> Iterator[EmbeddedRedis]:
    """An embedded Redis of its own, for tests of the embedded service itself."""
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def base_settings(s3_endpoint, service_urls) -> Settings:
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "rtqcc-test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "rtqcc-test")
    return Settings.from_env({
        **service_urls,
        "S3_ENDPOINT_URL": s3_endpoint,
        "S3_BUCKET": "rtqcc-test",
        "RTQCC_API_KEYS": f"{API_KEY}:tenant-a,{OTHER_KEY}:tenant-b",
        "RTQCC_STREAM_TOKEN_SECRET": STREAM_TOKEN_SECRET,
        "RTQCC_METRICS_TOKEN": METRICS_TOKEN,
        "RTQCC_FAKE_TOKENS_PER_S": "0",
        "RTQCC_LEASE_TTL_S": "5",
        "RTQCC_CONTROL_POLL_S": "0.2",
        "RTQCC_SSE_HEARTBEAT_S": "0.5",
        "RTQCC_SSE_LONG_POLL_S": "1",
        "RTQCC_CONSUMER_IDLE_EXIT_MS": "300",
        "RTQCC_CONSUMER_SAFETY_MARGIN_MS": "0",
        "RTQCC_DELTA_FLUSH_MS": "0",
    })


@pytest.fixture(scope="session")
def database(base_settings) -> Iterator[Database]:
    ensure_database(base_settings.database_url)
    db = Database(base_settings.database_url)
    migrate(db)
    yield db
    db.close()


@pytest.fixture(scope="session")
def redis_client(base_settings) -> Iterator[Redis]:
    client = Redis.from_url(base_settings.redis_url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(scope="session")
def blob_store(base_settings) -> S3BlobStore:
    store = S3BlobStore.from_settings(base_settings)
    store.ensure_bucket()
    return store


@pytest.fixture(autouse=True)
def root_logging_restored() -> Iterator[None]:
    """A test that loads a function's entry module or runs the CLI sets the process's logging
    (a handler on the stderr of that moment, which pytest closes after it): put it back."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture
def clean_state(database, redis_client) -> None:
    database.run("TRUNCATE jobs, consumer_checkpoints, idempotency_keys, api_keys, tenant_quotas, deleted_usage RESTART IDENTITY CASCADE")
    redis_client.flushdb()


@pytest.fixture
def settings(base_settings, clean_state) -> Settings:
    return base_settings


@pytest.fixture
def make_services(settings, database, redis_client, blob_store) -> Callable[..., Services]:
    """Services over the shared real clients; `provider=` or setting overrides per call."""

    def make(*, provider=None, **overrides) -> Services:
        configured = settings.with_overrides(**overrides) if overrides else settings
        return Services(configured, redis=redis_client, db=database, blobs=blob_store,
                        provider=provider or FakeProvider(tokens_per_s=configured.fake_tokens_per_s))

    return make


@pytest.fixture
def services(make_services) -> Services:
    return make_services()


@pytest.fixture
def api(services):
    """Chalice's test client over the real app, authenticated as tenant A."""
    from chalice.test import Client

    from rtqcc.api import create_app

    app = create_app(lambda: services)
    with Client(app) as client:
        yield ApiClient(client, API_KEY)


class ApiClient:
    """Calls the API the way a user's code would, with the bearer key and JSON bodies."""

    def __init__(self, client, key: str):
        self.client = client
        self.key = key

    def headers(self, extra: dict | None = None) -> dict:
        return {"Authorization": f"Bearer {self.key}", "Content-Type": "application/json", **(extra or {})}

    def post(self, path: str, body: object = None, *, raw: str | None = None, headers: dict | None = None):
        import json

        payload = raw if raw is not None else (json.dumps(body) if body is not None else "")
        return self.client.http.post(path, body=payload, headers=self.headers(headers))

    def get(self, path: str, headers: dict | None = None):
        return self.client.http.get(path, headers=self.headers(headers))

    def delete(self, path: str, headers: dict | None = None):
        return self.client.http.delete(path, headers=self.headers(headers))

    def put(self, path: str, body: object, *, headers: dict | None = None):
        import json

        return self.client.http.put(path, body=json.dumps(body), headers=self.headers(headers))

    def as_key(self, key: str) -> "ApiClient":
        return ApiClient(self.client, key)

    def create(self, **fields) -> str:
        body = {"title": "A field guide", "brief": "Explain durable job systems.", **fields}
        response = self.post("/jobs", body)
        assert response.status_code == 201, response.body
        return response.json_body["externalId"]


@pytest.fixture
def make_api(make_services):
    """An API client (tenant A) over services with setting overrides, and those services."""
    from chalice.test import Client

    from rtqcc.api import create_app

    opened = []

    def make(**overrides):
        services = make_services(**overrides)
        client = Client(create_app(lambda: services))
        opened.append(client.__enter__())
        return ApiClient(opened[-1], API_KEY), services

    yield make
    for client in opened:
        client.__exit__(None, None, None)


@pytest.fixture
def run_consumer(make_services) -> Callable[..., DrainResult]:
    """Invoke a consumer to drain the queue, like one scheduled Lambda invocation."""

    def run(*, budget_s: float = 20.0, name: str = "consumer-1", services: Services | None = None) -> DrainResult:
        consumer = Consumer(services or make_services(), name=name)
        return consumer.drain(TimeBudget(budget_s).get_remaining_time_in_millis)

    return run


class BackgroundConsumer:
    def __init__(self, consumer: Consumer, budget_s: float):
        self.consumer = consumer
        self.result: DrainResult | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(budget_s,), daemon=True)
        self._thread.start()

    def _run(self, budget_s: float) -> None:
        try:
            self.result = self.consumer.drain(TimeBudget(budget_s).get_remaining_time_in_millis)
        except BaseException as exc:  # surfaced by join()
            self.error = exc

    def __enter__(self) -> "BackgroundConsumer":
        return self

    def __exit__(self, *exc_info) -> None:
        """Shut it down (its runs are handed back) and wait for it, surfacing its error."""
        self.consumer.shut_down()
        self.join()

    def join(self, timeout_s: float = 30.0) -> DrainResult:
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "consumer did not finish in time"
        if self.error:
            raise self.error
        assert self.result is not None
        return self.result


@pytest.fixture
def start_consumer(make_services) -> Callable[..., BackgroundConsumer]:
    started: list[BackgroundConsumer] = []

    def start(*, budget_s: float = 20.0, name: str = "consumer-1", services: Services | None = None,
              **overrides) -> BackgroundConsumer:
        background = BackgroundConsumer(Consumer(services or make_services(**overrides), name=name), budget_s)
        started.append(background)
        return background

    yield start
    for background in started:
        background._thread.join(30)


class LoopbackHTTPServer:
    """A real HTTP server on 127.0.0.1 (a free port), serving on threads of its own: each POST is
    handed to `answer(request, body)`, the request's handler and the body it read (`answer` may
    leave it unanswered). Stopped with `stop()`."""

    def __init__(self, answer: Callable[[BaseHTTPRequestHandler, bytes], None]):
        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                answer(self, self.rfile.read(int(self.headers.get("Content-Length") or 0)))

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def send_answer(request: BaseHTTPRequestHandler, status: int, body: bytes = b"", **headers: str) -> None:
    request.send_response(status)
    for name, value in headers.items():
        request.send_header(name.replace("_", "-"), value)
    request.send_header("Content-Length", str(len(body)))
    request.end_headers()
    request.wfile.write(body)


def wait_for(predicate: Callable[[], object], *, timeout_s: float = 10.0, interval_s: float = 0.01, what: str = "condition"):
    """Poll until `predicate` returns something truthy; fail (not hang) after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


def announced_address(output: Path, pattern: str, process, *, timeout_s: float = 90.0) -> str:
    """What a server started with port 0 printed about where it listens: the first match of
    `pattern`'s group 1 in its `output` file. Ports are never chosen in advance, since another
    process could take one between the choice and the bind."""
    import re

    def announced() -> str | None:
        assert process.poll() is None, f"the process exited before listening: {output.read_text()[-3000:]}"
        found = re.search(pattern, output.read_text())
        return found and found.group(1)

    return wait_for(announced, timeout_s=timeout_s, interval_s=0.05, what=f"{pattern!r} in {output.name}")


def parse_sse(body: str) -> list[dict]:
    """SSE text to a list of {"id", "event", "data"} (comments and retry hints dropped)."""
    import json

    events = []
    for block in body.split("\n\n"):
        fields: dict[str, str] = {}
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue
            name, _, value = line.partition(": ")
            fields[name] = value
        if "event" in fields:
            events.append({"id": fields.get("id"), "event": fields["event"], "data": json.loads(fields["data"])})
    return events


def section_texts(api, external_id: str) -> list[str]:
    """The stored content of every section of a job, in order."""
    job = api.get(f"/jobs/{external_id}").json_body
    return [api.get(f"/jobs/{external_id}/sections/{s['index']}").json_body["content"] for s in job["sections"]]


def job_events(redis_client, external_id: str) -> list[dict]:
    """Everything published for a job, from its event stream."""
    import json

    return [
        {"id": entry_id, "event": fields["type"], "data": json.loads(fields["data"])}
        for entry_id, fields in redis_client.xrange(f"job:{external_id}:events")
    ]


class RunningGateway:
    def __init__(self, server, gateway, key: str):
        self.server = server
        self.gateway = gateway
        self.base_url = server.base_url
        self.key = key

    def client(self):
        from rtqcc_emulator.client import RtqccClient

        return RtqccClient(self.base_url, self.key, timeout_s=10)


@pytest.fixture
def start_gateway(services):
    """The emulator's gateway over real HTTP on a free port, serving the real handlers."""
    from rtqcc_emulator.gateway import GatewayConfig, build_gateway
    from rtqcc_emulator.server import ServerThread, build_http_app

    running: list[RunningGateway] = []

    def start(*, services_override: Services | None = None, hub: bool = True, **config) -> RunningGateway:
        s = services_override or services
        gateway = build_gateway(s, GatewayConfig(**config))
        http_app = build_http_app(gateway, s.settings, live_tails=hub)
        server = ServerThread(http_app, port=0).start()  # it binds the free port itself: no race for it
        running.append(RunningGateway(server, gateway, API_KEY))
        return running[-1]

    yield start
    for item in running:
        item.server.stop()
        item.gateway.close()


def consumer_env(settings: Settings, s3_endpoint: str, **extra: str) -> dict[str, str]:
    """The environment of a consumer process pointed at the test services."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTQCC_", "REDIS_", "DATABASE_", "S3_"))}
    env.update({
        "REDIS_URL": settings.redis_url,
        "DATABASE_URL": settings.database_url,
        "S3_ENDPOINT_URL": s3_endpoint,
        "S3_BUCKET": settings.s3_bucket,
        "RTQCC_FAKE_TOKENS_PER_S": str(settings.fake_tokens_per_s),
        "RTQCC_LEASE_TTL_S": str(settings.lease_ttl_s),
        "RTQCC_CONTROL_POLL_S": str(settings.control_poll_s),
        "RTQCC_DELTA_FLUSH_MS": str(settings.delta_flush_ms),
        "RTQCC_CONSUMER_IDLE_EXIT_MS": "0",
        "RTQCC_CONSUMER_SAFETY_MARGIN_MS": "0",
        **extra,
    })
    return env


@dataclass
class ServedGateway:
    """`rtqcc serve` in a process of its own (its supervisor; the workers are its children)."""

    process: subprocess.Popen
    base_url: str
    log_path: Path

    @property
    def port(self) -> int:
        return urlsplit(self.base_url).port

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text().split()
        workers = []
        for pid in children:
            try:  # multiprocessing's resource tracker is a child too
                if b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes():
                    workers.append(int(pid))
            except FileNotFoundError:  # exited while we looked
                pass
        return workers

    def threads(self) -> int:
        """Threads of its workers, together."""
        total = 0
        for pid in self.worker_pids():
            status = Path(f"/proc/{pid}/status").read_text()
            total += int(re.search(r"^Threads:\s+(\d+)", status, re.M)[1])
        return total

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


@pytest.fixture
def served_gateway(settings, s3_endpoint, tmp_path):
    """`rtqcc serve` on 127.0.0.1, as its container runs it, over the test services: a free port
    unless `port` is given (a second gateway can share one: SO_REUSEPORT), one worker unless
    `workers`; `**env` adds settings."""
    import httpx

    started: list[ServedGateway] = []
    rtqcc = Path(sys.executable).with_name("rtqcc")

    def start(*, workers: int = 1, port: int = 0, **env: str) -> ServedGateway:
        environment = consumer_env(settings, s3_endpoint, RTQCC_API_KEYS=f"{API_KEY}:tenant-a,{OTHER_KEY}:tenant-b",
                                   RTQCC_STREAM_TOKEN_SECRET=STREAM_TOKEN_SECRET, RTQCC_SSE_HEARTBEAT_S="0.5", **env)
        log_path = Path(tmp_path) / f"gateway-{len(started)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen([str(rtqcc), "serve", "--host", "127.0.0.1", "--port", str(port),
                                        "--workers", str(workers)],
                                       env=environment, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            base_url = announced_address(log_path, r"listening on (http://\S+)", process, timeout_s=60)
        except BaseException:
            process.kill()
            process.wait(5)
            raise
        gateway = ServedGateway(process, base_url, log_path)
        started.append(gateway)

        def answers() -> bool:
            assert process.poll() is None, f"the gateway exited: {gateway.log()[-3000:]}"
            try:
                return httpx.get(gateway.base_url + "/healthz", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(answers, timeout_s=60, interval_s=0.1, what="the gateway to answer /healthz")
        return gateway

    yield start
    for gateway in started:
        gateway.stop()
