"""The routes an operator and a platform use: metrics, the OpenAPI document, liveness and
readiness. Each is `view(call)`; api/edge.py mounts them behind the one error mapping."""

from __future__ import annotations

import logging
import time

from chalice import Response

from .access import check_metrics_token, client_address
from .edge import ApiCall, route

log = logging.getLogger(__name__)


@route("/metrics", "GET")
def metrics(call: ApiCall) -> Response:
    from prometheus_client import CONTENT_TYPE_LATEST

    from ..metrics import render

    check_metrics_token(call.svc, call.request.headers.get("authorization"), client_address(call.request.context))
    return Response(body=render(call.svc).decode(), status_code=200, headers={"Content-Type": CONTENT_TYPE_LATEST})


@route("/openapi.json", "GET")
def openapi(call: ApiCall) -> dict:
    from .openapi import openapi_document

    return openapi_document()


@route("/healthz", "GET")
def healthz(call: ApiCall) -> dict:
    return {"status": "ok"}


@route("/readyz", "GET")
def readyz(call: ApiCall) -> Response:
    s = call.svc
    checks = {}
    for name, probe in (("redis", s.redis.ping), ("postgres", s.db.ping), ("s3", s.blobs.ping)):
        started = time.perf_counter()
        try:
            probe()
            checks[name] = {"ok": True, "ms": round((time.perf_counter() - started) * 1000, 1)}
        except Exception as exc:
            # Unauthenticated: say what is down, never how it is reached (the log has that).
            log.warning("readiness check of %s failed: %s: %s", name, type(exc).__name__, exc)
            checks[name] = {"ok": False}
    ready = all(check["ok"] for check in checks.values())
    return Response(body={"status": "ready" if ready else "unavailable", "checks": checks},
                    status_code=200 if ready else 503, headers={} if ready else {"Retry-After": "5"})
