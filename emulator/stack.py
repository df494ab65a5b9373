"""The whole local stack in one object: services (embedded where none is configured), the
database schema, the gateway over HTTP, and the scheduled consumers."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from rtqcc.api import create_app
from rtqcc.api.streaming import create_stream_handler, create_stream_opener
from rtqcc.db import Database
from rtqcc.migrate import ensure_database, migrate
from rtqcc.services import Services
from rtqcc.settings import Settings

from .embedded import LocalServices, free_port
from .gateway import Gateway, GatewayConfig
from .hub import EventHub
from .scheduler import ConsumerScheduler
from .server import ServerThread, create_http_app


@dataclass(frozen=True)
class StackOptions:
    port: int = 8080
    data_dir: Path = Path(".rtqcc")
    streaming: bool = True
    integration_timeout_s: float = 29.0
    max_request_bytes: int = 10 * 1024 * 1024
    consumers: int = 2
    consumer_budget_s: float = 60.0


class LocalStack:
    def __init__(self, options: StackOptions, environ: Mapping[str, str]):
        self.options = options
        self.environ = dict(environ)
        self.services_runner = LocalServices(options.data_dir, self.environ)
        self.env: dict[str, str] = {}
        self.services: Services | None = None
        self.gateway: Gateway | None = None
        self.hub: EventHub | None = None
        self.server: ServerThread | None = None
        self.scheduler: ConsumerScheduler | None = None

    @property
    def base_url(self) -> str:
        assert self.server is not None
        return self.server.base_url

    @property
    def api_key(self) -> str:
        return self.env["RTQCC_DEV_API_KEY"]

    def start(self) -> "LocalStack":
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        return self

    def _start(self) -> None:
        self.services_runner.start()
        env = {**self.environ, **self.services_runner.env()}
        env.setdefault("RTQCC_DEV_API_KEY", self._dev_key())
        # Scheduled invocations wait for work until their budget ends instead of exiting when idle.
        env.setdefault("RTQCC_CONSUMER_IDLE_EXIT_MS", "0")
        self.env = env
        settings = Settings.from_env(env)
        ensure_database(settings.database_url)
        db = Database(settings.database_url, max_size=settings.db_pool_size)
        migrate(db)
        services = Services(settings, db=db)
        services.blobs.ensure_bucket()
        self.services = services
        self.gateway = Gateway(
            create_app(lambda: services),
            stream_handler=create_stream_handler(lambda: services),
            stream_opener=create_stream_opener(lambda: services),
            config=GatewayConfig(streaming=self.options.streaming,
                                 integration_timeout_s=self.options.integration_timeout_s,
                                 max_request_bytes=self.options.max_request_bytes),
        )
        self.hub = EventHub(settings.redis_url)
        http_app = create_http_app(self.gateway, page_config={"apiKey": self.api_key}, hub=self.hub)
        self.server = ServerThread(http_app, port=self.options.port or free_port()).start()
        if self.options.consumers:
            self.scheduler = ConsumerScheduler(
                concurrency=self.options.consumers, budget_s=self.options.consumer_budget_s, env=env,
                log_dir=Path(self.options.data_dir).resolve() / "logs").start()

    def _dev_key(self) -> str:
        """A development key kept in the data folder, so it survives restarts of the stack."""
        path = Path(self.options.data_dir) / "dev-api-key"
        if path.exists():
            return path.read_text().strip()
        path.parent.mkdir(parents=True, exist_ok=True)
        key = "dev-" + secrets.token_urlsafe(18)
        path.write_text(key + "\n")
        path.chmod(0o600)
        return key

    def stop(self) -> None:
        if self.scheduler:
            self.scheduler.stop()
        if self.server:
            self.server.stop()
        if self.gateway:
            self.gateway.close()
        if self.services:
            self.services.close()
        self.services_runner.stop()
