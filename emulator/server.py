"""The thin HTTP layer over the pure gateway: Starlette routes every request to `Gateway.handle`
(on a worker thread, since handlers block), streams answers that stream, and serves the web page."""

from __future__ import annotations

import contextlib
import threading
from importlib import resources

import anyio.to_thread
import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response, StreamingResponse
from starlette.routing import Route

from rtqcc.api.access import SSE_HEADERS
from rtqcc.api.streaming import OpenedStream

from .gateway import Gateway, GatewayRequest
from .hub import EventHub

METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
# Each open SSE stream holds a worker thread while it waits for events; allow plenty.
WORKER_THREADS = 2000


def create_http_app(gateway: Gateway, *, page_config: dict[str, str] | None = None,
                    hub: EventHub | None = None) -> Starlette:
    """With a `hub`, live SSE tails in streaming mode are served from it (no thread per client);
    without one, from the streaming function's own generator."""
    page = _page(page_config or {})

    async def index(request: Request) -> Response:
        return HTMLResponse(page)

    async def forward(request: Request) -> Response:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > gateway.config.max_request_bytes:
            return Response(content=b'{"message": "Request Too Long"}', status_code=413,
                            media_type="application/json")
        body = await request.body()
        gateway_request = GatewayRequest(
            method=request.method,
            path=request.url.path,
            query=list(request.query_params.multi_items()),
            headers=list(request.headers.items()),
            body=body,
            source_ip=request.client.host if request.client else "127.0.0.1",
        )
        if hub is not None and gateway.is_live_stream(gateway_request):
            opened = await run_in_threadpool(gateway.open_stream, gateway_request)
            if isinstance(opened, OpenedStream):
                return StreamingResponse(_follow(hub, opened), headers=SSE_HEADERS)
            return StreamingResponse(opened.chunks, status_code=opened.status, headers=opened.headers)
        answer = await run_in_threadpool(gateway.handle, gateway_request)
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "transfer-encoding")}
        if answer.stream is not None:
            return StreamingResponse(answer.stream, status_code=answer.status, headers=headers)
        return Response(content=answer.body, status_code=answer.status, headers=headers)

    @contextlib.asynccontextmanager
    async def lifespan(_app: Starlette):
        anyio.to_thread.current_default_thread_limiter().total_tokens = WORKER_THREADS
        yield
        if hub is not None:
            await hub.close()

    return Starlette(
        routes=[Route("/", index, methods=["GET"]), Route("/{path:path}", forward, methods=METHODS)],
        lifespan=lifespan,
    )


async def _follow(hub: EventHub, opened: OpenedStream):
    stream = opened.stream
    cursor, frames, finished = await run_in_threadpool(stream.opening)
    yield f"retry: {opened.retry_ms}\n\n".encode()
    for frame in frames:
        yield frame.encode()
    if finished:
        return

    async def ending(position: str) -> str | None:
        return await run_in_threadpool(stream.synthetic_done, position)

    async for chunk in hub.follow(stream.ext, cursor, heartbeat_s=opened.heartbeat_s, ending=ending):
        yield chunk


def _page(config: dict[str, str]) -> str:
    import html
    import json

    template = resources.files("rtqcc_emulator").joinpath("static/index.html").read_text(encoding="utf-8")
    return template.replace("__RTQCC_CONFIG__", html.escape(json.dumps(config), quote=True))


class ServerThread:
    """uvicorn in a background thread, for tests and for the demo; stopped with `stop()`."""

    def __init__(self, app: Starlette, *, port: int, host: str = "127.0.0.1"):
        self.server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning",
                                                   timeout_graceful_shutdown=1))
        self.thread = threading.Thread(target=self.server.run, name="gateway-http", daemon=True)
        self.base_url = f"http://{host}:{port}"

    def start(self, timeout_s: float = 10.0) -> "ServerThread":
        self.thread.start()
        deadline = threading.Event()
        waited = 0.0
        while not self.server.started and waited < timeout_s:
            deadline.wait(0.02)
            waited += 0.02
        if not self.server.started:
            raise RuntimeError(f"the gateway did not start on {self.base_url} within {timeout_s}s")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)
