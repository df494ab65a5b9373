"""The public JSON shape of a job, shared by `GET /jobs/{id}` and the SSE snapshot."""

from __future__ import annotations

from .jobs import DEFAULT_SECTION_COUNT, Job, JobStore
from .usage import money, public_job_usage, public_usage
from ..status import SectionStatus


def job_links(external_id: str) -> dict[str, str]:
    base = f"/jobs/{external_id}"
    return {
        "self": base,
        "start": f"{base}/start",
        "pause": f"{base}/pause",
        "resume": f"{base}/resume",
        "cancel": f"{base}/cancel",
        "retry": f"{base}/retry",
        "stream": f"{base}/stream",
        "manuscript": f"{base}/manuscript",
    }


def job_summary(job: Job) -> dict:
    return {
        "externalId": job.external_id,
        "title": job.title,
        "status": job.status.value,
        "model": job.model,
        "links": job_links(job.external_id),
    }


def job_list_item(job: Job, figures: dict | None) -> dict:
    """A job as `GET /jobs` lists it: enough for a dashboard row (progress, tokens, cost, and
    why it stopped), without each section's detail."""
    figures = figures or {}
    item = {
        **job_summary(job),
        "progress": {"sections_total": figures.get("sections_total") or job.section_count or DEFAULT_SECTION_COUNT,
                     "sections_done": figures.get("sections_done", 0)},
        "usage": {"total_tokens": int(figures.get("total_tokens", 0)),
                  "cost_usd": money(figures.get("cost_usd", 0.0))},
    }
    if job.status_reason:
        item["status_reason"] = job.status_reason
    if job.error:
        item["error"] = job.error
    return item


def job_document(jobs: JobStore, job: Job) -> dict:
    sections = jobs.sections(job.id)
    usage = jobs.usage_by_section(job.id)
    document = {
        **job_summary(job),
        "priority": job.priority.value,
        "brief": job.brief,
        "metadata": job.metadata,
        "progress": {
            "sections_total": len(sections) or job.section_count or DEFAULT_SECTION_COUNT,
            "sections_done": sum(1 for s in sections if s.status == SectionStatus.DONE),
        },
        "sections": [
            {
                "index": s.idx,
                "title": s.title,
                "status": s.status.value,
                "version": s.current_version,
                "locked": s.locked,
                "usage": public_usage(usage.get(s.idx)),
            }
            for s in sections
        ],
        "usage": public_job_usage(usage),
    }
    if job.revision:
        document["revision"] = job.revision
    if job.options.get("forked_from"):
        document["forked_from"] = job.options["forked_from"]
    if job.status_reason:
        document["status_reason"] = job.status_reason
    if job.error:
        document["error"] = job.error
    return document
