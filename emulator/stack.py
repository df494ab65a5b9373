"""The whole local stack in one object: services (embedded where none is configured), the
database schema, the gateway over HTTP, the scheduled consumers and sweeper, and the supervisor
that restarts an embedded service that dies."""

from __future__ import annotations

import os
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from rtqcc import tracing
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.store.db import Database
from rtqcc.store.migrate import ensure_database, migrate

from .embedded import PRIVATE_UMASK, LocalServices
from .gateway import Gateway, GatewayConfig, build_gateway
from .local_secrets import private_folder
from .scheduler import ConsumerScheduler
from .server import ServerThread, build_http_app, freeze_startup_heap
from .supervisor import RestartPolicy, ServiceSupervisor
from .sweeps import SweepSchedule


# Jobs each of the local stack's consumers runs at once, unless set. A run waits on its stream and
# holds about 100 KB, so slots are cheap; what is not is a second wave: with 1,000 jobs started
# together, 2 x 256 slots ran them in two rounds of a job's length (x2.4-2.6 of one alone), 2 x 512
# in one (x1.4-2.1 on the same machine: bench/README.md).
LOCAL_MAX_IN_FLIGHT = 512


@dataclass(frozen=True)
class StackOptions:
    port: int = 8080
    data_dir: Path = Path(".rtqcc")
    streaming: bool = True
    integration_timeout_s: float = 29.0
    max_request_bytes: int = 10 * 1024 * 1024
    consumers: int = 2
    consumer_budget_s: float = 60.0
    max_in_flight: int | None = None  # jobs per consumer at once; None: RTQCC_MAX_IN_FLIGHT or its default
    max_running_per_tenant: int | None = None  # None: RTQCC_MAX_RUNNING_PER_TENANT, else no cap (0)


class LocalStack:
    """`report(line)` hears when a part goes down and comes back; `on_fatal(message)`, once, that the
    stack cannot go on (a service that will not come back): the caller then stops it."""

    def __init__(self, options: StackOptions, environ: Mapping[str, str], *,
                 report: Callable[[str], None] = lambda line: None,
                 on_fatal: Callable[[str], None] = lambda message: None):
        self.options = options
        self.environ = dict(environ)
        self.report = report
        self.on_fatal = on_fatal
        self.supervisor: ServiceSupervisor | None = None
        self.sweeps: SweepSchedule | None = None
        self.services_runner = LocalServices(options.data_dir, self.environ)
        self.env: dict[str, str] = {}
        self.services: Services | None = None
        self.gateway: Gateway | None = None
        self.server: ServerThread | None = None
        self.scheduler: ConsumerScheduler | None = None
        self._umask_before: int | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    @property
    def api_key(self) -> str:
        return self.env["RTQCC_DEV_API_KEY"]

    def start(self) -> "LocalStack":
        # What the stack writes while it runs (logs, keys, the consumers' files) is the user's alone, and
        # so is the data folder, for what an older version left open in it.
        self._umask_before = os.umask(PRIVATE_UMASK)
        try:
            private_folder(Path(self.options.data_dir))
            self._start()
            freeze_startup_heap()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.services_runner.start()
        env = {**self.environ, **self.services_runner.env()}
        env.setdefault("RTQCC_ENV", "local")
        env.setdefault("RTQCC_DEV_API_KEY", self._kept_secret("dev-api-key", prefix="dev-"))
        # Random, kept under the data folder (mode 0600) so open pages' tokens survive a restart.
        env.setdefault("RTQCC_STREAM_TOKEN_SECRET", self._kept_secret("stream-token-secret"))
        env.setdefault("RTQCC_METRICS_TOKEN", self._kept_secret("metrics-token"))
        # Scheduled invocations wait for work until their budget ends instead of exiting when idle.
        env.setdefault("RTQCC_CONSUMER_IDLE_EXIT_MS", "0")
        if self.options.max_in_flight is not None:
            env["RTQCC_MAX_IN_FLIGHT"] = str(self.options.max_in_flight)
        if self.options.max_running_per_tenant is not None:
            env["RTQCC_MAX_RUNNING_PER_TENANT"] = str(self.options.max_running_per_tenant)
        env.setdefault("RTQCC_MAX_RUNNING_PER_TENANT", "0")  # one user on a laptop: no cap unless asked
        # A user's batch of a few hundred jobs runs at once: a job in flight is a waiting thread
        # (about 200 KB), and Postgres connections stay at the pool's size.
        env.setdefault("RTQCC_MAX_IN_FLIGHT", str(LOCAL_MAX_IN_FLIGHT))
        # Webhooks to a receiver on this machine (a laptop's own tools); other private networks stay refused.
        env.setdefault("RTQCC_WEBHOOK_ALLOW_PRIVATE", "127.0.0.0/8,::1/128")
        self.env = env
        settings = Settings.from_env(env)
        settings.check_serving()
        tracing.configure(settings.tracing)  # the gateway's requests; the consumers configure their own
        ensure_database(settings.database_url)
        db = Database(settings.database_url, max_size=settings.db_pool_size)
        migrate(db)
        services = Services(settings, db=db)
        services.blobs.ensure_bucket()
        self.services = services
        self.gateway = build_gateway(services, GatewayConfig(
            streaming=self.options.streaming, integration_timeout_s=self.options.integration_timeout_s,
            max_request_bytes=self.options.max_request_bytes))
        http_app = build_http_app(self.gateway, settings)
        self.server = ServerThread(http_app, port=self.options.port).start()  # 0: a free one, bound at once
        if self.options.consumers:
            self.scheduler = ConsumerScheduler(
                concurrency=self.options.consumers, budget_s=self.options.consumer_budget_s, env=env,
                log_dir=Path(self.options.data_dir).resolve() / "logs").start()
        self.sweeps = SweepSchedule(services, interval_s=settings.sweep_interval_s, report=self.report).start()
        # After a restart, sweep at once (Redis comes back empty: its queue is rebuilt from Postgres)
        # and again once the leases of the runs the failure cut short have expired.
        self.supervisor = ServiceSupervisor(
            self.services_runner,
            RestartPolicy(max_restarts=settings.service_max_restarts, window_s=settings.service_restart_window_s),
            report=self.report, on_fatal=self.on_fatal,
            on_back=lambda name: self.sweeps.sweep_soon(again_after_s=settings.lease_ttl_s + 1.0)).start()

    @property
    def failure(self) -> str | None:
        """Why the stack had to stop, if it did: the service that would not come back, and its log."""
        return self.supervisor.failure if self.supervisor else None

    @property
    def metrics_token(self) -> str:
        return self.env["RTQCC_METRICS_TOKEN"]

    def _kept_secret(self, name: str, *, prefix: str = "") -> str:
        """A random secret kept in the data folder (only its owner may read it), made on first start."""
        path = Path(self.options.data_dir) / name
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        value = prefix + secrets.token_urlsafe(32)
        # Created with mode 0600, not chmod-ed after: no moment where another user could read it.
        with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as file:
            file.write(value + "\n")
        return value

    def stop(self) -> None:
        if self.supervisor:  # first: nothing is restarted while the stack stops
            self.supervisor.stop()
        if self.sweeps:
            self.sweeps.stop()
        if self.scheduler:
            self.scheduler.stop()
        if self.server:
            self.server.stop()
        if self.gateway:
            self.gateway.close()
        if self.services:
            self.services.close()
        try:
            self.services_runner.stop()
        finally:
            if self._umask_before is not None:
                os.umask(self._umask_before)
                self._umask_before = None
