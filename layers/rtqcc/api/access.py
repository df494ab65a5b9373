"""Who is calling and which job they may see: shared by the Chalice routes and the streaming
SSE function, so both answer the same way."""

from __future__ import annotations

from typing import Mapping

from ..errors import JobNotFound
from ..ids import is_external_id
from ..jobs import Job
from ..services import Services
from ..sse import JobEventStream, parse_last_event_id
from . import stream_tokens
from .auth import tenant_for

SSE_HEADERS = {
    "Content-Type": "text/event-stream; charset=utf-8",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


def stream_signing_key(services: Services) -> bytes:
    return stream_tokens.signing_key(services.settings.stream_token_secret, services.settings.api_keys)


def check_external_id(external_id: str) -> None:
    if not is_external_id(external_id):
        raise JobNotFound(f"{external_id!r} is not a job id (they look like RTQCC-01J...).")


def find_job(services: Services, tenant: str, external_id: str) -> Job:
    check_external_id(external_id)
    return services.jobs.get(tenant, external_id)


def open_job_stream(services: Services, headers: Mapping[str, str], query: Mapping[str, str],
                    external_id: str) -> JobEventStream:
    """Authorize the caller, find the job, and position its event stream (`headers` must be
    case-insensitive, as Chalice's and the gateway's are)."""
    token = query.get("access_token")
    if token and not headers.get("authorization"):
        check_external_id(external_id)
        tenant = stream_tokens.verify(stream_signing_key(services), token, external_id)
    else:
        tenant = tenant_for(headers.get("authorization"), services.settings.api_keys, services.api_keys)
    job = find_job(services, tenant, external_id)
    last_event_id = parse_last_event_id(headers.get("last-event-id") or query.get("lastEventId"))
    return JobEventStream(services.events, services.jobs, job, last_event_id)
