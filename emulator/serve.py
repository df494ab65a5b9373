"""`rtqcc serve`: the production gateway (docker-compose, Kubernetes, a VM): the emulator's API
Gateway over uvicorn in several worker processes, serving the same handlers as Lambda does.

Unlike `rtqcc up`, it starts no embedded service and no consumer: Redis, Postgres and S3 are
configured (REDIS_URL, DATABASE_URL, S3_*), the consumers run elsewhere (`rtqcc consume --loop`)
and the schema is applied beforehand by `rtqcc migrate`.

Each worker is a process with its own event loop, its own clients and its own live-tail hub (no
thread per SSE client), listening on the same port with SO_REUSEPORT: the kernel spreads new
connections over the workers, so a burst of thousands of watchers does not land on whichever
worker woke first. The supervisor (this process) binds the port before any worker starts (so
`--port 0` names one port for all), restarts a worker that dies, and on SIGTERM or SIGINT stops
them all: each drains its hub (every open stream is told to reconnect, with a `retry:` spread
over a few seconds, and ends after its last event), stops listening, lets API calls in progress
finish within the grace period, then exits. A watcher resumes with `Last-Event-ID` on whichever
gateway answers next, so a rolling update loses no event and shows none twice.

It answers only the Host names it is meant for: loopback's and RTQCC_ALLOWED_HOSTS; `/healthz`
and `/readyz` answer any Host, since Kubernetes probes send the pod's IP. The client address the
functions see is the connection's peer, or the X-Forwarded-For entry added by a proxy listed in
RTQCC_TRUSTED_PROXIES."""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass
from multiprocessing.connection import wait
from typing import Mapping

import uvicorn
from starlette.applications import Starlette

from rtqcc import tracing
from rtqcc.errors import ConfigError
from rtqcc.logs import configure_logging
from rtqcc.services import Services
from rtqcc.settings import Settings

from .gateway import GatewayConfig, build_gateway
from .server import GatewayServer, build_http_app, freeze_startup_heap

log = logging.getLogger(__name__)

# Their defaults point at 127.0.0.1, which for a deployed gateway is the gateway's own host.
REQUIRED = ("REDIS_URL", "DATABASE_URL")
# uvicorn's own X-Forwarded-For handling stays off (it trusts 127.0.0.1 by default): the app
# believes the header from RTQCC_TRUSTED_PROXIES only. Logs are the app's JSON lines.
UVICORN_OPTIONS = {"log_config": None, "proxy_headers": False}
# A worker that dies this many times within RESTART_WINDOW_S is not started again: the gateway
# stops, and its supervisor (Kubernetes, compose, systemd) sees the failure.
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8080
    workers: int = 1
    streaming: bool = True                # False: buffered long-polls, like API Gateway REST
    integration_timeout_s: float = 29.0
    # For API calls in progress once a stop begins (streams end at once). Below Kubernetes'
    # default terminationGracePeriodSeconds (30), which also covers the preStop pause.
    grace_s: float = 20.0


class GatewayStartError(RuntimeError):
    """The gateway could not start: a worker failed before it listened, or the port is taken."""


def gateway_settings(environ: Mapping[str, str]) -> Settings:
    """The settings a deployed gateway runs on, refused when they would make it guess or leak."""
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} must be set for the gateway (it starts no services of its own)")
    settings = Settings.from_env(environ)
    settings.check_serving()  # no stream token secret, a placeholder or a dev key: refuse to start
    return settings


def build_app(environ: Mapping[str, str], *, streaming: bool = True, integration_timeout_s: float = 29.0) -> Starlette:
    settings = gateway_settings(environ)
    tracing.configure(settings.tracing)
    gateway = build_gateway(Services(settings), GatewayConfig(streaming=streaming, integration_timeout_s=integration_timeout_s))
    return build_http_app(gateway, settings)


def serve(environ: Mapping[str, str], options: ServeOptions) -> int:
    """Run the gateway until SIGTERM or SIGINT; 0 after a clean stop. Raises ConfigError for bad
    settings and GatewayStartError when it cannot listen or a worker cannot start."""
    gateway_settings(environ)  # refused here, once, before any worker is started
    reservation = _reserve(options.host, options.port)
    port = reservation.getsockname()[1]
    supervisor = _Supervisor(dict(environ), options, port)
    try:
        supervisor.start()
        host = f"[{options.host}]" if ":" in options.host else options.host
        print(f"listening on http://{host}:{port} ({options.workers} worker{'s' if options.workers > 1 else ''})",
              flush=True)
        return supervisor.watch()
    finally:
        supervisor.stop()
        reservation.close()


def _shared_port_socket(host: str, port: int, *, listen: bool) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        if listen:
            sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock


def _reserve(host: str, port: int) -> socket.socket:
    """The port, bound but not listening (so the kernel gives it no connection), held by the
    supervisor for its whole life: the workers listen on it beside it, and `port=0` names one."""
    try:
        return _shared_port_socket(host, port, listen=False)
    except OSError as exc:
        raise GatewayStartError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc


def _worker(environ: dict[str, str], options: ServeOptions, port: int, ready) -> None:
    """One worker process: its app, its socket on the shared port, uvicorn until told to stop."""
    configure_logging()
    app = build_app(environ, streaming=options.streaming, integration_timeout_s=options.integration_timeout_s)
    sock = _shared_port_socket(options.host, port, listen=True)
    config = uvicorn.Config(app, host=options.host, port=port, timeout_graceful_shutdown=options.grace_s,
                            **UVICORN_OPTIONS)

    def on_started() -> None:
        freeze_startup_heap()
        ready.send(os.getpid())

    server = GatewayServer(config, on_started=on_started)
    server.run(sockets=[sock])


class _Supervisor:
    def __init__(self, environ: dict[str, str], options: ServeOptions, port: int):
        self.environ, self.options, self.port = environ, options, port
        self.context = multiprocessing.get_context("spawn")  # nothing of this process's state is shared
        self.workers: list[multiprocessing.Process] = []
        self.deaths: list[float] = []
        self.stopping = False

    def start(self) -> None:
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        for _ in range(self.options.workers):
            self.workers.append(self._start_worker())

    def _start_worker(self) -> multiprocessing.Process:
        receiving, sending = self.context.Pipe(duplex=False)
        worker = self.context.Process(target=_worker, args=(self.environ, self.options, self.port, sending),
                                      name="rtqcc-gateway-worker", daemon=False)
        worker.start()
        sending.close()
        # Ready once it serves; a worker that exits first (bad settings, a Redis URL it cannot
        # parse) ends the start with its exit code, not a hang.
        while not self.stopping:
            if receiving.poll(0.1):
                receiving.recv()
                receiving.close()
                return worker
            if not worker.is_alive():
                raise GatewayStartError(f"a gateway worker exited with code {worker.exitcode} before it listened;"
                                        " its log above says why")
        return worker

    def _on_signal(self, signum, _frame) -> None:
        self.stopping = True

    def watch(self) -> int:
        while not self.stopping:
            wait([worker.sentinel for worker in self.workers], timeout=0.5)
            for n, worker in enumerate(self.workers):
                if worker.is_alive() or self.stopping:
                    continue
                now = time.monotonic()
                self.deaths = [t for t in self.deaths if now - t < RESTART_WINDOW_S] + [now]
                if len(self.deaths) > MAX_RESTARTS:
                    log.error("gateway workers died %d times in %.0f s; stopping", len(self.deaths), RESTART_WINDOW_S)
                    return 1
                log.warning("gateway worker %s exited with code %s; starting another", worker.pid, worker.exitcode)
                self.workers[n] = self._start_worker()
        return 0

    def stop(self) -> None:
        """SIGTERM every worker (each drains, then finishes its API calls), SIGKILL past the grace."""
        self.stopping = True
        for worker in self.workers:
            if worker.is_alive():
                os.kill(worker.pid, signal.SIGTERM)
        deadline = time.monotonic() + self.options.grace_s + 5.0
        for worker in self.workers:
            worker.join(max(0.0, deadline - time.monotonic()))
            if worker.is_alive():
                log.error("gateway worker %s did not stop within the grace period; killing it", worker.pid)
                worker.kill()
                worker.join(5)

