"""The ManuscriptOrchestrator: one job, under one lease, from outline to assembled manuscript.

Order of writes for a section: content to S3, then the row marked done (fenced by the lease).
A crash between the two leaves the row pending and the section is written again, to the same
key, by whoever takes the job next: never lost, never counted twice.

A run keeps what it knows in memory (the sections, their texts, the usage and the spend so far),
so a finished section costs one S3 PUT, one Postgres statement (its calls, its row, the next
section marked running) and one script call of events (its last deltas, its completion, the job's
usage, the next section's start), besides the deltas flushed while it streams."""

from __future__ import annotations

import contextvars
import hashlib
import threading
from dataclasses import dataclass, field, replace
from typing import Callable, Mapping

from .. import tracing
from ..writing.abort import AbortSignal, StopReason
from ..store.blobs import BlobStore, manuscript_key, section_key
from ..store.manuscripts import assemble
from ..writing.budget import BudgetMeter, job_limit
from ..errors import ProviderError, StreamCut
from .failures import PublicFailure
from ..bus.events import EventLog
from .busy import UNLIMITED, BusyRuns
from .deltas import DeltaFlusher
from .failpoints import DISABLED, Failpoints
from ..store.attempts import billed_total
from ..store.db import Row
from ..store.jobs import DEFAULT_SECTION_COUNT, Attempt, Job, JobStore, Lease, Section
from ..writing.pricing import DEFAULT_PRICES, Price, cost_usd, price_for
from ..writing.prompts import (continuation_request, outline_request, parallel_width, parse_outline, section_request,
                               summary_request, words_in)
from ..writing.quotas import QuotaStore, Standing
from ..writing.provider_waits import ProviderWaitBoard
from ..writing.providers.base import (CallUsage, GenerationRequest, GenerationResult, Provider, ProviderRefused,
                             chat_messages)
from ..status import JobStatus, SectionStatus
from ..text import strip_unstorable
from ..writing.tokens import count_chat_tokens, count_tokens
from ..store.usage import money, public_job_usage, public_usage


MAX_CONTINUATIONS = 3  # calls after the first, for a section that ends well short of its target_words
CONTINUE_BELOW = 0.8    # "well short": under this share of the target
PARAGRAPH = "\n\n"


@dataclass(frozen=True)
class RunOutcome:
    """How a run ended: `stopped_by` says why, when the run was interrupted."""

    status: JobStatus | None   # the state the run moved the job to, if it moved it
    stopped_by: StopReason | None
    sections_written: int


class ManuscriptOrchestrator:
    def __init__(self, *, jobs: JobStore, blobs: BlobStore, events: EventLog, provider: Provider,
                 delta_flush_ms: int = 50, failpoints: Failpoints = DISABLED,
                 prices: Mapping[str, Price] = DEFAULT_PRICES, quotas: QuotaStore | None = None,
                 busy: BusyRuns = UNLIMITED,
                 waits: ProviderWaitBoard | None = None):
        self.jobs = jobs
        self.waits = waits  # where calls held back before they go out are shown (None: nowhere)
        self.busy = busy  # a run gives its turn back while it waits on a stream
        self.quotas = quotas  # the tenant's daily quotas, enforced live (None: none)
        self.blobs = blobs
        self.events = events
        self.provider = provider
        self.deltas = DeltaFlusher(events, delta_flush_ms / 1000)
        self.failpoints = failpoints
        self.prices = prices

    def run(self, job: Job, lease: Lease, abort: AbortSignal) -> RunOutcome:
        ext = job.external_id
        running = {"status": JobStatus.RUNNING.value}
        if job.revision:
            running["revision"] = job.revision
        run = JobRun(job, lease, abort, sections=self.jobs.sections(job.id), opening=[("status", running)])
        if not lease.first_run:  # a job's first run has no calls to sum and no section to announce again
            if run.sections:
                run.usage = self.jobs.usage_by_section(job.id)
                run.opening += self._announced_again(run)
            if job.budget:
                run.spent_tokens, run.spent_cost = self.jobs.spent(job.id)
        if not run.sections:
            self._open(run)
            if not self._write_outline(run):
                return self._stopped(run)
            run.sections = self.jobs.sections(job.id)
        if job.awaits_outline_review:  # drafted now, or before a crash that came ahead of the stop
            self._open(run)
            return self._await_review(run)

        pending = [section for section in run.sections if section.status != SectionStatus.DONE]
        # A job written in parallel stays so to its last section, even when a resumed run has one
        # left: its prompt names its neighbours, as the first run's would have.
        if parallel_width(job) > 1 and pending:
            self._open(run)
            self._write_in_parallel(run, pending, min(parallel_width(job), len(pending)))
            if abort.aborted or run.written < len(pending):
                return self._stopped(run)
            pending = []
        if job.context == "summary":  # its first section may wait on a summary written first
            self._open(run)
        upcoming = self._prepare(run, pending[0]) if pending else None
        if upcoming is not None:  # later sections are marked running by the statement that ends the one before
            self.jobs.mark_section_running(lease, upcoming.section.idx)
            self._open(run, upcoming.started_event())
        else:
            self._open(run)
        for position in range(len(pending)):
            if upcoming is None or abort.aborted:
                return self._stopped(run)
            current = upcoming
            text = self._write_section(run, current)
            if text is None:
                return self._stopped(run)
            following = pending[position + 1] if position + 1 < len(pending) else None
            upcoming = (self._prepare(run, following, previous_text=text, unrecorded=current.attempts)
                        if following is not None else None)
            self._complete_section(run, current, text, upcoming)

        # A revised job's manuscript goes under a key of its own, so the one it had stays whole until then.
        revision = job.manuscript_revision + 1 if job.manuscript_key else 0
        key = manuscript_key(ext, revision)
        body = assemble(job.title, [(s.title, self._text_of(run, s.idx)) for s in run.sections])
        # Stored only while the job still runs under our lease: a revision cancelled meanwhile has
        # put its sections back and assembled them under this same key, and must keep it.
        if not self.jobs.complete_with_manuscript(lease, manuscript_key=key, manuscript_revision=revision,
                                                  store_manuscript=lambda: self.blobs.put(key, body.encode("utf-8"))):
            # Paused or cancelled after the last section: the control handler owns that story.
            return RunOutcome(status=None, stopped_by=abort.reason or StopReason.STATE_CHANGED,
                              sections_written=run.written)
        self.events.publish_many(ext, [
            ("status", {"status": JobStatus.COMPLETED.value}),
            ("done", {"status": JobStatus.COMPLETED.value}),
        ])
        return RunOutcome(status=JobStatus.COMPLETED, stopped_by=None, sections_written=run.written)

    def _open(self, run: "JobRun", *events: tuple[str, dict]) -> None:
        """Publish what opens the run (its status, sections announced again), if not yet, and
        `events` after it, in one round trip: most runs' opening goes with their first section's start."""
        events, run.opening = (*run.opening, *events), []
        if events:
            self.events.publish_many(run.job.external_id, list(events))

    def _stopped(self, run: "JobRun") -> RunOutcome:
        job, reason = run.job, run.abort.reason
        if reason is None or not reason.pauses_the_job_itself:
            return RunOutcome(status=None, stopped_by=reason, sections_written=run.written)
        # Our own stop: pause the job (fenced: only if it is still running under our lease).
        if not self.jobs.finish(run.lease, JobStatus.PAUSED, reason=reason):
            return RunOutcome(status=None, stopped_by=reason, sections_written=run.written)
        tokens, cost = self.jobs.spent(job.id)
        paused = {"status": JobStatus.PAUSED.value, "reason": reason, "budget": job.budget,
                  "spent": {"total_tokens": tokens, "cost_usd": money(cost)}}
        if reason == StopReason.QUOTA_EXCEEDED and self.quotas is not None:
            paused["quota"] = self.quotas.standing(job.tenant, count_active=False).public()
        self.events.publish(job.external_id, "status", paused)
        return RunOutcome(status=JobStatus.PAUSED, stopped_by=reason, sections_written=run.written)

    def _await_review(self, run: "JobRun") -> RunOutcome:
        """The outline is drafted and the job asked to review it: stop until it is approved."""
        if not self.jobs.finish(run.lease, JobStatus.AWAITING_REVIEW):
            return RunOutcome(status=None, stopped_by=run.abort.reason or StopReason.STATE_CHANGED, sections_written=0)
        self.events.publish(run.job.external_id, "status", {"status": JobStatus.AWAITING_REVIEW.value})
        return RunOutcome(status=JobStatus.AWAITING_REVIEW, stopped_by=None, sections_written=0)

    def _announced_again(self, run: "JobRun") -> list[tuple[str, dict]]:
        """A run that died between marking a section done and announcing it left watchers
        without its `section.completed`. Written in order, only the last done section can be in
        that state, so a resumed run announces it again; watchers take it as a no-op."""
        done = [s for s in run.sections if s.status == SectionStatus.DONE]
        # Written at once, any of them may be in that state.
        unannounced = done if parallel_width(run.job) > 1 else done[-1:]
        return [("section.completed", {
            "index": section.idx, "version": section.current_version, "chars": section.content_chars,
            "usage": public_usage(run.usage.get(section.idx))}) for section in unannounced]

    def fail(self, job: Job, lease: Lease, failure: PublicFailure) -> bool:
        if not self.jobs.finish(lease, JobStatus.FAILED, error=failure.message, reason=failure.code):
            return False
        data = {"status": JobStatus.FAILED.value, "error": failure.message, "code": failure.code}
        self.events.publish_many(job.external_id, [("status", data), ("done", data)])
        return True

    # ---- steps ------------------------------------------------------------------------------

    def _write_outline(self, run: "JobRun") -> bool:
        job, abort = run.job, run.abort
        request = outline_request(job)
        meter = self._meter(run, request)
        if abort.aborted:
            return False
        result, attempts = self._generate(run, None, request, lambda _delta: None, meter, purpose="outline")
        self.jobs.record_attempts(job.id, attempts)
        if result.aborted:
            return False
        if result.finish_reason is None:
            raise StreamCut(f"Job {job.external_id}: the outline stream ended early")
        outline = parse_outline(result.text, job.section_count or DEFAULT_SECTION_COUNT)
        self.jobs.save_outline(run.lease, outline)
        run.usage = self.jobs.usage_by_section(job.id)
        self.events.publish(job.external_id, "outline", {
            "sections": [{"index": i, "title": item.title, "brief": item.brief} for i, item in enumerate(outline)]
        })
        return True

    def _prepare(self, run: "JobRun", section: Section, previous_text: str | None = None,
                 unrecorded: list[Attempt] = (), *, in_parallel: bool = False) -> "UpcomingSection | None":
        """The next section's request, checked against the budget and quota: None (the reason
        raised on the abort signal) when its call would pass a limit with its first token.
        `unrecorded`: calls paid for but not yet in Postgres (the section before, not yet completed).
        `in_parallel`: its prompt describes its neighbours instead of quoting the text before it."""
        summary = None
        if in_parallel:
            previous_text = None
        else:
            if previous_text is None:
                previous_text = self._text_of(run, section.idx - 1) if section.idx > 0 else ""
            if run.job.context == "summary" and section.idx > 0:
                summary = self._summary_through(run, section.idx - 1, previous_text)
                if summary is None:
                    return None
        current_text = self._text_of(run, section.idx) if section.rewrite is not None else None
        request = section_request(run.job, run.sections, section, previous_text, current_text=current_text,
                                  summary=summary)
        meter = self._meter(run, request, unrecorded)
        return None if run.abort.aborted else UpcomingSection(section, request, meter)

    def _summary_through(self, run: "JobRun", idx: int, text: str) -> str | None:
        """The running summary of the document through section `idx` (its text `text`): kept from
        an earlier run, else written now from the one before it, its calls recorded as the
        section's `summary` attempts. None when the run is stopped meanwhile."""
        if idx in run.summaries:
            return run.summaries[idx]
        section = run.sections[idx]
        before = run.summaries.get(idx - 1) if idx > 0 else None
        request = summary_request(run.job, section, text, before)
        meter = self._meter(run, request)
        if run.abort.aborted:
            return None
        result, attempts = self._generate(run, idx, request, lambda _delta: None, meter, purpose="summary",
                                          version=section.next_version if section.status != SectionStatus.DONE
                                          else section.current_version)
        self.jobs.record_attempts(run.job.id, attempts)
        if result.finish_reason is None:
            if result.aborted:
                return None
            raise StreamCut(f"Job {run.job.external_id}: the summary through section {idx} ended early")
        summary = strip_unstorable(result.text).strip()
        self.jobs.save_summary(run.lease, idx, summary)
        run.summaries[idx] = summary
        return summary

    def _write_section(self, run: "JobRun", upcoming: "UpcomingSection") -> str | None:
        """Stream one section; its text (its calls kept on `upcoming` for the statement that
        completes it), or None when the run stopped mid-way (the partial text and calls saved)."""
        with tracing.span("section.write", attributes={"rtqcc.job.external_id": run.job.external_id,
                                                       "rtqcc.section.index": upcoming.section.idx,
                                                       "rtqcc.section.version": upcoming.version}):
            return self._stream_section(run, upcoming)

    def _stream_section(self, run: "JobRun", upcoming: "UpcomingSection") -> str | None:
        ext, section, lease, version = run.job.external_id, upcoming.section, run.lease, upcoming.version
        deltas = self.deltas.open(ext, index=section.idx, version=version)

        def on_delta(text: str) -> None:
            deltas.add(text)
            self.failpoints.hit("mid_token")

        text, ended_well = section.partial_text, False
        try:
            request, meter = upcoming.request, upcoming.meter
            for call in range(MAX_CONTINUATIONS + 1):
                result, attempts = self._generate(run, section.idx, request, on_delta, meter, version=version,
                                                  purpose="draft" if call == 0 else "continuation")
                upcoming.attempts += attempts
                text += strip_unstorable(result.text)
                short = (section.target_words or 0) * CONTINUE_BELOW - words_in(text)
                if result.finish_reason is None or short <= 0 or call == MAX_CONTINUATIONS:
                    break
                # Well short of its target: go on after the text so far, each call paid and recorded,
                # from a new paragraph (the model ended its own), which watchers see as the text does.
                if not text[-1:].isspace():
                    text += PARAGRAPH
                    on_delta(PARAGRAPH)
                request = continuation_request(upcoming.request, text, section.target_words - words_in(text))
                meter = self._meter(run, request, upcoming.attempts)
                if run.abort.aborted:
                    result = replace(result, finish_reason=None, aborted=run.abort.reason)
                    break
            ended_well = result.finish_reason is not None
        except ProviderRefused as exc:
            if exc.partial is not None and exc.partial.text:  # paid for: keep it for a retry of the job
                text += strip_unstorable(exc.partial.text)
            self.jobs.record_attempts(run.job.id, upcoming.attempts)  # the calls before the refused one
            if text != section.partial_text:
                self.jobs.save_partial(lease, section.idx, text)
            raise
        finally:
            if not ended_well:  # stopped or failed: what was streamed goes out now
                deltas.close()
        if result.finish_reason is None:
            # Keep every token paid for: the next run continues after this text.
            self.jobs.record_attempts(run.job.id, upcoming.attempts)
            self.jobs.save_partial(lease, section.idx, text)
            if result.aborted:
                return None
            raise StreamCut(f"Job {ext}: section {section.idx} stream ended without a finish reason")
        upcoming.unpublished = deltas.detach()
        return text

    def _write_in_parallel(self, run: "JobRun", pending: list[Section], width: int) -> None:
        """Write `pending` sections `width` at once, each as a sequential run writes one (its own
        deltas, S3 then its fenced row, its events), until all are done or the run is stopped:
        a pause or cancel stops every stream, each keeping its partial text. A worker that fails
        stops taking sections; the first error is raised once every section in flight has ended."""
        queue = iter(pending)
        taking = threading.Lock()
        errors: list[BaseException] = []

        def work() -> None:
            with self.busy.busy():  # a turn of the consumer's, as a run has
                while not run.abort.aborted and not errors:
                    with taking:
                        section = next(queue, None)
                    if section is None:
                        return
                    try:
                        upcoming = self._prepare(run, section, in_parallel=True)
                        if upcoming is None:
                            return
                        self.jobs.mark_section_running(run.lease, section.idx)
                        self.events.publish(run.job.external_id, *upcoming.started_event())
                        text = self._write_section(run, upcoming)
                        if text is None:
                            return
                        self._complete_section(run, upcoming, text, None)
                    except BaseException as exc:  # raised below, on the run's own thread
                        errors.append(exc)
                        return

        # Each worker in a copy of this thread's context: its spans are children of the run's.
        workers = [threading.Thread(target=contextvars.copy_context().run, args=(work,),
                                    name=f"section-{run.job.external_id}-{n}", daemon=True)
                   for n in range(width)]
        with self.busy.waiting():
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
        if errors:
            raise errors[0]

    def _complete_section(self, run: "JobRun", written: "UpcomingSection", text: str,
                          following: "UpcomingSection | None") -> None:
        ext, section, version = run.job.external_id, written.section, written.version
        body = text.encode("utf-8")
        key = section_key(ext, section.idx, version)
        self.blobs.put(key, body)
        self.failpoints.hit("after_s3_put")
        usage = self.jobs.complete_section(
            run.lease, section.idx, version=version, key=key, sha256=hashlib.sha256(body).hexdigest(),
            chars=len(text), attempts=written.attempts, made_with=written.made_with(),
            start_next=[following.section.idx] if following is not None else [])
        self.failpoints.hit("after_commit")
        with run.lock:  # sections written at once complete on threads of their own
            run.usage[section.idx] = usage
            run.texts[section.idx] = text
            run.written += 1
            job_usage = public_job_usage(run.usage)
        events = [*written.unpublished,
                  ("section.completed", {"index": section.idx, "version": version, "chars": len(text),
                                         "usage": public_usage(usage)}),
                  ("usage", job_usage)]
        if following is not None:
            events.append(following.started_event())
        self.events.publish_many(ext, events)

    def _meter(self, run: "JobRun", request: GenerationRequest, unrecorded: list[Attempt] = ()) -> BudgetMeter | None:
        """The job's budget and its tenant's daily quota for this call (None without either).
        Raises the limit's reason (`budget_exceeded`, `quota_exceeded`) on the abort signal,
        instead of calling, when the call would pass it with its first token."""
        job, limits = run.job, []
        if job.budget:
            limits.append(job_limit(job.budget, spent_tokens=run.spent_tokens, spent_cost_usd=run.spent_cost))
        if self.quotas is not None:
            # The tenant's quotas once a run; under a daily one, its spend today (all its jobs') each call.
            if run.quota is None or run.quota.quota.daily:
                run.quota = self.quotas.standing(job.tenant, measure=False, count_active=False)
            daily = run.quota.daily_limit()
            if daily is not None:
                limits.append(daily.plus(*billed_total(unrecorded)))
        meter = BudgetMeter(limits, price=price_for(request.model, self.prices), model=request.model)
        if not meter.limited:
            return None
        # A chat provider's prompt, framing included: what a provider that counts calls records.
        if reason := meter.start_call(count_chat_tokens(chat_messages(request, request.prefix), request.model)):
            run.abort.abort(reason)
        return meter

    def _generate(self, run: "JobRun", idx: int | None, request: GenerationRequest,
                  on_delta: Callable[[str], None], meter: BudgetMeter | None, *, purpose: str,
                  version: int | None = None) -> tuple[GenerationResult, list[Attempt]]:
        """One answer from the provider, metered against the budget, with every call it made
        (each was paid for) as attempts for the caller to record, counted in the run's spend:
        for `purpose` (outline, draft, continuation, summary), of the section's `version`."""
        abort = run.abort

        def metered(text: str) -> None:
            on_delta(text)
            if reason := meter.add_output(count_tokens(text, request.model)):
                abort.abort(reason)  # the next token would pass a limit: stop the stream now

        # The GenAI semantic conventions' client span: "{operation} {model}", tokens as billed.
        with tracing.span(f"chat {request.model}", kind="client", attributes={
                "gen_ai.operation.name": "chat", "gen_ai.provider.name": self.provider.name,
                "gen_ai.request.model": request.model, "rtqcc.purpose": purpose,
                **({"gen_ai.request.max_tokens": request.max_tokens} if request.max_tokens else {}),
                **({"gen_ai.request.temperature": request.temperature} if request.temperature is not None else {}),
                }) as call:
            on_wait = self.waits.reporter(run.job.external_id, idx) if self.waits is not None else None
            try:
                with self.busy.waiting():
                    result = self.provider.stream(request, abort, metered if meter is not None else on_delta, on_wait)
            except ProviderRefused as exc:
                if exc.partial is not None:
                    self.jobs.record_attempts(run.job.id, run.spend(self._attempts(idx, request, exc.partial, purpose, version)))
                raise
            finally:
                if on_wait is not None:
                    on_wait(None)  # a call aborted or failed while it waited waits no more
            attempts = self._attempts(idx, request, result, purpose, version)
            call.set_attributes({
                "gen_ai.usage.input_tokens": sum(a.billed_prompt_tokens for a in attempts),
                "gen_ai.usage.output_tokens": sum(a.billed_completion_tokens for a in attempts),
                "gen_ai.response.finish_reasons": [result.finish_reason or result.aborted or "cut"],
            })
        return result, run.spend(attempts)

    def _attempts(self, idx: int | None, request: GenerationRequest, result: GenerationResult, purpose: str,
                  version: int | None) -> list[Attempt]:
        """One attempt per HTTP call the provider made, priced."""
        calls = result.calls or [CallUsage(
            reported_prompt_tokens=result.reported_prompt_tokens,
            reported_completion_tokens=result.reported_completion_tokens,
            counted_prompt_tokens=_prompt_tokens(request),
            counted_completion_tokens=count_tokens(result.text, request.model),
            finish_reason=result.finish_reason,
            aborted=result.aborted,
        )]
        attempts = []
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
                section_version=version,
                purpose=purpose,
            )
            cost = cost_usd(request.model, attempt.billed_prompt_tokens, attempt.billed_completion_tokens, self.prices)
            attempts.append(replace(attempt, cost_usd=cost))
        return attempts

    def _text_of(self, run: "JobRun", idx: int) -> str:
        if idx not in run.texts:
            key = run.sections[idx].content_key
            run.texts[idx] = self.blobs.get(key).decode("utf-8") if key else ""
        return run.texts[idx]


@dataclass
class UpcomingSection:
    """A section about to be written: its request, its meter, and once written, its calls and
    its last deltas."""

    section: Section
    request: GenerationRequest
    meter: BudgetMeter | None
    attempts: list[Attempt] = field(default_factory=list)
    # Its last deltas, not yet published: they go out first in its completion's events.
    unpublished: list[tuple[str, dict]] = field(default_factory=list)

    @property
    def version(self) -> int:
        return self.section.next_version

    def made_with(self) -> dict:
        """What made this version: the model and its parameters, and for a rewrite, why."""
        request, rewrite = self.request, self.section.rewrite
        made: dict = {"model": request.model, "temperature": request.temperature, "max_tokens": request.max_tokens,
                      "kind": "draft" if rewrite is None else "cascade" if "after" in rewrite else "regeneration"}
        if rewrite and rewrite.get("instructions"):
            made["instructions"] = rewrite["instructions"]
        if rewrite and "after" in rewrite:
            made["after"] = rewrite["after"]
        return {key: value for key, value in made.items() if value is not None}

    def started_event(self) -> tuple[str, dict]:
        return "section.started", {"index": self.section.idx, "version": self.version, "title": self.section.title,
                                   "resumed_chars": len(self.section.partial_text)}


@dataclass
class JobRun:
    """What one run of a job knows, kept in memory for its length instead of asked of Postgres."""

    job: Job
    lease: Lease
    abort: AbortSignal
    sections: list[Section]
    texts: dict[int, str] = field(default_factory=dict)
    usage: dict[int | None, Row] = field(default_factory=dict)  # usage_by_section's rows
    spent_tokens: int = 0              # billed tokens of every call of the job so far (with a budget)
    spent_cost: float | None = 0.0     # their cost; None once a call had no price
    quota: Standing | None = None      # the tenant's quotas, read at the run's first call
    written: int = 0
    opening: list[tuple[str, dict]] = field(default_factory=list)  # events the run opens with, until published
    summaries: dict[int, str] = field(default_factory=dict)  # the running summary through each section
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        # A summary holds for a done section, while its version does (a rewrite or an edit clears
        # it); one saved before its section was stored is written again.
        self.summaries = {s.idx: s.summary for s in self.sections if s.summary and s.status == SectionStatus.DONE}

    def spend(self, attempts: list[Attempt]) -> list[Attempt]:
        tokens, cost = billed_total(attempts)
        with self.lock:
            self.spent_tokens += tokens
            self.spent_cost = None if self.spent_cost is None or cost is None else self.spent_cost + cost
        return attempts


def _prompt_tokens(request: GenerationRequest) -> int:
    """Our count of a request's prompt when the provider does not count its calls itself."""
    return count_tokens(request.system, request.model) + count_tokens(request.prompt + request.prefix, request.model)


__all__ = ["ManuscriptOrchestrator", "RunOutcome", "StreamCut", "ProviderError", "assemble"]
