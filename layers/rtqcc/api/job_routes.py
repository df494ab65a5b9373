"""The routes of jobs: create, list, read, control (start, pause, resume, cancel, retry), stream,
stream token, manuscript and sections. Each is `view(call, **path_params)`; api/edge.py mounts
them behind the one error mapping."""

from __future__ import annotations

import logging

from chalice import Response
from redis.exceptions import RedisError

from ..bus.control import ControlCommand, send_control
from ..delivery.exports import stored_export
from ..delivery.formats import EXPORT_CSP, ExportFormat, choose_format, content_disposition, download_name
from ..errors import BadRequest, NotFound, NotReady
from ..ids import is_external_id
from ..status import JobPriority, JobStatus, SectionStatus
from ..store.idempotency import Answer
from ..store.jobs import NewJob
from ..store.usage import public_usage
from ..store.versions import etag
from ..store.views import job_document, job_links, job_list_item
from . import stream_tokens
from .access import SSE_HEADERS, check_external_id, client_address, find_job, issue_stream_token, open_job_stream
from .edge import ApiCall, route

log = logging.getLogger(__name__)

MAX_PAGE = 100
MAX_SECTION_INDEX = 100_000
STOP_COMMANDS = {"pause": ControlCommand.PAUSE, "cancel": ControlCommand.CANCEL}
QUEUEING_VERBS = ("start", "resume", "retry", "approve", "regenerate")


@route("/jobs", "POST")
def create_job(call: ApiCall) -> Response:
    who = call.caller()
    owner = who.tenant
    payload = call.json_body()

    def create() -> Answer:
        # pydantic and the cost controls stay off the cold path of other routes
        from ..writing.model_policy import check_model
        from ..writing.pricing import price_for
        from ..writing.quotas import QuotaStore, job_budget
        from .models import outline_items, parse_create_job

        s = call.svc
        spec = parse_create_job(payload, max_sections=s.settings.max_sections)
        model = spec.model or s.settings.default_model
        check_model(model, s.settings)
        standing = QuotaStore(s.db, s.settings).standing(owner)
        budget = job_budget(spec.budget.model_dump(exclude_none=True), model, standing.quota, s.settings.prices)
        standing.check_daily(price_for(model, s.settings.prices))
        webhook: dict = {}

        def with_webhook(conn, job) -> None:  # the job's own URL, stored with it (a bad URL: neither is)
            from ..delivery.endpoints import register_endpoint
            from ..store.webhooks import JOB_EVENTS

            webhook.update(register_endpoint(s.webhooks, s.settings, owner, spec.webhook.url,
                                             spec.webhook.events or list(JOB_EVENTS), job_id=job.id, conn=conn))

        job = s.jobs.create(NewJob(
            tenant=owner,
            title=spec.title,
            brief=spec.brief,
            model=model,
            outline=outline_items(spec.outline) if spec.outline else None,
            section_count=spec.section_count,
            params=spec.params.model_dump(exclude_none=True),
            budget=budget,
            metadata=spec.metadata,
            priority=JobPriority(spec.priority),
            options=job_options(spec),
            tier=who.tier,
        ), then=with_webhook if spec.webhook else None)
        s.events.publish(job.external_id, "status", {"status": job.status.value})
        return Answer(201, {"externalId": job.external_id, "status": job.status.value,
                            "links": job_links(job.external_id), "budget": budget, "quota": standing.public(),
                            **({"webhook": webhook} if webhook else {})})

    answer = call.idempotent(owner, create)
    return Response(body=answer.body, status_code=answer.status,
                    headers={"Location": f"/jobs/{answer.body['externalId']}", **replayed(answer)})


@route("/jobs", "GET")
def list_jobs(call: ApiCall) -> dict:
    owner = call.tenant()
    limit = int_param(call.params, "limit", default=20, lo=1, hi=MAX_PAGE)
    status = call.params.get("status")
    listable = [s.value for s in JobStatus if s != JobStatus.DELETING]
    if status is not None and status not in listable:
        raise BadRequest(f"status must be one of {', '.join(listable)}; got {status!r}.")
    cursor = call.params.get("cursor")
    if cursor is not None and not is_external_id(cursor):
        raise BadRequest("cursor must be the next_cursor of a previous page.")
    found = call.svc.jobs.list(owner, status=JobStatus(status) if status else None, before=cursor, limit=limit + 1)
    page = found[:limit]
    figures = call.svc.jobs.list_figures([job.id for job in page])
    return {
        "jobs": [job_list_item(job, figures.get(job.id)) for job in page],
        "next_cursor": page[-1].external_id if len(found) > limit else None,
    }


@route("/jobs/{external_id}", "GET")
def get_job(call: ApiCall, external_id: str) -> dict:
    job = call.job(external_id)
    document = job_document(call.svc.jobs, job)
    try:  # the job's state is Postgres's: without Redis, answer it without these details
        if job.status == JobStatus.QUEUED:
            document["queue"] = _queue_wait(call.svc, job)
        elif job.status == JobStatus.RUNNING and (waits := call.svc.provider_waits.of(job.external_id)):
            document["provider_waits"] = waits
    except RedisError as exc:
        log.warning("no queue position or provider waits for %s, Redis is unavailable: %s", job.external_id, exc)
    return document


@route("/jobs/{external_id}", "DELETE")
def delete_job(call: ApiCall, external_id: str) -> Response:
    """202 once the job is gone from the API for good; its data goes at once, or (a running job)
    once its consumer has let go. A job already deleted is a 404: nothing is kept to say it was."""
    from ..run.deletion import delete_job as delete  # off the cold path of the other routes

    owner = call.tenant()
    check_external_id(external_id)
    deletion = delete(call.svc, owner, external_id)
    return Response(body={"externalId": external_id, "status": "deleted" if deletion.done else "deleting"},
                    status_code=202)


def job_options(spec) -> dict:
    """What a job asked for beyond its params, as stored (only what differs from the defaults)."""
    options: dict = {}
    if spec.review.outline:
        options["review"] = {"outline": True}
    if spec.context != "tail":
        options["context"] = spec.context
    return options


def _queue_wait(s, job) -> dict:
    """Why a queued job is not running yet: its tenant's cap (and its place among the tenant's
    waiting jobs), or no consumer slot free yet."""
    position = s.queue.waiting_position(job.tenant, job.external_id)
    if position is None:
        return {"waiting_for": "consumer"}
    return {"waiting_for": "tenant_cap", "position": position,
            "running": s.jobs.running_counts([job.tenant])[job.tenant], "cap": s.settings.running_cap(job.tier)}


@route("/jobs/{external_id}/start", "POST")
def start_job(call: ApiCall, external_id: str) -> Response:
    answer = call.idempotent(call.tenant(), lambda: as_answer(control(call, external_id, "start")))
    return Response(body=answer.body, status_code=answer.status, headers=replayed(answer))


@route("/jobs/{external_id}/pause", "POST")
def pause_job(call: ApiCall, external_id: str) -> Response:
    return control(call, external_id, "pause")


@route("/jobs/{external_id}/resume", "POST")
def resume_job(call: ApiCall, external_id: str) -> Response:
    return control(call, external_id, "resume")


@route("/jobs/{external_id}/cancel", "POST")
def cancel_job(call: ApiCall, external_id: str) -> Response:
    return control(call, external_id, "cancel")


@route("/jobs/{external_id}/retry", "POST")
def retry_job(call: ApiCall, external_id: str) -> Response:
    return control(call, external_id, "retry")


def control(call: ApiCall, external_id: str, verb: str, *, along=None) -> Response:
    """Move the job by `verb` (status.py's TRANSITIONS), tell its watchers, stop its stream if it
    was running, queue it if it should run. `along(conn, job)`: what a queueing verb writes in the
    same transaction (a regeneration's sections)."""
    owner = call.tenant()
    check_external_id(external_id)
    s = call.svc
    if verb == "start" and _starts_in_review(s, owner, external_id):
        verb = "review"  # its outline is given and it asked to review it: nothing to draft first
    # Cancelling the revision of a finished manuscript gives back the versions it had.
    outcome = s.revisions.cancel_revision(owner, external_id) if verb == "cancel" else None
    if outcome is None and verb in QUEUEING_VERBS:
        from ..writing.quotas import QuotaStore  # into the queue only within the tenant's quotas

        outcome = QuotaStore(s.db, s.settings).admit(owner, external_id, verb, s.jobs, along=along)
    elif outcome is None:
        outcome = s.jobs.transition(owner, external_id, verb)
    job = s.jobs.get(owner, external_id) if along is not None and outcome.changed else outcome.job
    if outcome.changed:
        # Published before the job is enqueued, so a fast consumer's "running" comes after it.
        status = {"status": job.status.value}
        if job.revision:
            status["revision"] = job.revision
        if job.status_reason == "revision_cancelled":
            status["reason"] = job.status_reason
        events = [("status", status)]
        if job.status.terminal:
            events.append(("done", {"status": job.status.value}))
        s.events.publish_many(external_id, events)
        if outcome.previous == JobStatus.RUNNING and verb in STOP_COMMANDS:
            # The consumer's lease keeper aborts the provider stream on this, within milliseconds.
            send_control(s.redis, external_id, STOP_COMMANDS[verb])
        if outcome.previous == JobStatus.QUEUED and job.status != JobStatus.QUEUED:
            _withdraw_waiting(s, job)
    if verb in QUEUEING_VERBS and job.status == JobStatus.QUEUED:
        # Also on a repeated start of a queued job: a lost enqueue is healed by retrying.
        s.queue.enqueue(external_id)
        s.consumer_wakeup.job_queued()
    return Response(body=job_document(s.jobs, job), status_code=202)


def _withdraw_waiting(s, job) -> None:
    """A job no longer queued leaves its tenant's waiting jobs, if it was there. Its move is
    committed already: without Redis it stays there until promoted, and its consumer skips it."""
    try:
        s.queue.withdraw(job.tenant, job.external_id)
    except RedisError as exc:
        log.warning("job %s left queued but is still among its tenant's waiting jobs: %s", job.external_id, exc)


def _starts_in_review(s, owner: str, external_id: str) -> bool:
    job = find_job(s, owner, external_id)
    return job.status == JobStatus.CREATED and job.awaits_outline_review and bool(s.jobs.sections(job.id))


@route("/jobs/{external_id}/stream", "GET")
def stream_job(call: ApiCall, external_id: str) -> Response:
    """The buffered (long-poll) stream, as behind API Gateway REST; streaming gateways serve this
    route from the streaming function instead."""
    s = call.svc
    stream = open_job_stream(s, call.request.headers, call.params, external_id, client_address(call.request.context))
    answer = stream.long_poll(wait_s=s.settings.sse_long_poll_s, retry_ms=s.settings.sse_retry_ms)
    return Response(body=answer.body, status_code=answer.status, headers=SSE_HEADERS)


@route("/jobs/{external_id}/stream-token", "POST")
def stream_token(call: ApiCall, external_id: str) -> Response:
    who = call.caller()
    job = find_job(call.svc, who.tenant, external_id)
    token = issue_stream_token(call.svc, who, job)
    return Response(body={"token": token, "expires_in": stream_tokens.TOKEN_TTL_S,
                          "stream_url": f"/jobs/{job.external_id}/stream?access_token={token}"}, status_code=201)


@route("/jobs/{external_id}/manuscript", "GET")
def get_manuscript(call: ApiCall, external_id: str) -> Response:
    """The manuscript as markdown, HTML, DOCX or PDF (`?format=`, else the Accept header): each
    export built once per manuscript revision and kept in S3 (delivery/exports.py)."""
    job = call.job(external_id)
    fmt = choose_format(call.params.get("format"), call.request.headers.get("accept"))
    if job.status != JobStatus.COMPLETED or not job.manuscript_key:
        raise NotReady(f"Job {external_id} is {job.status.value}; the manuscript exists once it is completed.")
    s = call.svc
    limit = s.settings.max_inline_manuscript_bytes
    if fmt.binary:
        # Inline only to a client that asks for exactly this type (base64 makes it a third larger);
        # any other, a browser or `Accept: */*`, downloads it from S3.
        limit = limit * 3 // 4 if _takes_binary(call.request.headers.get("accept"), fmt) else 0
    disposition = content_disposition(download_name(job.title, job.external_id, fmt))
    export = stored_export(s.blobs, job.manuscript_key, job.title, fmt, inline_limit_bytes=limit,
                           disposition=disposition)
    if export.body is None:
        # Past what a function may answer (Lambda: 6 MB): the client downloads it from S3 directly.
        location = s.blobs.presigned_get(export.key)
        return Response(body="", status_code=303, headers={
            "Location": location, "Cache-Control": "no-store", "Content-Disposition": disposition,
            "Content-Type": "text/plain; charset=utf-8"})
    headers = {"Content-Type": fmt.content_type, "Content-Disposition": disposition,
               "X-Content-Type-Options": "nosniff"}
    if not fmt.binary:
        return Response(body=export.body.decode("utf-8"), status_code=200,
                        headers={**headers, "Content-Security-Policy": EXPORT_CSP})
    return Response(body=export.body, status_code=200, headers=headers)


def _takes_binary(accept: str | None, fmt: ExportFormat) -> bool:
    """Whether the gateway hands a base64 answer over as bytes: API Gateway decodes it only when
    the first type in Accept is one of the API's binary media types (Chalice registers DOCX and
    PDF, never */*, which would encode every JSON answer too); to any other client it would pass
    the base64 text on as it is."""
    first = (accept or "").split(",")[0].split(";")[0].strip().lower()
    return first == fmt.media_type


@route("/jobs/{external_id}/sections/{index}", "GET")
def get_section(call: ApiCall, external_id: str, index: str) -> Response:
    job = call.job(external_id)
    if not is_whole_number(index, MAX_SECTION_INDEX):
        raise BadRequest(f"The section index must be a whole number from 0, got {index[:40]!r}.")
    s = call.svc
    sections = {section.idx: section for section in s.jobs.sections(job.id)}
    section = sections.get(int(index))
    if section is None:
        raise NotFound(f"Job {external_id} has no section {index} (it has {len(sections)}).")
    usage = s.jobs.usage_by_section(job.id).get(section.idx)
    body = {"index": section.idx, "title": section.title, "brief": section.brief,
            "status": section.status.value, "version": section.current_version, "locked": section.locked,
            "target_words": section.target_words, "usage": public_usage(usage)}
    if section.content_key:
        body["content"] = s.blobs.get(section.content_key).decode("utf-8")
    if section.status != SectionStatus.DONE:
        body["partial"] = section.partial_text
    headers = {"ETag": etag(section.current_version)} if section.current_version else {}
    return Response(body=body, status_code=200, headers=headers)


def as_answer(response: Response) -> Answer:
    return Answer(response.status_code, response.body)


def replayed(answer: Answer) -> dict[str, str]:
    return {"Idempotent-Replayed": "true"} if answer.replayed else {}


def int_param(params: dict, name: str, *, default: int, lo: int, hi: int) -> int:
    raw = params.get(name)
    if raw is None:
        return default
    if not is_whole_number(raw, hi) or not lo <= int(raw) <= hi:
        raise BadRequest(f"{name} must be a whole number from {lo} to {hi}, got {raw[:40]!r}.")
    return int(raw)


def is_whole_number(raw: str, most: int) -> bool:
    """ASCII digits, and no more of them than `most` has: int() refuses strings past 4,300 digits."""
    return raw.isascii() and raw.isdigit() and len(raw.lstrip("0")) <= len(str(most))
