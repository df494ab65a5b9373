"""Who is calling and which job they may see: shared by the Chalice routes and the streaming
SSE function, so both answer the same way."""

from __future__ import annotations

import hmac
from typing import Mapping

from ..errors import JobNotFound, NotFound, Unauthorized
from ..ids import is_external_id
from ..store.jobs import Job
from ..services import Services
from ..streaming.stream import JobEventStream, parse_last_event_id
from . import stream_tokens
from .auth import Caller

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def client_address(event_or_context: Mapping | None) -> str:
    """The caller's address as the gateway saw it (API Gateway's requestContext.identity)."""
    context = (event_or_context or {}).get("requestContext", event_or_context) or {}
    return str((context.get("identity") or {}).get("sourceIp") or "unknown")


def authenticate(services: Services, authorization: str | None, client: str) -> Caller:
    """The caller of an API request, counted against the tenant's request rate."""
    caller = services.auth.caller(authorization, client)
    services.rate_limiter.check(caller.tenant)
    return caller


def check_external_id(external_id: str) -> None:
    if not is_external_id(external_id):
        raise JobNotFound(f"{external_id!r} is not a job id (they look like RTQCC-01J...).")


def find_job(services: Services, tenant: str, external_id: str) -> Job:
    check_external_id(external_id)
    return services.jobs.get(tenant, external_id)


def issue_stream_token(services: Services, caller: Caller, job: Job) -> str:
    grant = stream_tokens.StreamGrant(job.tenant, job.external_id, caller.key_ref)
    return stream_tokens.issue(stream_tokens.SigningKeys.from_settings(services.settings), grant)


def _stream_caller(services: Services, token: str, external_id: str, client: str) -> Caller:
    check_external_id(external_id)
    throttle = services.auth.throttle
    if throttle is not None:
        throttle.check(client)
    try:
        grant = stream_tokens.verify(stream_tokens.SigningKeys.from_settings(services.settings), token, external_id)
        caller = Caller(grant.tenant, grant.key_ref)
        if not services.auth.is_live(caller):
            raise Unauthorized("The API key this stream token was issued to has been revoked; ask for a new one.")
    except Unauthorized:
        if throttle is not None:
            throttle.record_failure(client)
        raise
    services.rate_limiter.check(caller.tenant)
    return caller


def open_job_stream(services: Services, headers: Mapping[str, str], query: Mapping[str, str],
                    external_id: str, client: str) -> JobEventStream:
    """Authorize the caller, find the job, take one of the caller's stream slots, and position
    its event stream (`headers` must be case-insensitive, as Chalice's and the gateway's are).
    The stream holds the slot until it is closed."""
    token = query.get("access_token")
    if token and not headers.get("authorization"):
        caller = _stream_caller(services, token, external_id, client)
    else:
        caller = authenticate(services, headers.get("authorization"), client)
    job = find_job(services, caller.tenant, external_id)
    last_event_id = parse_last_event_id(headers.get("last-event-id") or query.get("lastEventId") or query.get("last_event_id"))
    slot = services.stream_slots.acquire(caller.tenant, caller.key_ref)
    return JobEventStream(services.events, services.jobs, job, last_event_id, slot=slot)


def check_metrics_token(services: Services, authorization: str | None, client: str) -> None:
    """`/metrics` has its own bearer token: it shows every tenant's figures, so no tenant key opens it."""
    expected = services.settings.metrics_token
    if not expected:
        raise NotFound("Metrics are off: set RTQCC_METRICS_TOKEN to serve them.")
    throttle = services.auth.throttle
    if throttle is not None:
        throttle.check(client)
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), expected.encode()):
        if throttle is not None:
            throttle.record_failure(client)
        raise Unauthorized("Send the metrics token as 'Authorization: Bearer <RTQCC_METRICS_TOKEN>'.",
                           headers={"WWW-Authenticate": "Bearer"})
