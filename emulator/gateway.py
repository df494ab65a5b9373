"""A pure API Gateway emulator: a request in, an answer out, no sockets.

It builds the REST (v1) proxy event Chalice expects, invokes the function with a Lambda context
whose budget is the integration timeout, and turns the function's answer back into HTTP, with
API Gateway's own error shapes where API Gateway itself would answer (unknown route, timeout,
oversize payload). The stream route goes to the streaming SSE function when streaming is on,
and through the buffering long-poll handler when it is off, as behind API Gateway REST.

Paths are matched as API Gateway REST matches them: on the path as sent (percent-encoded), one
segment at a time, so an encoded slash (`%2F`) stays inside its segment; path parameters get the
decoded value, and the event's `path` keeps the encoding."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator
from urllib.parse import quote, unquote

from chalice import Chalice
from chalice.local import LambdaContext

STREAM_RESOURCE = "/jobs/{external_id}/stream"
MISSING_ROUTE = {"message": "Missing Authentication Token"}
TIMEOUT_BODY = {"message": "Endpoint request timed out"}
TOO_LARGE_BODY = {"message": "Request Too Long"}
FUNCTION_ERROR_BODY = {"message": "Internal server error"}
TEXT_TYPES = ("text/", "application/json", "application/javascript", "application/xml")


@dataclass(frozen=True)
class GatewayConfig:
    stage: str = "api"
    integration_timeout_s: float = 29.0      # API Gateway REST's default (and maximum without a quota raise)
    max_request_bytes: int = 10 * 1024 * 1024  # API Gateway's payload limit
    max_response_bytes: int = 6 * 1024 * 1024  # Lambda's synchronous response limit
    streaming: bool = True                    # False: behave like API Gateway REST, which buffers
    function_timeout_s: float = 900.0         # the streaming function's own limit


@dataclass
class GatewayRequest:
    method: str
    path: str  # as sent: percent-encoded, without the query
    query: list[tuple[str, str]] = field(default_factory=list)
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    source_ip: str = "127.0.0.1"


@dataclass
class GatewayResponse:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    stream: Iterator[bytes] | None = None  # set when the answer streams

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class RouteMatch:
    resource: str                # the route's template, e.g. /jobs/{external_id}
    params: dict[str, str]       # its path parameters, decoded


class Gateway:
    def __init__(self, app: Chalice, *, stream_handler: Callable[[dict, Any], Any] | None = None,
                 stream_opener: Callable[[dict], Any] | None = None,
                 config: GatewayConfig = GatewayConfig(), workers: int = 64, stream_workers: int = 64):
        self.app = app
        self.stream_handler = stream_handler
        self.stream_opener = stream_opener
        self.config = config
        # Literal segments before captures, so /jobs/{id}/stream wins over a capture in its place.
        self._routes = sorted((route.split("/"), route) for route in app.routes)
        self.workers = workers
        self.stream_workers = stream_workers
        # Functions run on these pools so the gateway can answer 504 without waiting for them; the
        # stream route has a pool of its own, so long polls and stream openings cannot take every
        # worker the API needs.
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="invoke")
        self._stream_pool = concurrent.futures.ThreadPoolExecutor(max_workers=stream_workers,
                                                                  thread_name_prefix="invoke-stream")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._stream_pool.shutdown(wait=False, cancel_futures=True)

    def match(self, path: str) -> RouteMatch | None:
        """The route a percent-encoded path names, as API Gateway REST matches it: each segment
        decoded on its own (an encoded slash stays part of its segment); None when none does."""
        path = path.rstrip("/") or "/"  # API Gateway drops a trailing slash
        segments = path.split("/")
        for parts, route in self._routes:
            if len(parts) != len(segments):
                continue
            params: dict[str, str] = {}
            for part, segment in zip(parts, segments):
                if part.startswith("{") and part.endswith("}"):
                    if not segment:
                        break
                    params[part[1:-1]] = unquote(segment)
                elif unquote(segment) != part:
                    break
            else:
                return RouteMatch(route, params)
        return None

    def is_stream_route(self, request: GatewayRequest) -> bool:
        """GET of the stream route, in either mode: the HTTP layer gives these their own capacity."""
        match = self.match(request.path)
        return request.method == "GET" and match is not None and match.resource == STREAM_RESOURCE

    def handle(self, request: GatewayRequest) -> GatewayResponse:
        if len(request.body) > self.config.max_request_bytes:
            return too_large()
        match = self.match(request.path)
        if match is None or request.method not in self.app.routes[match.resource]:
            return missing_route()
        event = self.build_event(request, match.resource, match.params)
        if match.resource == STREAM_RESOURCE and request.method == "GET":
            if self.config.streaming and self.stream_handler:
                return self._invoke_streaming(event)
            return self._invoke(event, self._stream_pool)
        return self._invoke(event, self._pool)

    def handle_inline(self, request: GatewayRequest) -> GatewayResponse:
        """Invoke the function on the calling thread, without a worker or a timeout: only for
        routes that never wait on anything (liveness), so they answer however busy the pools are."""
        match = self.match(request.path)
        if match is None or request.method not in self.app.routes[match.resource]:
            return missing_route()
        return self._invoke(self.build_event(request, match.resource, match.params), None)

    def is_live_stream(self, request: GatewayRequest) -> bool:
        """A stream request that the HTTP layer may serve from its event hub (streaming mode)."""
        return self.config.streaming and self.stream_opener is not None and self.is_stream_route(request)

    def open_stream(self, request: GatewayRequest) -> Any:
        """Authorize and position a stream request through the streaming function's own opening
        code; the answer is an OpenedStream to follow, or a StreamingAnswer (error, 204)."""
        match = self.match(request.path)
        assert match is not None and match.resource == STREAM_RESOURCE, "open_stream of a non-stream route"
        return self.stream_opener(self.build_event(request, match.resource, match.params))

    def build_event(self, request: GatewayRequest, resource: str, path_params: dict[str, str]) -> dict:
        """The API Gateway REST (v1) proxy event for this request."""
        headers: dict[str, str] = {}
        multi_headers: dict[str, list[str]] = {}
        for name, value in request.headers:
            canonical = "-".join(part.capitalize() for part in name.split("-"))
            headers[canonical] = value
            multi_headers.setdefault(canonical, []).append(value)
        query: dict[str, str] = {}
        multi_query: dict[str, list[str]] = {}
        for name, value in request.query:
            query[name] = value
            multi_query.setdefault(name, []).append(value)
        content_type = headers.get("Content-Type", "")
        is_text = not request.body or content_type.startswith(TEXT_TYPES)
        body: str | None
        if not request.body:
            body = None
        elif is_text:
            try:
                body = request.body.decode("utf-8")
            except UnicodeDecodeError:
                body, is_text = base64.b64encode(request.body).decode(), False
        else:
            body = base64.b64encode(request.body).decode()
        now = time.time()
        return {
            "resource": resource,
            "path": request.path,
            "httpMethod": request.method,
            "headers": headers or None,
            "multiValueHeaders": multi_headers or None,
            "queryStringParameters": query or None,
            "multiValueQueryStringParameters": multi_query or None,
            "pathParameters": path_params or None,
            "stageVariables": None,
            "requestContext": {
                "resourceId": quote(resource, safe=""),
                "resourcePath": resource,
                "httpMethod": request.method,
                "extendedRequestId": uuid.uuid4().hex[:16],
                "requestTime": time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(now)),
                "requestTimeEpoch": int(now * 1000),
                "path": f"/{self.config.stage}{request.path}",
                "accountId": "000000000000",
                "protocol": "HTTP/1.1",
                "stage": self.config.stage,
                "domainPrefix": "localhost",
                "requestId": str(uuid.uuid4()),
                "identity": {"sourceIp": request.source_ip, "userAgent": headers.get("User-Agent", "")},
                "domainName": "localhost",
                "apiId": "local",
            },
            "body": body,
            "isBase64Encoded": not is_text,
        }

    def _call(self, function: Callable[[dict, Any], Any], event: dict, context: LambdaContext,
              pool: concurrent.futures.Executor | None) -> Any:
        """The function's answer, or API Gateway's own answer when it took too long or crashed;
        without a pool, on this thread and without a timeout."""
        if pool is None:
            try:
                return function(event, context)
            except Exception:
                return _json(502, FUNCTION_ERROR_BODY)
        future = pool.submit(function, event, context)
        try:
            return future.result(timeout=self.config.integration_timeout_s)
        except concurrent.futures.TimeoutError:
            return _json(504, TIMEOUT_BODY, {"x-amzn-ErrorType": "InternalServerErrorException"})
        except Exception:
            return _json(502, FUNCTION_ERROR_BODY)

    def _invoke(self, event: dict, pool: concurrent.futures.Executor | None) -> GatewayResponse:
        context = LambdaContext("rtqcc-api", 512, max_runtime_ms=int(self.config.integration_timeout_s * 1000))
        answer = self._call(self.app, event, context, pool)
        if isinstance(answer, GatewayResponse):
            return answer
        body = answer.get("body") or ""
        raw = base64.b64decode(body) if answer.get("isBase64Encoded") else body.encode("utf-8")
        if len(raw) > self.config.max_response_bytes:
            return _json(502, FUNCTION_ERROR_BODY)
        headers = {name: values[-1] for name, values in (answer.get("multiValueHeaders") or {}).items()}
        headers.update(answer.get("headers") or {})
        if not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"  # API Gateway's default for proxy answers
        return GatewayResponse(status=answer["statusCode"], headers=headers, body=raw)

    def _invoke_streaming(self, event: dict) -> GatewayResponse:
        context = LambdaContext("rtqcc-stream", 512, max_runtime_ms=int(self.config.function_timeout_s * 1000))
        answer = self._call(self.stream_handler, event, context, self._stream_pool)
        if isinstance(answer, GatewayResponse):
            return answer
        return GatewayResponse(status=answer.status, headers=answer.headers,
                               stream=_bounded(answer.chunks, self.config.function_timeout_s))


def _bounded(chunks: Iterator[bytes], limit_s: float) -> Iterator[bytes]:
    """End the stream when the function's time is up, as Lambda would."""
    deadline = time.monotonic() + limit_s
    try:
        for chunk in chunks:
            yield chunk
            if time.monotonic() >= deadline:
                return
    finally:
        close = getattr(chunks, "close", None)
        if close:
            close()


def missing_route() -> GatewayResponse:
    """API Gateway's own answer to a path or method no resource has."""
    return _json(403, MISSING_ROUTE, {"x-amzn-ErrorType": "MissingAuthenticationTokenException"})


def too_large() -> GatewayResponse:
    """API Gateway's own answer to a request body over its payload limit."""
    return _json(413, TOO_LARGE_BODY)


def _json(status: int, body: dict, headers: dict[str, str] | None = None) -> GatewayResponse:
    return GatewayResponse(status=status, headers={"Content-Type": "application/json", **(headers or {})},
                           body=json.dumps(body).encode())


def build_gateway(services, config: GatewayConfig = GatewayConfig(), **pools: int) -> Gateway:
    """The gateway over this project's functions, as every gateway wires it: the API app, the
    streaming function and its opener, all on `services` (an rtqcc Services)."""
    from rtqcc.api import create_app
    from rtqcc.api.streaming import create_stream_handler, create_stream_opener

    return Gateway(create_app(lambda: services), stream_handler=create_stream_handler(lambda: services),
                   stream_opener=create_stream_opener(lambda: services), config=config, **pools)
