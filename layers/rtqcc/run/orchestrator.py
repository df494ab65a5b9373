"""The ManuscriptOrchestrator: one job, under one lease, from outline to assembled manuscript.

Order of writes for a section: content to S3, then the row marked done (fenced by the lease).
A crash between the two leaves the row pending and the section is written again, to the same
key, by whoever takes the job next: never lost, never counted twice."""

from __future__ import annotations

import hashlib
import threading
import time
from dataclasses import dataclass, replace
from typing import Callable, Mapping

from ..writing.abort import AbortSignal, StopReason
from ..store.blobs import BlobStore, manuscript_key, section_key
from ..writing.budget import BudgetMeter, job_limit
from ..errors import ProviderError, StreamCut
from .failures import PublicFailure
from ..bus.events import EventLog
from .failpoints import DISABLED, Failpoints
from ..store.jobs import DEFAULT_SECTION_COUNT, Attempt, Job, JobStore, Lease, Section
from ..writing.pricing import DEFAULT_PRICES, Price, cost_usd, price_for
from ..writing.prompts import outline_request, parse_outline, section_request
from ..writing.quotas import QuotaStore
from ..writing.providers.base import (CallUsage, GenerationRequest, GenerationResult, Provider, ProviderRefused,
                             chat_messages)
from ..status import JobStatus, SectionStatus
from ..text import strip_unstorable
from ..writing.tokens import count_chat_tokens, count_tokens
from ..store.usage import money, public_job_usage, public_usage


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: `stopped_by` says why, when the run was interrupted."""

    status: JobStatus | None   # the state the run moved the job to, if it moved it
    stopped_by: StopReason | None
    sections_written: int


class DeltaBuffer:
    """Coalesces token deltas into at most one `section.delta` event per flush interval, and
    publishes pending text once the interval has passed even when no token follows: a provider
    that stalls must not hold back what it already sent. `add` runs on the consumer's thread (the
    provider's on_delta), a timer thread of the buffer's own flushes on time, and one lock keeps
    the events in order. `close` publishes what is left and stops the timer."""

    def __init__(self, publish: Callable[[str], None], flush_interval_s: float, clock=time.monotonic):
        self._publish = publish
        self._interval = flush_interval_s
        self._clock = clock
        self._pending: list[str] = []
        self._last_flush = 0.0
        self._lock = threading.Condition()
        self._closed = False
        self._timer: threading.Thread | None = None

    def add(self, text: str) -> None:
        with self._lock:
            self._pending.append(strip_unstorable(text))
            if self._clock() - self._last_flush >= self._interval:
                self._flush()
            elif self._timer is None:  # started by the first text held back (never with no interval)
                self._timer = threading.Thread(target=self._flush_on_time, name="delta-flush", daemon=True)
                self._timer.start()
            elif len(self._pending) == 1:
                self._lock.notify()  # the timer sleeps until there is text to flush

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._lock.notify()
            timer = self._timer
        if timer is not None:
            timer.join()
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        """Publish the pending text; the caller holds the lock."""
        if self._pending:
            self._publish("".join(self._pending))
            self._pending = []  # only once published: text whose publish failed waits for the next flush
        self._last_flush = self._clock()

    def _flush_on_time(self) -> None:
        with self._lock:
            while not self._closed:
                due_in_s = self._last_flush + self._interval - self._clock()
                if not self._pending or due_in_s > 0:
                    self._lock.wait(due_in_s if self._pending else None)
                    continue
                try:
                    self._flush()
                except Exception:
                    # Redis away: the consumer's thread publishes at its next add or close, and
                    # meets the error where the run can handle it.
                    return


class ManuscriptOrchestrator:
    def __init__(self, *, jobs: JobStore, blobs: BlobStore, events: EventLog, provider: Provider,
                 delta_flush_ms: int = 50, failpoints: Failpoints = DISABLED,
                 prices: Mapping[str, Price] = DEFAULT_PRICES, quotas: QuotaStore | None = None):
        self.jobs = jobs
        self.quotas = quotas  # the tenant's daily quotas, enforced live (None: none)
        self.blobs = blobs
        self.events = events
        self.provider = provider
        self.delta_flush_s = delta_flush_ms / 1000
        self.failpoints = failpoints
        self.prices = prices

    def run(self, job: Job, lease: Lease, abort: AbortSignal) -> RunOutcome:
        ext = job.external_id
        self.events.publish(ext, "status", {"status": JobStatus.RUNNING.value})
        sections = self.jobs.sections(job.id)
        if not sections:
            if not self._write_outline(job, lease, abort):
                return self._stopped(job, lease, abort, 0)
            sections = self.jobs.sections(job.id)
        else:
            self._announce_last_done(job, sections)

        texts: dict[int, str] = {}
        written = 0
        for section in sections:
            if section.status == SectionStatus.DONE:
                continue
            if abort.aborted:
                return self._stopped(job, lease, abort, written)
            previous = self._text_of(sections, section.idx - 1, texts) if section.idx > 0 else ""
            text = self._write_section(job, lease, sections, section, previous, abort)
            if text is None:
                return self._stopped(job, lease, abort, written)
            texts[section.idx] = text
            written += 1

        key = manuscript_key(ext)
        body = assemble(job.title, [(s.title, self._text_of(sections, s.idx, texts)) for s in sections])
        self.blobs.put(key, body.encode("utf-8"))
        if not self.jobs.finish(lease, JobStatus.COMPLETED, manuscript_key=key):
            # Paused or cancelled after the last section: the control handler owns that story.
            return RunOutcome(status=None, stopped_by=abort.reason or StopReason.STATE_CHANGED,
                              sections_written=written)
        self.events.publish_many(ext, [
            ("status", {"status": JobStatus.COMPLETED.value}),
            ("done", {"status": JobStatus.COMPLETED.value}),
        ])
        return RunOutcome(status=JobStatus.COMPLETED, stopped_by=None, sections_written=written)

    def _stopped(self, job: Job, lease: Lease, abort: AbortSignal, written: int) -> RunOutcome:
        reason = abort.reason
        if reason is None or not reason.pauses_the_job_itself:
            return RunOutcome(status=None, stopped_by=reason, sections_written=written)
        # Our own stop: pause the job (fenced: only if it is still running under our lease).
        if not self.jobs.finish(lease, JobStatus.PAUSED, reason=reason):
            return RunOutcome(status=None, stopped_by=reason, sections_written=written)
        tokens, cost = self.jobs.spent(job.id)
        paused = {"status": JobStatus.PAUSED.value, "reason": reason, "budget": job.budget,
                  "spent": {"total_tokens": tokens, "cost_usd": money(cost)}}
        if reason == StopReason.QUOTA_EXCEEDED and self.quotas is not None:
            paused["quota"] = self.quotas.standing(job.tenant, count_active=False).public()
        self.events.publish(job.external_id, "status", paused)
        return RunOutcome(status=JobStatus.PAUSED, stopped_by=reason, sections_written=written)

    def _announce_last_done(self, job: Job, sections: list[Section]) -> None:
        """A run that died between marking a section done and announcing it left watchers
        without its `section.completed`. Only the last done section can be in that state (they
        are written in order), so a resumed run announces it again; watchers take it as a no-op."""
        done = [s for s in sections if s.status == SectionStatus.DONE]
        if done:
            usage = self.jobs.usage_by_section(job.id)
            self.events.publish(job.external_id, "section.completed", {
                "index": done[-1].idx, "chars": done[-1].content_chars, "usage": public_usage(usage.get(done[-1].idx))})

    def fail(self, job: Job, lease: Lease, failure: PublicFailure) -> bool:
        if not self.jobs.finish(lease, JobStatus.FAILED, error=failure.message, reason=failure.code):
            return False
        data = {"status": JobStatus.FAILED.value, "error": failure.message, "code": failure.code}
        self.events.publish_many(job.external_id, [("status", data), ("done", data)])
        return True

    # ---- steps ------------------------------------------------------------------------------

    def _write_outline(self, job: Job, lease: Lease, abort: AbortSignal) -> bool:
        request = outline_request(job)
        meter = self._meter(job, request, abort)
        if abort.aborted:
            return False
        result = self._generate(job, None, request, abort, lambda _delta: None, meter)
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
        request = section_request(job, sections, section, previous)
        meter = self._meter(job, request, abort)
        if abort.aborted:
            return None
        self.jobs.mark_section_running(lease, section.idx)
        self.events.publish(ext, "section.started", {
            "index": section.idx, "title": section.title, "resumed_chars": len(section.partial_text),
        })
        deltas = DeltaBuffer(
            lambda text: self.events.publish(ext, "section.delta", {"index": section.idx, "text": text}),
            self.delta_flush_s,
        )

        def on_delta(text: str) -> None:
            deltas.add(text)
            self.failpoints.hit("mid_token")

        try:
            result = self._generate(job, section.idx, request, abort, on_delta, meter)
        except ProviderRefused as exc:
            if exc.partial is not None and exc.partial.text:  # paid for: keep it for a retry of the job
                self.jobs.save_partial(lease, section.idx, section.partial_text + strip_unstorable(exc.partial.text))
            raise
        finally:
            deltas.close()
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

    def _meter(self, job: Job, request: GenerationRequest, abort: AbortSignal) -> BudgetMeter | None:
        """The job's budget and its tenant's daily quota for this call (None without either).
        Raises the limit's reason (`budget_exceeded`, `quota_exceeded`) on the abort signal,
        instead of calling, when the call would pass it with its first token."""
        limits = []
        if job.budget:
            tokens, cost = self.jobs.spent(job.id)
            limits.append(job_limit(job.budget, spent_tokens=tokens, spent_cost_usd=cost))
        if self.quotas is not None:  # one query per call: the tenant's spend today
            daily = self.quotas.standing(job.tenant, measure=False, count_active=False).daily_limit()
            if daily is not None:
                limits.append(daily)
        meter = BudgetMeter(limits, price=price_for(request.model, self.prices), model=request.model)
        if not meter.limited:
            return None
        # A chat provider's prompt, framing included: what a provider that counts calls records.
        if reason := meter.start_call(count_chat_tokens(chat_messages(request, request.prefix), request.model)):
            abort.abort(reason)
        return meter

    def _generate(self, job: Job, idx: int | None, request: GenerationRequest, abort: AbortSignal,
                  on_delta: Callable[[str], None], meter: BudgetMeter | None) -> GenerationResult:
        """One answer from the provider, metered against the budget, every call it made recorded."""
        def metered(text: str) -> None:
            on_delta(text)
            if reason := meter.add_output(count_tokens(text, request.model)):
                abort.abort(reason)  # the next token would pass a limit: stop the stream now

        try:
            result = self.provider.stream(request, abort, metered if meter is not None else on_delta)
        except ProviderRefused as exc:
            if exc.partial is not None:
                self._record(job, idx, request, exc.partial)
            raise
        self._record(job, idx, request, result)
        return result

    def _record(self, job: Job, idx: int | None, request: GenerationRequest, result: GenerationResult) -> None:
        """One generation_attempts row per HTTP call the provider made (each was paid for)."""
        calls = result.calls or [CallUsage(
            reported_prompt_tokens=result.reported_prompt_tokens,
            reported_completion_tokens=result.reported_completion_tokens,
            counted_prompt_tokens=_prompt_tokens(request),
            counted_completion_tokens=count_tokens(result.text, request.model),
            finish_reason=result.finish_reason,
            aborted=result.aborted,
        )]
        for call in calls:
            attempt = Attempt(
                section_idx=idx,
                model=request.model,
                reported_prompt_tokens=call.reported_prompt_tokens,
                reported_completion_tokens=call.reported_completion_tokens,
                counted_prompt_tokens=call.counted_prompt_tokens,
                counted_completion_tokens=call.counted_completion_tokens,
                finish_reason=call.finish_reason,
                aborted=call.aborted,
            )
            cost = cost_usd(request.model, attempt.billed_prompt_tokens, attempt.billed_completion_tokens, self.prices)
            self.jobs.record_attempt(job.id, replace(attempt, cost_usd=cost))

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


def _prompt_tokens(request: GenerationRequest) -> int:
    """Our count of a request's prompt when the provider does not count its calls itself."""
    return count_tokens(request.system, request.model) + count_tokens(request.prompt + request.prefix, request.model)


__all__ = ["ManuscriptOrchestrator", "RunOutcome", "StreamCut", "ProviderError", "assemble"]
