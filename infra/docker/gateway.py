"""The gateway for containers (docker-compose, Kubernetes): the emulator's API Gateway over uvicorn,
listening on all interfaces, serving the same handlers as Lambda does.

Unlike `rtqcc up`, it starts no embedded service and no consumer scheduler: Redis, Postgres and S3
are configured (REDIS_URL, DATABASE_URL, S3_*) and the consumers are containers of their own
(`rtqcc consume --loop`). The schema is applied beforehand by `rtqcc migrate`.

As `rtqcc up` does, it serves live SSE tails from one async event hub (no thread per client), and
answers only the Host names it is meant for: loopback's, and those in RTQCC_ALLOWED_HOSTS (the
names clients use: the Service's DNS name, the ingress host); `/healthz` and `/readyz` answer any
Host, since Kubernetes probes send the pod's IP. The client address the functions see is the
connection's peer, or the X-Forwarded-For entry added by a proxy listed in RTQCC_TRUSTED_PROXIES.

    python infra/docker/gateway.py --port 8080 [--sse streaming|buffered]

It binds its socket before serving and prints `listening on http://HOST:PORT` (the port bound:
`--port 0` takes a free one, so a test never races another process for a port chosen in advance).
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from typing import Mapping

from starlette.applications import Starlette

from rtqcc import tracing
from rtqcc.errors import ConfigError
from rtqcc.logs import configure_logging
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc_emulator.gateway import GatewayConfig, build_gateway
from rtqcc_emulator.server import build_http_app

# Their defaults point at 127.0.0.1, which in a container is the container itself.
REQUIRED = ("REDIS_URL", "DATABASE_URL")
# uvicorn's own X-Forwarded-For handling stays off (it trusts 127.0.0.1 by default): the app
# believes the header from RTQCC_TRUSTED_PROXIES only. Logs are the app's JSON lines.
UVICORN_OPTIONS = {"log_config": None, "proxy_headers": False, "timeout_graceful_shutdown": 10}


def build_app(environ: Mapping[str, str], *, streaming: bool = True, integration_timeout_s: float = 29.0) -> Starlette:
    missing = [name for name in REQUIRED if not environ.get(name)]
    if missing:
        raise ConfigError(f"{' and '.join(missing)} must be set for the gateway container")
    settings = Settings.from_env(environ)
    tracing.configure(settings.tracing)
    settings.check_serving()  # no stream token secret, a placeholder or a dev key: refuse to start
    services = Services(settings)
    gateway = build_gateway(services, GatewayConfig(streaming=streaming, integration_timeout_s=integration_timeout_s))
    return build_http_app(gateway, settings)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    parser = argparse.ArgumentParser(prog="rtqcc-gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=8080)
    parser.add_argument("--sse", choices=["streaming", "buffered"], default="streaming",
                        help="streaming: frames flow as produced; buffered: like API Gateway REST (long-poll)")
    parser.add_argument("--integration-timeout-s", type=float, default=29.0)
    args = parser.parse_args(argv)
    configure_logging()
    try:
        app = build_app(os.environ, streaming=args.sse == "streaming", integration_timeout_s=args.integration_timeout_s)
    except ConfigError as exc:
        print(f"rtqcc-gateway: configuration error: {exc}", file=sys.stderr)
        return 2
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        listening = socket.create_server((args.host, args.port), family=family)
    except OSError as exc:
        print(f"rtqcc-gateway: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    host, port = listening.getsockname()[:2]
    print(f"listening on http://{f'[{host}]' if ':' in host else host}:{port}", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=args.host, port=port, **UVICORN_OPTIONS))
    server.run(sockets=[listening])
    return 0


if __name__ == "__main__":
    sys.exit(main())
