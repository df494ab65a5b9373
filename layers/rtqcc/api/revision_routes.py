"""The routes of revision: review and approve an outline, regenerate, edit, lock and restore
sections, list their versions, fork a job. The writes live in store/revisions.py and
store/versions.py; the consumer writes the model's new versions."""

from __future__ import annotations

from chalice import Response

from ..errors import BadRequest, NotFound
from ..store.views import job_document
from ..store.versions import SectionVersion, etag
from .edge import ApiCall, route
from ..store.idempotency import Answer
from .job_routes import MAX_SECTION_INDEX, as_answer, control, is_whole_number, replayed

_SECTION = "/jobs/{external_id}/sections/{index}"


@route("/jobs/{external_id}/outline", "PUT")
def replace_outline(call: ApiCall, external_id: str) -> dict:
    from .models import OutlineIn, check_section_count, outline_items, parse_body

    job = call.job(external_id)  # another tenant's job is a 404 before its body is looked at
    body = parse_body(OutlineIn, call.json_body(), "outline")
    check_section_count(len(body.outline), call.svc.settings.max_sections)
    job = call.svc.revisions.replace_outline(job.tenant, job.external_id, outline_items(body.outline))
    call.svc.events.publish(job.external_id, "outline", {"sections": [
        {"index": i, "title": entry.title, "brief": entry.brief} for i, entry in enumerate(body.outline)]})
    return job_document(call.svc.jobs, job)


@route("/jobs/{external_id}/approve", "POST")
def approve_outline(call: ApiCall, external_id: str) -> Response:
    return control(call, external_id, "approve")


@route(f"{_SECTION}/regenerate", "POST")
def regenerate_section(call: ApiCall, external_id: str, index: str) -> Response:
    from .models import RegenerateIn, parse_body

    idx = _index(index)
    call.job(external_id)
    raw = call.request.raw_body or b""
    body = parse_body(RegenerateIn, call.json_body() if raw.strip() else {}, "regeneration")
    revisions = call.svc.revisions

    def mark(conn, job) -> None:
        revisions.mark_for_rewrite(conn, job, idx, instructions=body.instructions, brief=body.brief,
                                   cascade=body.cascade)

    answer = call.idempotent(call.tenant(), lambda: as_answer(control(call, external_id, "regenerate", along=mark)))
    return Response(body=answer.body, status_code=answer.status, headers=replayed(answer))


@route(_SECTION, "PUT")
def edit_section(call: ApiCall, external_id: str, index: str) -> Response:
    from .models import EditSectionIn, parse_body

    idx = _index(index)
    who = call.caller()
    job = call.job(external_id)
    body = parse_body(EditSectionIn, call.json_body(), "edit")
    version = call.svc.versions.write_by_hand(who.tenant, job.external_id, idx, body.content,
                                              if_match=call.request.headers.get("if-match"),
                                              made_with={"key": who.key_ref})
    return _version_answer(call, job.external_id, version, status=200)


@route(f"{_SECTION}/lock", "POST")
def lock_section(call: ApiCall, external_id: str, index: str) -> dict:
    return _set_lock(call, external_id, index, locked=True)


@route(f"{_SECTION}/unlock", "POST")
def unlock_section(call: ApiCall, external_id: str, index: str) -> dict:
    return _set_lock(call, external_id, index, locked=False)


def _set_lock(call: ApiCall, external_id: str, index: str, *, locked: bool) -> dict:
    idx = _index(index)
    job = call.job(external_id)
    row = call.svc.revisions.set_lock(job.tenant, job.external_id, idx, locked)
    return {"index": row["idx"], "locked": row["locked"], "version": row["current_version"]}


@route(f"{_SECTION}/versions", "GET")
def list_versions(call: ApiCall, external_id: str, index: str) -> dict:
    idx = _index(index)
    job = call.job(external_id)
    current = _current_version(call, job, idx)
    return {"index": idx, "current": current,
            "versions": [v.public(current) for v in call.svc.versions.versions(job.id, idx)]}


@route(f"{_SECTION}/versions/{{version}}", "GET")
def get_version(call: ApiCall, external_id: str, index: str, version: str) -> Response:
    idx, number = _index(index), _version_number(version)
    job = call.job(external_id)
    current = _current_version(call, job, idx)
    found = call.svc.versions.version(job.id, idx, number)
    body = {**found.public(current), "content": call.svc.versions.content(found)}
    return Response(body=body, status_code=200, headers={"ETag": etag(found.version)})


@route(f"{_SECTION}/versions/{{version}}/restore", "POST")
def restore_version(call: ApiCall, external_id: str, index: str, version: str) -> Response:
    idx, number = _index(index), _version_number(version)
    job = call.job(external_id)
    restored = call.svc.versions.restore(job.tenant, job.external_id, idx, number,
                                         if_match=call.request.headers.get("if-match"))
    return _version_answer(call, job.external_id, restored, status=201)


@route("/jobs/{external_id}/fork", "POST")
def fork_job(call: ApiCall, external_id: str) -> Response:
    from .models import ForkIn, check_section_count, outline_items, parse_body

    source = call.job(external_id)
    body = parse_body(ForkIn, call.json_body(), "fork")
    if body.outline is not None:
        check_section_count(body.from_section + len(body.outline), call.svc.settings.max_sections)

    def create() -> Answer:
        fork = call.svc.revisions.fork(source, body.from_section,
                                       outline_items(body.outline) if body.outline is not None else None)
        call.svc.events.publish(fork.external_id, "status", {"status": fork.status.value})
        return Answer(201, job_document(call.svc.jobs, fork))

    answer = call.idempotent(source.tenant, create)  # a retried fork makes one job, as a retried create does
    return Response(body=answer.body, status_code=answer.status,
                    headers={"Location": f"/jobs/{answer.body['externalId']}", **replayed(answer)})


def _version_answer(call: ApiCall, external_id: str, version: SectionVersion, *, status: int) -> Response:
    return Response(body=version.public(version.version), status_code=status,
                    headers={"ETag": etag(version.version),
                             "Location": f"/jobs/{external_id}/sections/{version.idx}/versions/{version.version}"})


def _current_version(call: ApiCall, job, idx: int) -> int | None:
    sections = {s.idx: s for s in call.svc.jobs.sections(job.id)}
    if idx not in sections:
        raise NotFound(f"Job {job.external_id} has no section {idx} (it has {len(sections)}).")
    return sections[idx].current_version


def _index(raw: str) -> int:
    if not is_whole_number(raw, MAX_SECTION_INDEX):
        raise BadRequest(f"The section index must be a whole number from 0, got {raw[:40]!r}.")
    return int(raw)


def _version_number(raw: str) -> int:
    if not is_whole_number(raw, 1_000_000) or int(raw) < 1:
        raise BadRequest(f"The version must be a whole number from 1, got {raw[:40]!r}.")
    return int(raw)

