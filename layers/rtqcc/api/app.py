"""The API function: Chalice routes over the library. Errors become JSON here, and only here."""

from __future__ import annotations

import functools
import json
import logging
import threading
import time
from typing import Callable

from chalice import Chalice, Response
from redis.exceptions import RedisError

from ..errors import ApiError, BadRequest, NotFound, NotReady, PayloadTooLarge, UnsupportedMediaType
from ..bus.control import ControlCommand, send_control
from ..ids import is_external_id
from ..store.usage import public_usage
from ..store.idempotency import Answer, IdempotencyStore, check_key, fingerprint
from ..store.jobs import Job, NewJob, OutlineItem
from ..logs import log_context
from ..services import Services
from ..status import JobStatus
from ..store.views import job_document, job_links, job_summary
from . import stream_tokens
from .access import (SSE_HEADERS, authenticate, check_external_id, check_metrics_token, client_address, find_job,
                     issue_stream_token, open_job_stream)
from .auth import Caller

log = logging.getLogger(__name__)

MAX_PAGE = 100
STOP_COMMANDS = {"pause": ControlCommand.PAUSE, "cancel": ControlCommand.CANCEL}
MAX_SECTION_INDEX = 100_000


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


def create_app(services_factory: Callable[[], Services], *, app_name: str = "rtqcc-api") -> Chalice:
    app = ThreadSafeChalice(app_name=app_name)
    services: list[Services] = []

    def svc() -> Services:
        if not services:
            services.append(services_factory())
        return services[0]

    def edge(view: Callable) -> Callable:
        @functools.wraps(view)
        def wrapped(*args, **kwargs):
            request_id = (app.current_request.context or {}).get("requestId")
            try:
                with log_context(requestId=request_id, externalId=kwargs.get("external_id")):
                    return view(*args, **kwargs)
            except ApiError as exc:
                return error_response(exc.status, exc.code, exc.message, exc.headers)
            except RedisError as exc:
                log.warning("Redis unavailable on %s: %s", app.current_request.path, exc)
                return error_response(503, "service_unavailable", "Redis is unavailable; try again shortly.",
                                      {"Retry-After": "2"})
            except Exception:
                log.exception("unhandled error on %s %s", app.current_request.method, app.current_request.path)
                return error_response(500, "internal_error", "Something went wrong on our side; it has been logged.")

        return wrapped

    def caller() -> Caller:
        request = app.current_request
        return authenticate(svc(), request.headers.get("authorization"), client_address(request.context))

    def tenant() -> str:
        return caller().tenant

    def load_job(external_id: str) -> Job:
        return find_job(svc(), tenant(), external_id)

    def json_body() -> object:
        request = app.current_request
        raw = request.raw_body or b""
        if len(raw) > svc().settings.max_body_bytes:
            raise PayloadTooLarge(f"The body is {len(raw)} bytes; the limit is {svc().settings.max_body_bytes}.")
        content_type = (request.headers.get("content-type") or "application/json").split(";")[0].strip().lower()
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

    def idempotent(owner: str, action: Callable[[], Answer]) -> Answer:
        """Run `action` once per Idempotency-Key (when the request carries one)."""
        request = app.current_request
        key = request.headers.get("idempotency-key")
        if key is None:
            return action()
        request_hash = fingerprint(request.method, request.path, request.raw_body or b"")
        store = IdempotencyStore(svc().db, in_progress_ttl_s=svc().settings.idempotency_in_progress_s)
        return store.run(owner, check_key(key), request_hash, action)

    # ---- jobs -----------------------------------------------------------------------------

    @app.route("/jobs", methods=["POST"], content_types=["*/*"])
    @edge
    def create_job():
        owner = tenant()
        payload = json_body()

        def create() -> Answer:
            # pydantic and the cost controls stay off the cold path of other routes
            from ..writing.model_policy import check_model
            from ..writing.pricing import price_for
            from ..writing.quotas import QuotaStore, job_budget
            from .models import parse_create_job

            s = svc()
            spec = parse_create_job(payload, max_sections=s.settings.max_sections)
            model = spec.model or s.settings.default_model
            check_model(model, s.settings)
            standing = QuotaStore(s.db, s.settings).standing(owner)
            budget = job_budget(spec.budget.model_dump(exclude_none=True), model, standing.quota, s.settings.prices)
            standing.check_daily(price_for(model, s.settings.prices))
            job = s.jobs.create(NewJob(
                tenant=owner,
                title=spec.title,
                brief=spec.brief,
                model=model,
                outline=[OutlineItem(title=o.title, brief=o.brief) for o in spec.outline] if spec.outline else None,
                section_count=spec.section_count,
                params=spec.params.model_dump(exclude_none=True),
                budget=budget,
                metadata=spec.metadata,
            ))
            s.events.publish(job.external_id, "status", {"status": job.status.value})
            return Answer(201, {"externalId": job.external_id, "status": job.status.value,
                                "links": job_links(job.external_id), "budget": budget, "quota": standing.public()})

        answer = idempotent(owner, create)
        return Response(body=answer.body, status_code=answer.status,
                        headers={"Location": f"/jobs/{answer.body['externalId']}", **_replayed(answer)})

    @app.route("/jobs", methods=["GET"])
    @edge
    def list_jobs():
        owner = tenant()
        params = app.current_request.query_params or {}
        limit = _int_param(params, "limit", default=20, lo=1, hi=MAX_PAGE)
        status = params.get("status")
        if status is not None and status not in {s.value for s in JobStatus}:
            raise BadRequest(f"status must be one of {', '.join(s.value for s in JobStatus)}; got {status!r}.")
        cursor = params.get("cursor")
        if cursor is not None and not is_external_id(cursor):
            raise BadRequest("cursor must be the next_cursor of a previous page.")
        found = svc().jobs.list(owner, status=JobStatus(status) if status else None, before=cursor, limit=limit + 1)
        page = found[:limit]
        return {
            "jobs": [job_summary(job) for job in page],
            "next_cursor": page[-1].external_id if len(found) > limit else None,
        }

    @app.route("/jobs/{external_id}", methods=["GET"])
    @edge
    def get_job(external_id):
        return job_document(svc().jobs, load_job(external_id))

    @app.route("/jobs/{external_id}/start", methods=["POST"], content_types=["*/*"])
    @edge
    def start_job(external_id):
        answer = idempotent(tenant(), lambda: _as_answer(control(external_id, "start")))
        return Response(body=answer.body, status_code=answer.status, headers=_replayed(answer))

    @app.route("/jobs/{external_id}/pause", methods=["POST"], content_types=["*/*"])
    @edge
    def pause_job(external_id):
        return control(external_id, "pause")

    @app.route("/jobs/{external_id}/resume", methods=["POST"], content_types=["*/*"])
    @edge
    def resume_job(external_id):
        return control(external_id, "resume")

    @app.route("/jobs/{external_id}/cancel", methods=["POST"], content_types=["*/*"])
    @edge
    def cancel_job(external_id):
        return control(external_id, "cancel")

    def control(external_id: str, verb: str) -> Response:
        owner = tenant()
        check_external_id(external_id)
        s = svc()
        if verb in ("start", "resume", "retry"):
            from ..writing.quotas import QuotaStore  # into the queue only within the tenant's quotas

            outcome = QuotaStore(s.db, s.settings).admit(owner, external_id, verb, s.jobs)
        else:
            outcome = s.jobs.transition(owner, external_id, verb)
        job = outcome.job
        if outcome.changed:
            # Published before the job is enqueued, so a fast consumer's "running" comes after it.
            events = [("status", {"status": job.status.value})]
            if job.status.terminal:
                events.append(("done", {"status": job.status.value}))
            s.events.publish_many(external_id, events)
            if outcome.previous == JobStatus.RUNNING and verb in STOP_COMMANDS:
                # The consumer's lease keeper aborts the provider stream on this, within milliseconds.
                send_control(s.redis, external_id, STOP_COMMANDS[verb])
        if verb in ("start", "resume", "retry") and job.status == JobStatus.QUEUED:
            # Also on a repeated start of a queued job: a lost enqueue is healed by retrying.
            s.queue.enqueue(external_id)
        return Response(body=job_document(s.jobs, job), status_code=202)

    @app.route("/jobs/{external_id}/retry", methods=["POST"], content_types=["*/*"])
    @edge
    def retry_job(external_id):
        return control(external_id, "retry")

    @app.route("/jobs/{external_id}/stream", methods=["GET"])
    @edge
    def stream_job(external_id):
        request = app.current_request
        stream = open_job_stream(svc(), request.headers, request.query_params or {}, external_id,
                                 client_address(request.context))
        answer = stream.long_poll(wait_s=svc().settings.sse_long_poll_s, retry_ms=svc().settings.sse_retry_ms)
        return Response(body=answer.body, status_code=answer.status, headers=SSE_HEADERS)

    @app.route("/jobs/{external_id}/stream-token", methods=["POST"], content_types=["*/*"])
    @edge
    def stream_token(external_id):
        who = caller()
        job = find_job(svc(), who.tenant, external_id)
        token = issue_stream_token(svc(), who, job)
        return Response(body={"token": token, "expires_in": stream_tokens.TOKEN_TTL_S,
                              "stream_url": f"/jobs/{job.external_id}/stream?access_token={token}"}, status_code=201)

    @app.route("/jobs/{external_id}/manuscript", methods=["GET"])
    @edge
    def get_manuscript(external_id):
        job = load_job(external_id)
        if job.status != JobStatus.COMPLETED or not job.manuscript_key:
            raise NotReady(f"Job {external_id} is {job.status.value}; the manuscript exists once it is completed.")
        s = svc()
        body = s.blobs.read_at_most(job.manuscript_key, s.settings.max_inline_manuscript_bytes)
        if body is None:
            # Past what a function may answer (Lambda: 6 MB): the client downloads it from S3 directly.
            return Response(body="", status_code=303,
                            headers={"Location": s.blobs.presigned_get(job.manuscript_key), "Cache-Control": "no-store"})
        return Response(body=body.decode("utf-8"), status_code=200,
                        headers={"Content-Type": "text/markdown; charset=utf-8"})

    @app.route("/jobs/{external_id}/sections/{index}", methods=["GET"])
    @edge
    def get_section(external_id, index):
        job = load_job(external_id)
        if not is_whole_number(index, MAX_SECTION_INDEX):
            raise BadRequest(f"The section index must be a whole number from 0, got {index[:40]!r}.")
        s = svc()
        sections = {section.idx: section for section in s.jobs.sections(job.id)}
        section = sections.get(int(index))
        if section is None:
            raise NotFound(f"Job {external_id} has no section {index} (it has {len(sections)}).")
        usage = s.jobs.usage_by_section(job.id).get(section.idx)
        body = {"index": section.idx, "title": section.title, "brief": section.brief,
                "status": section.status.value, "usage": public_usage(usage)}
        if section.content_key:
            body["content"] = s.blobs.get(section.content_key).decode("utf-8")
        else:
            body["partial"] = section.partial_text
        return body

    # ---- operations -----------------------------------------------------------------------

    @app.route("/metrics", methods=["GET"])
    @edge
    def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        from ..metrics import render

        check_metrics_token(svc(), app.current_request.headers.get("authorization"),
                            client_address(app.current_request.context))
        return Response(body=render(svc()).decode(), status_code=200, headers={"Content-Type": CONTENT_TYPE_LATEST})

    @app.route("/openapi.json", methods=["GET"])
    @edge
    def openapi():
        from .openapi import openapi_document

        return openapi_document()

    # ---- health ---------------------------------------------------------------------------

    @app.route("/healthz", methods=["GET"])
    @edge
    def healthz():
        return {"status": "ok"}

    @app.route("/readyz", methods=["GET"])
    @edge
    def readyz():
        s = svc()
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

    return app


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


def _as_answer(response: Response) -> Answer:
    return Answer(response.status_code, response.body)


def _replayed(answer: Answer) -> dict[str, str]:
    return {"Idempotent-Replayed": "true"} if answer.replayed else {}


def error_response(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(body={"error": {"code": code, "message": message}}, status_code=status,
                    headers={"Content-Type": "application/json", **(headers or {})})


def _int_param(params: dict, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not is_whole_number(raw, hi) or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, got {raw[:40]!r}.")
    return int(raw)


def is_whole_number(raw: str, most: int) -> bool:
    """ASCII digits, and no more of them than `most` has: int() refuses strings past 4,300 digits."""
    return raw.isascii() and raw.isdigit() and len(raw.lstrip("0")) <= len(str(most))

