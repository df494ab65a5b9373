"""The front door of the gateways' HTTP layer (`rtqcc up` and the container gateway): which Host
names are answered, the security headers every answer carries, and access log lines that never
show a stream token."""

from __future__ import annotations

import json
import logging
from typing import Iterable
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from rtqcc.redact import redact_urls

# Always answered: a browser on this machine. A DNS-rebinding page reaches us under its own name,
# which is not among these.
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# Kubernetes probes send the pod's IP as Host; these two answer for any Host and show no tenant data.
PROBE_PATHS = (b"/healthz", b"/readyz")
SECURITY_HEADERS = (
    (b"content-security-policy", b"default-src 'self'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
)


def host_name(header: str) -> str | None:
    """The name in a Host header, lower-cased, without port or IPv6 brackets; None if malformed."""
    try:
        parts = urlsplit("//" + header)
        parts.port  # noqa: B018 - raises ValueError on a malformed port
    except ValueError:
        return None
    if not parts.hostname or parts.username is not None or parts.path or parts.query or parts.fragment:
        return None
    return parts.hostname


class AllowedHosts:
    """ASGI middleware: answer only requests whose Host is loopback or one of `hosts` (exact names,
    or `*.example.com` for its subdomains); every other Host gets a 400 JSON error."""

    def __init__(self, app: ASGIApp, hosts: Iterable[str] = ()):
        self.app = app
        names = {name.strip("[]").lower() for name in (*LOOPBACK_HOSTS, *hosts)}
        self.exact = frozenset(n for n in names if not n.startswith("*."))
        self.suffixes = tuple(n[1:] for n in names if n.startswith("*."))

    def allows(self, name: str) -> bool:
        return name in self.exact or any(name.endswith(suffix) for suffix in self.suffixes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("raw_path", scope["path"].encode()) in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        header = next((value.decode("latin-1") for name, value in scope["headers"] if name == b"host"), "")
        name = host_name(header)
        if name is not None and self.allows(name):
            await self.app(scope, receive, send)
            return
        shown = (name or header)[:100]
        body = json.dumps({"error": {"code": "host_not_allowed", "message": (
            f"This server does not answer for the host {shown!r}. Use the address it printed, or add "
            "the name to RTQCC_ALLOWED_HOSTS.")}}).encode()
        await send({"type": "http.response.start", "status": 400, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})


class SecurityHeaders:
    """ASGI middleware: CSP, nosniff and no-referrer on every answer that does not set its own."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in SECURITY_HEADERS if name not in present]
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


class RedactedAccessLog(logging.Filter):
    """uvicorn's access log line carries the whole query string: take the tokens out of it, even
    where the line is not written by our redacting JSON formatter (uvicorn's own log config)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(redact_urls(arg) if isinstance(arg, str) else arg for arg in record.args)
        return True


def redact_access_log() -> None:
    """Install the filter on uvicorn's access logger (once; filters survive uvicorn's log config)."""
    logger = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactedAccessLog) for f in logger.filters):
        logger.addFilter(RedactedAccessLog())
