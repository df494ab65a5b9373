"""The edge of the API, one home for what every route shares: the route table, the request in
hand (who is calling, its body, its Idempotency-Key), the log context, and the one mapping from
an exception to the answer a client sees (used by the streaming function too).

Errors become `{"error": {"code", "message"}}` here and only here: an ApiError says its own
status; Redis away is a 503 with Retry-After; anything else is logged with its traceback and
answered with a generic 500 that leaks nothing."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from chalice import Chalice, Response
from chalice.app import Request
from redis.exceptions import RedisError

from .. import tracing
from ..errors import ApiError, BadRequest, PayloadTooLarge, UnsupportedMediaType
from ..logs import log_context
from ..services import Services
from ..store.idempotency import Answer, IdempotencyStore, check_key, fingerprint
from ..store.jobs import Job
from .access import authenticate, client_address, find_job
from .auth import Caller

log = logging.getLogger(__name__)


# ---- the one error mapping ---------------------------------------------------------------------

@dataclass(frozen=True)
class ErrorAnswer:
    status: int
    code: str
    message: str
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def body(self) -> dict:
        return {"error": {"code": self.code, "message": self.message}}


def error_answer(exc: BaseException, where: str) -> ErrorAnswer:
    """What a client is told about `exc`, raised while serving `where` (logged as needed)."""
    if isinstance(exc, ApiError):
        return ErrorAnswer(exc.status, exc.code, exc.message, exc.headers)
    if isinstance(exc, RedisError):
        log.warning("Redis unavailable on %s: %s", where, exc)
        return ErrorAnswer(503, "service_unavailable", "Redis is unavailable; try again shortly.", {"Retry-After": "2"})
    log.error("unhandled error on %s", where, exc_info=exc)
    return ErrorAnswer(500, "internal_error", "Something went wrong on our side; it has been logged.")


def error_response(answer: ErrorAnswer) -> Response:
    return Response(body=answer.body, status_code=answer.status,
                    headers={"Content-Type": "application/json", **answer.headers})


# ---- one app, many threads -----------------------------------------------------------------------

class ThreadSafeChalice(Chalice):
    """Chalice keeps the request in hand on the app object (`current_request`), which is right for
    Lambda (one request per container at a time) and wrong for a gateway that invokes one app from
    many threads at once: a view could read another caller's request, Authorization header
    included. Here each thread sees its own."""

    def __init__(self, *args, **kwargs):
        self._per_thread = threading.local()
        super().__init__(*args, **kwargs)

    @property
    def current_request(self):  # type: ignore[override]
        return getattr(self._per_thread, "request", None)

    @current_request.setter
    def current_request(self, request) -> None:
        self._per_thread.request = request

    @property
    def lambda_context(self):  # type: ignore[override]
        return getattr(self._per_thread, "context", None)

    @lambda_context.setter
    def lambda_context(self, context) -> None:
        self._per_thread.context = context


# ---- the request in hand ---------------------------------------------------------------------------

class LazyServices:
    """The clients, built on the first request that needs them (a cold start that only answers
    /healthz builds none)."""

    def __init__(self, factory: Callable[[], Services]):
        self._factory = factory
        self._lock = threading.Lock()
        self._services: Services | None = None

    @property
    def built(self) -> Services | None:
        """The clients if a request has built them, else None (nothing is built for asking)."""
        return self._services

    def __call__(self) -> Services:
        if self._services is None:
            with self._lock:
                if self._services is None:
                    self._services = self._factory()
        return self._services


@dataclass
class ApiCall:
    """One request and what a route asks of it."""

    request: Request
    services: LazyServices

    @property
    def svc(self) -> Services:
        return self.services()

    @property
    def params(self) -> dict[str, str]:
        return self.request.query_params or {}

    def caller(self) -> Caller:
        return authenticate(self.svc, self.request.headers.get("authorization"), client_address(self.request.context))

    def tenant(self) -> str:
        return self.caller().tenant

    def job(self, external_id: str) -> Job:
        """The caller's job, or a 404 that says nothing of other tenants' jobs."""
        return find_job(self.svc, self.tenant(), external_id)

    def json_body(self) -> object:
        raw = self.request.raw_body or b""
        limit = self.svc.settings.max_body_bytes
        if len(raw) > limit:
            raise PayloadTooLarge(f"The body is {len(raw)} bytes; the limit is {limit}.")
        content_type = (self.request.headers.get("content-type") or "application/json").split(";")[0].strip().lower()
        if content_type != "application/json":
            raise UnsupportedMediaType(f"Send the body as application/json, not {content_type}.")
        if not raw.strip():
            raise BadRequest("The body is empty; send a JSON object.")
        try:
            return json.loads(raw, object_pairs_hook=_unique_keys)
        except _DuplicateKey as exc:
            raise BadRequest(f"The body names {exc.args[0]!r} twice; give each field once.") from None
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            raise BadRequest(f"The body is not valid JSON: {exc}.") from None

    def idempotent(self, owner: str, action: Callable[[], Answer]) -> Answer:
        """Run `action` once per Idempotency-Key (when the request carries one)."""
        key = self.request.headers.get("idempotency-key")
        if key is None:
            return action()
        request_hash = fingerprint(self.request.method, self.request.path, self.request.raw_body or b"")
        store = IdempotencyStore(self.svc.db, in_progress_ttl_s=self.svc.settings.idempotency_in_progress_s)
        return store.run(owner, check_key(key), request_hash, action)


class _DuplicateKey(Exception):
    pass


def _unique_keys(pairs: list[tuple[str, object]]) -> dict:
    """JSON objects whose keys repeat are refused: which value was meant is anyone's guess."""
    result: dict = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


# ---- the route table ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class RouteSpec:
    path: str
    methods: tuple[str, ...]
    view: Callable[..., Any]
    accepts_any_body: bool  # POST and PUT routes take any Content-Type here and check it themselves


ROUTES: list[RouteSpec] = []


def route(path: str, *methods: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declare a route: `view(call, **path_params)` answers it, at module level, testable alone."""
    def register(view: Callable[..., Any]) -> Callable[..., Any]:
        ROUTES.append(RouteSpec(path, methods, view, accepts_any_body=bool({"POST", "PUT"} & set(methods))))
        return view

    return register


def mount(app: Chalice, services: LazyServices) -> None:
    """Register every declared route on `app`, each behind the edge: log context, trace span and
    error mapping."""
    for spec in ROUTES:
        options = {"content_types": ["*/*"]} if spec.accepts_any_body else {}
        for method in spec.methods:
            app.route(spec.path, methods=[method], **options)(_behind_the_edge(app, services, spec.view, method,
                                                                               spec.path))


def _behind_the_edge(app: Chalice, services: LazyServices, view: Callable[..., Any], method: str,
                     path: str) -> Callable[..., Any]:
    @functools.wraps(view)
    def answer(**path_params: str) -> Any:
        request = app.current_request
        # A caller's own trace (a W3C traceparent header) is continued; else a trace starts here.
        incoming = request.headers.get(tracing.TRACEPARENT)
        with log_context(requestId=(request.context or {}).get("requestId"),
                         externalId=path_params.get("external_id")), \
                tracing.span(f"{method} {path}", kind="server", parent={tracing.TRACEPARENT: incoming} if incoming else None,
                             attributes={"http.request.method": request.method, "http.route": path,
                                         **({"rtqcc.job.external_id": path_params["external_id"]}
                                            if "external_id" in path_params else {})}) as span:
            started = time.perf_counter()
            try:
                response = view(ApiCall(request, services), **path_params)
            except Exception as exc:
                response = error_response(error_answer(exc, f"{request.method} {request.path}"))
            status = response.status_code if isinstance(response, Response) else 200
            span.set_attribute("http.response.status_code", status)
            _observe(services, request.method, status, time.perf_counter() - started)
            return response

    return answer


def _observe(services: LazyServices, method: str, status: int, seconds: float) -> None:
    """The request's time by status class, for /metrics (the 5xx alert); never fails the request.
    Only where the clients exist already: a /healthz on a cold start builds none for it."""
    built = services.built
    if built is None:
        return
    try:
        built.metrics.observe("api_request_seconds", seconds, method=method, status=f"{status // 100}xx")
    except Exception as exc:
        log.debug("request not measured: %s", exc)