"""The thin HTTP layer over the pure gateway: Starlette routes every request to `Gateway.handle`
(on a worker thread, since handlers block), streams answers that stream, and serves the web page.

What it guards (emulator/guards.py): only expected Host names are answered, every answer carries
CSP, nosniff and no-referrer, X-Forwarded-For is believed from configured proxies only, and the
access log shows no stream token. A body is counted as it arrives and refused at the gateway's
limit, chunked or not. Health, API calls and streams cannot starve each other: liveness answers
on the event loop, and API calls and stream work (openings, long polls, a live tail's blocking
calls) each have their own bounded threads; with a hub, a live tail holds no thread at all."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import socket
import threading
from importlib import resources
from typing import AsyncIterator, Callable, Sequence
from urllib.parse import quote

import anyio
import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

from rtqcc.api.access import SSE_HEADERS
from rtqcc.api.streaming import OpenedStream
from rtqcc.settings import Settings
from rtqcc.streaming.stream import JobEventStream, retry_hint

from .gateway import Gateway, GatewayRequest, GatewayResponse, missing_route, too_large
from .guards import AllowedHosts, SecurityHeaders, redact_access_log
from rtqcc.streaming.hub import EventHub

log = logging.getLogger(__name__)

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
LIVENESS_RESOURCE = "/healthz"
# Without a hub, each open SSE stream holds a thread while it waits for events; allow plenty.
HUBLESS_STREAM_THREADS = 2000
# Characters kept as they are when the raw path is made a valid encoded path (`%` keeps escapes).
_PATH_SAFE = "/%!$&'()*+,;=:@-._~"


def create_http_app(gateway: Gateway, *, hub: EventHub | None = None, allowed_hosts: Sequence[str] = (),
                    trusted_proxies: Sequence[str] = ()) -> Starlette:
    """With a `hub`, live SSE tails in streaming mode are served from it (no thread per client);
    without one, from the streaming function's own generator (a thread per client).
    `allowed_hosts` are answered besides loopback's names; X-Forwarded-For is believed only from
    `trusted_proxies` (addresses or networks), else the client is the connection's peer."""
    if hub is not None and gateway.stream_opener is None:
        raise ValueError("serving live tails from a hub needs the gateway's stream_opener")
    page = resources.files("rtqcc_emulator").joinpath("static/index.html").read_bytes()
    # Stream work and API calls wait for threads of their own, never for each other's.
    api_threads = anyio.CapacityLimiter(gateway.workers)
    stream_threads = anyio.CapacityLimiter(gateway.stream_workers)
    redact_access_log()

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def forward(request: Request) -> Response:
        try:
            body = await _read_body(request, gateway.config.max_request_bytes)
        except ClientDisconnect:  # gone before its body was whole: nothing to invoke, nobody to answer
            return Response(status_code=400)
        if body is None:
            # Answered before the body is read to its end: the connection cannot carry another request.
            return _response(too_large(), {"Connection": "close"})
        gateway_request = GatewayRequest(
            method=request.method,
            path=_raw_path(request.scope),
            query=list(request.query_params.multi_items()),
            headers=list(request.headers.items()),
            body=body,
            source_ip=request.client.host if request.client else "127.0.0.1",
        )
        match = gateway.match(gateway_request.path)
        if match is not None and match.resource == LIVENESS_RESOURCE:
            return _response(gateway.handle_inline(gateway_request))
        if hub is not None and gateway.is_live_stream(gateway_request):
            opened = await anyio.to_thread.run_sync(gateway.open_stream, gateway_request, limiter=stream_threads)
            if isinstance(opened, OpenedStream):
                return _LiveTail(hub, opened, stream_threads)
            return Response(content=b"".join(opened.chunks), status_code=opened.status, headers=opened.headers)
        limiter = stream_threads if gateway.is_stream_route(gateway_request) else api_threads
        return _response(await anyio.to_thread.run_sync(gateway.handle, gateway_request, limiter=limiter))

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        if hub is None:
            anyio.to_thread.current_default_thread_limiter().total_tokens = HUBLESS_STREAM_THREADS
        yield
        if hub is not None:
            await hub.close()

    middleware = [Middleware(SecurityHeaders), Middleware(AllowedHosts, hosts=tuple(allowed_hosts))]
    if trusted_proxies:
        middleware.insert(0, Middleware(ProxyHeadersMiddleware, trusted_hosts=list(trusted_proxies)))
    app = Starlette(
        routes=[
            Route("/", index, methods=["GET"]),
            Mount("/static", StaticFiles(packages=[("rtqcc_emulator", "static")])),
            Route("/{path:path}", forward, methods=METHODS),
        ],
        middleware=middleware,
        lifespan=lifespan,
        # A path the catch-all cannot match (a decoded newline in it) is answered as API Gateway would.
        exception_handlers={404: lambda _request, _exc: _response(missing_route())},
    )
    app.state.hub = hub  # GatewayServer drains it when the server stops
    return app


def build_http_app(gateway: Gateway, settings: Settings, *, live_tails: bool = True) -> Starlette:
    """The HTTP face of `gateway` as every gateway serves it: live tails from a hub sized by the
    settings (or, without, a thread per tail), their allowed hosts and trusted proxies."""
    hub = EventHub(settings.redis_url, max_connections=settings.hub_redis_connections) if live_tails else None
    return create_http_app(gateway, hub=hub, allowed_hosts=settings.allowed_hosts,
                           trusted_proxies=settings.trusted_proxies)


async def _read_body(request: Request, limit: int) -> bytes | None:
    """The body, counted as it arrives; None as soon as it is over `limit` (declared or sent)."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        return None
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            return None
    return bytes(body)


def _raw_path(scope: Scope) -> str:
    """The path as sent, percent-encoded (API Gateway matches on it, so `%2F` is no separator)."""
    raw = scope.get("raw_path")
    if raw is None:
        return quote(scope["path"], safe=_PATH_SAFE.replace("%", ""))
    return quote(raw, safe=_PATH_SAFE)


def _response(answer: GatewayResponse, extra_headers: dict[str, str] | None = None) -> Response:
    headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
    headers.update(extra_headers or {})
    if answer.stream is not None:
        return StreamingResponse(answer.stream, status_code=answer.status, headers=headers)
    return Response(content=answer.body, status_code=answer.status, headers=headers)


class _LiveTail(StreamingResponse):
    """A stream's live tail from the hub. However the answer ends (done, client gone, server
    stopping), the hub lets go of the client at once and the stream's slot is released."""

    def __init__(self, hub: EventHub, opened: OpenedStream, limiter: anyio.CapacityLimiter):
        self._stream = opened.stream
        self._limiter = limiter
        super().__init__(_follow(hub, opened, limiter), headers=SSE_HEADERS)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()
                await _release(self._stream, self._limiter)


async def _release(stream: JobEventStream, limiter: anyio.CapacityLimiter) -> None:
    try:
        await anyio.to_thread.run_sync(stream.close, limiter=limiter)
    except Exception:  # the slot expires by itself; a failed release only shortens nothing
        log.warning("could not release the stream slot of %s", stream.ext, exc_info=True)


async def _follow(hub: EventHub, opened: OpenedStream, limiter: anyio.CapacityLimiter) -> AsyncIterator[bytes]:
    stream = opened.stream
    cursor, frames, finished = await anyio.to_thread.run_sync(stream.opening, limiter=limiter)
    yield retry_hint(opened.retry_ms).encode()
    for frame in frames:
        yield frame.encode()
    if finished:
        return

    async def ending(position: str) -> str | None:
        return await anyio.to_thread.run_sync(stream.synthetic_done, position, limiter=limiter)

    # The hub yields at least once a heartbeat, so waking no later than the slot refresh keeps
    # the stream's slot alive however quiet the job is.
    refresh_s = stream.slot_refresh_s
    clock = asyncio.get_running_loop().time  # read once a chunk: the plain loop clock
    next_touch = clock() + refresh_s
    tail = hub.follow(stream.ext, cursor, heartbeat_s=min(opened.heartbeat_s, refresh_s), ending=ending)
    async with contextlib.aclosing(tail):
        async for chunk in tail:
            yield chunk
            if clock() >= next_touch:
                await anyio.to_thread.run_sync(stream.touch, limiter=limiter)
                next_touch = clock() + refresh_s


def freeze_startup_heap() -> None:
    """Leave what a gateway process holds once it serves (its modules, app and clients, about
    150,000 objects) out of the cycle collector's full collections, which walk every object
    there is: in `rtqcc up` at 200 watched jobs each one took 60-90 ms, every stream of the process
    waiting meanwhile (bench README, token latency). What is made later is collected as before."""
    gc.collect()
    gc.freeze()


class GatewayServer(uvicorn.Server):
    """uvicorn, which on stopping (SIGTERM, SIGINT, `should_exit`) first drains the app's event
    hub: its open live tails are told to reconnect and end, so the server's wait for open
    connections is short and every watcher resumes elsewhere from its last event id. Then, as
    uvicorn does, it stops listening and lets API calls in progress finish. `on_started` is called
    once it serves."""

    def __init__(self, config: uvicorn.Config, *, on_started: Callable[[], None] | None = None):
        super().__init__(config)
        self._on_started = on_started

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.started and self._on_started is not None:
            self._on_started()

    async def shutdown(self, sockets=None) -> None:
        hub = getattr(getattr(self.config.app, "state", None), "hub", None)
        if hub is not None:
            hub.drain()
        await super().shutdown(sockets)


class ServerThread:
    """uvicorn in a background thread, for tests and for the demo; stopped with `stop()`.
    `options` are uvicorn.Config's; X-Forwarded-For is never believed here unless asked for
    (create_http_app's `trusted_proxies` is the place for that).

    `port=0` takes a free port. Either way the listening socket is bound by `start()` itself and
    handed to uvicorn, so no other start can take the port between choosing it and binding it;
    `port` and `base_url` say where it listens once started."""

    def __init__(self, app, *, port: int = 0, host: str = "127.0.0.1", **options):
        options = {"log_level": "warning", "timeout_graceful_shutdown": 1, "proxy_headers": False, **options}
        self.host = host
        self.port = port
        self.server = GatewayServer(uvicorn.Config(app, host=host, port=port, **options))
        self.thread = threading.Thread(target=self._serve, name="gateway-http", daemon=True)
        self._socket: socket.socket | None = None

    @property
    def base_url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> "ServerThread":
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        try:
            self._socket = socket.create_server((self.host, self.port), family=family)
        except OSError as exc:
            raise RuntimeError(f"the gateway cannot listen on {self.base_url}: {exc.strerror or exc}") from exc
        self.port = self._socket.getsockname()[1]
        self.thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started and waited < timeout_s and self.thread.is_alive():
            deadline.wait(0.02)
            waited += 0.02
        if not self.server.started:
            self.stop()
            raise RuntimeError(f"the gateway did not start on {self.base_url} within {timeout_s}s")
        return self

    def _serve(self) -> None:
        self.server.run(sockets=[self._socket])

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread.is_alive():
            self.thread.join(10)
        if self._socket is not None:
            self._socket.close()
