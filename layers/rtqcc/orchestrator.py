"""The ManuscriptOrchestrator: one job, under one lease, from outline to assembled manuscript.

Order of writes for a section: content to S3, then the row marked done (fenced by the lease).
A crash between the two leaves the row pending and the section is written again, to the same
key, by whoever takes the job next: never lost, never counted twice."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from typing import Callable

from .abort import AbortSignal
from .blobs import BlobStore, manuscript_key, section_key
from .errors import ProviderError
from .events import EventLog
from .failpoints import DISABLED, Failpoints
from .jobs import Attempt, Job, JobStore, Lease, Section
from .prompts import DEFAULT_SECTION_COUNT, outline_request, parse_outline, section_request
from .providers.base import GenerationRequest, GenerationResult, Provider
from .status import JobStatus, SectionStatus
from .text import strip_unstorable
from .tokens import count_tokens


class StreamCut(Exception):
    """The provider's stream ended without a finish reason and nobody asked it to stop."""


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended. `stopped_by` is the abort reason (pause, cancel, budget, lease_lost, ...)
    when the run was interrupted, else None."""

    status: JobStatus | None   # the state the run moved the job to, if it moved it
    stopped_by: str | None
    sections_written: int


class DeltaBuffer:
    """Coalesces token deltas into one `section.delta` event per flush interval."""

    def __init__(self, publish: Callable[[str], None], flush_interval_s: float, clock=time.monotonic):
        self._publish = publish
        self._interval = flush_interval_s
        self._clock = clock
        self._pending: list[str] = []
        self._last_flush = 0.0

    def add(self, text: str) -> None:
        self._pending.append(strip_unstorable(text))
        if self._clock() - self._last_flush >= self._interval:
            self.flush()

    def flush(self) -> None:
        if self._pending:
            text, self._pending = "".join(self._pending), []
            self._publish(text)
        self._last_flush = self._clock()


class ManuscriptOrchestrator:
    def __init__(self, *, jobs: JobStore, blobs: BlobStore, events: EventLog, provider: Provider,
                 delta_flush_ms: int = 50, failpoints: Failpoints = DISABLED):
        self.jobs = jobs
        self.blobs = blobs
        self.events = events
        self.provider = provider
        self.delta_flush_s = delta_flush_ms / 1000
        self.failpoints = failpoints

    def run(self, job: Job, lease: Lease, abort: AbortSignal) -> RunOutcome:
        ext = job.external_id
        self.events.publish(ext, "status", {"status": JobStatus.RUNNING.value})
        sections = self.jobs.sections(job.id)
        if not sections:
            if not self._write_outline(job, lease, abort):
                return RunOutcome(status=None, stopped_by=abort.reason, sections_written=0)
            sections = self.jobs.sections(job.id)

        texts: dict[int, str] = {}
        written = 0
        for section in sections:
            if section.status == SectionStatus.DONE:
                continue
            if abort.aborted:
                return RunOutcome(status=None, stopped_by=abort.reason, sections_written=written)
            previous = self._text_of(sections, section.idx - 1, texts) if section.idx > 0 else ""
            text = self._write_section(job, lease, sections, section, previous, abort)
            if text is None:
                return RunOutcome(status=None, stopped_by=abort.reason, sections_written=written)
            texts[section.idx] = text
            written += 1

        key = manuscript_key(ext)
        body = assemble(job.title, [(s.title, self._text_of(sections, s.idx, texts)) for s in sections])
        self.blobs.put(key, body.encode("utf-8"))
        if not self.jobs.finish(lease, JobStatus.COMPLETED, manuscript_key=key):
            # Paused or cancelled after the last section: the control handler owns that story.
            return RunOutcome(status=None, stopped_by=abort.reason or "control", sections_written=written)
        self.events.publish_many(ext, [
            ("status", {"status": JobStatus.COMPLETED.value}),
            ("done", {"status": JobStatus.COMPLETED.value}),
        ])
        return RunOutcome(status=JobStatus.COMPLETED, stopped_by=None, sections_written=written)

    def fail(self, job: Job, lease: Lease, reason: str) -> bool:
        if not self.jobs.finish(lease, JobStatus.FAILED, error=reason):
            return False
        self.events.publish_many(job.external_id, [
            ("status", {"status": JobStatus.FAILED.value, "error": reason}),
            ("done", {"status": JobStatus.FAILED.value, "error": reason}),
        ])
        return True

    # ---- steps ------------------------------------------------------------------------------

    def _write_outline(self, job: Job, lease: Lease, abort: AbortSignal) -> bool:
        request = outline_request(job)
        result = self.provider.stream(request, abort, lambda _delta: None)
        self._record(job, None, request, result)
        if result.aborted:
            return False
        if result.finish_reason is None:
            raise StreamCut(f"Job {job.external_id}: the outline stream ended early")
        outline = parse_outline(result.text, job.section_count or DEFAULT_SECTION_COUNT)
        self.jobs.save_outline(lease, outline)
        self.events.publish(job.external_id, "outline", {
            "sections": [{"index": i, "title": item.title, "brief": item.brief} for i, item in enumerate(outline)]
        })
        return True

    def _write_section(self, job: Job, lease: Lease, sections: list[Section], section: Section,
                       previous: str, abort: AbortSignal) -> str | None:
        ext = job.external_id
        self.jobs.mark_section_running(lease, section.idx)
        self.events.publish(ext, "section.started", {
            "index": section.idx, "title": section.title, "resumed_chars": len(section.partial_text),
        })
        deltas = DeltaBuffer(
            lambda text: self.events.publish(ext, "section.delta", {"index": section.idx, "text": text}),
            self.delta_flush_s,
        )
        request = section_request(job, sections, section, previous)

        def on_delta(text: str) -> None:
            deltas.add(text)
            self.failpoints.hit("mid_token")

        try:
            result = self.provider.stream(request, abort, on_delta)
        finally:
            deltas.flush()
        self._record(job, section.idx, request, result)
        text = section.partial_text + strip_unstorable(result.text)
        if result.finish_reason is None:
            # Keep every token paid for: the next run continues after this text.
            self.jobs.save_partial(lease, section.idx, text)
            if result.aborted:
                return None
            raise StreamCut(f"Job {ext}: section {section.idx} stream ended without a finish reason")

        body = text.encode("utf-8")
        key = section_key(ext, section.idx)
        self.blobs.put(key, body)
        self.failpoints.hit("after_s3_put")
        self.jobs.mark_section_done(lease, section.idx, key=key, sha256=hashlib.sha256(body).hexdigest(),
                                    chars=len(text))
        self.failpoints.hit("after_commit")
        usage = self.jobs.usage_by_section(job.id)
        self.events.publish_many(ext, [
            ("section.completed", {"index": section.idx, "chars": len(text),
                                   "usage": public_usage(usage.get(section.idx))}),
            ("usage", public_job_usage(usage)),
        ])
        return text

    def _record(self, job: Job, idx: int | None, request: GenerationRequest, result: GenerationResult) -> None:
        self.jobs.record_attempt(job.id, Attempt(
            section_idx=idx,
            model=request.model,
            reported_prompt_tokens=result.reported_prompt_tokens,
            reported_completion_tokens=result.reported_completion_tokens,
            counted_prompt_tokens=count_tokens(request.system) + count_tokens(request.prompt + request.prefix),
            counted_completion_tokens=count_tokens(result.text),
            finish_reason=result.finish_reason,
            aborted=result.aborted,
        ))

    def _text_of(self, sections: list[Section], idx: int, texts: dict[int, str]) -> str:
        if idx not in texts:
            key = sections[idx].content_key
            texts[idx] = self.blobs.get(key).decode("utf-8") if key else ""
        return texts[idx]


def assemble(title: str, sections: list[tuple[str, str]]) -> str:
    parts = [f"# {title}\n"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    return "\n".join(parts)


def public_usage(row: dict | None) -> dict:
    """Billed usage of one section or step, in the API's shape."""
    if not row:
        return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "estimated": False, "attempts": 0}
    return {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "estimated": bool(row["estimated"]),
        "attempts": row["attempts"],
        "reported": {"prompt_tokens": row["reported_prompt_tokens"],
                     "completion_tokens": row["reported_completion_tokens"]},
        "counted": {"prompt_tokens": row["counted_prompt_tokens"],
                    "completion_tokens": row["counted_completion_tokens"]},
    }


def public_job_usage(by_section: dict[int | None, dict]) -> dict:
    prompt = sum(row["prompt_tokens"] for row in by_section.values())
    completion = sum(row["completion_tokens"] for row in by_section.values())
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": any(row["estimated"] for row in by_section.values()),
    }


__all__ = ["ManuscriptOrchestrator", "RunOutcome", "StreamCut", "ProviderError", "assemble"]
