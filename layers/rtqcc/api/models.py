"""Request bodies, validated strictly: unknown and server-owned fields are refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import ValidationFailed
from ..text import find_unstorable


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, str_strip_whitespace=True)


class OutlineEntryIn(_Strict):
    title: str = Field(min_length=1, max_length=300)
    brief: str = Field(default="", max_length=4000)
    target_words: int | None = Field(default=None, ge=1, le=20_000, description=(
        "The section's length in words: the prompt asks for it, and a section the model ends under 80% of it "
        "is continued (up to 3 more calls, each accounted)."))


class ParamsIn(_Strict):
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens_per_section: int | None = Field(default=None, ge=1, le=32_000)
    parallel_sections: int | None = Field(default=None, ge=1, le=16, description=(
        "Sections written at once once the outline is known (1, the default: in order, each prompt "
        "quoting the end of the section before; more: each prompt describes its neighbours instead)."))


class BudgetIn(_Strict):
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)


class ReviewIn(_Strict):
    outline: bool = Field(default=False, description=(
        "Stop once the outline is drafted (or, for a given outline, at start), in status awaiting_review, until "
        "POST /jobs/{id}/approve; PUT /jobs/{id}/outline may replace it meanwhile."))


WebhookEvent = Literal["job.completed", "job.failed", "job.cancelled", "job.awaiting_review", "section.completed"]
_WEBHOOK_URL = ("Where deliveries are POSTed: https (or http), no credentials in it. Its host must resolve to a "
                "public address when a delivery is sent (private, loopback and link-local ones are refused unless "
                "RTQCC_WEBHOOK_ALLOW_PRIVATE allows them).")


class WebhookIn(_Strict):
    url: str = Field(min_length=1, max_length=2048, description=_WEBHOOK_URL)
    events: list[WebhookEvent] = Field(min_length=1, max_length=10)
    description: str = Field(default="", max_length=500)


class JobWebhookIn(_Strict):
    url: str = Field(min_length=1, max_length=2048, description=_WEBHOOK_URL)
    events: list[WebhookEvent] | None = Field(default=None, min_length=1, max_length=10, description=(
        "Omitted: job.completed, job.failed, job.cancelled and job.awaiting_review"))


class CreateJobIn(_Strict):
    title: str = Field(min_length=1, max_length=300)
    brief: str = Field(min_length=1, max_length=20_000)
    outline: list[OutlineEntryIn] | None = Field(default=None, min_length=1)
    section_count: int | None = Field(default=None, ge=1)
    model: str | None = Field(default=None, min_length=1, max_length=100, description=(
        "A model this deployment allows (RTQCC_ALLOWED_MODELS; by default every priced model and the default "
        "model); another is refused with 422 validation_failed naming the allowed ones. Omitted: the default."))
    params: ParamsIn = Field(default_factory=ParamsIn)
    budget: BudgetIn = Field(default_factory=BudgetIn, description=(
        "The job pauses (status_reason budget_exceeded) the moment it would pass it. A field left out gets the "
        "tenant's default, else its cap; a field above the cap, or max_cost_usd on a model without a price, is 422."))
    metadata: dict[str, str] = Field(default_factory=dict, max_length=32)
    priority: Literal["high", "normal", "low"] = Field(default="normal", description=(
        "Which of the tenant's jobs run first when it has more queued than its running cap "
        "(RTQCC_MAX_RUNNING_PER_TENANT) lets run: high, then normal, then low, each oldest first."))
    review: ReviewIn = Field(default_factory=ReviewIn)
    context: Literal["tail", "summary"] = Field(default="tail", description=(
        "What each section's prompt carries of what came before: the end of the previous section (tail), or that "
        "and a running summary of the whole document so far (summary: generated after each section, accounted as "
        "its own attempts). Sections written in parallel carry their neighbours' briefs instead."))
    webhook: JobWebhookIn | None = Field(default=None, description=(
        "One URL told of this job's events, signed with a secret of its own returned once in the answer's webhook"))


def outline_items(entries: list[OutlineEntryIn]) -> list:
    from ..store.sections import OutlineItem

    return [OutlineItem(title=e.title, brief=e.brief, target_words=e.target_words) for e in entries]


class OutlineIn(_Strict):
    outline: list[OutlineEntryIn] = Field(min_length=1)


class RegenerateIn(_Strict):
    instructions: str | None = Field(default=None, min_length=1, max_length=4000, description=(
        "What to change: goes into the prompt beside the section's current text"))
    brief: str | None = Field(default=None, max_length=4000, description="A new brief for the section, kept from now on")
    cascade: bool = Field(default=False, description=(
        "Also rewrite every later unlocked section, in order, each seeing the new text before it"))


class EditSectionIn(_Strict):
    model_config = ConfigDict(extra="forbid", strict=True)  # a person's text is kept as written
    content: str = Field(min_length=1, max_length=500_000)


class ForkIn(_Strict):
    from_section: int = Field(ge=0, description=(
        "Sections before it are shared with the new job (the same stored text, not written or billed again); "
        "it writes this one and those after it"))
    outline: list[OutlineEntryIn] | None = Field(default=None, min_length=1, description=(
        "The sections from from_section on, in place of the source's"))


def parse_body(model: type[BaseModel], payload: object, what: str):
    """A request body validated against `model`, or a 422 naming each bad field."""
    if not isinstance(payload, dict):
        raise ValidationFailed("The body must be a JSON object.")
    bad = find_unstorable(payload)
    if bad:
        raise ValidationFailed(f"{bad}: text must not contain NUL characters or unpaired surrogates.")
    try:
        return model.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc, what)) from None


def parse_create_job(payload: object, *, max_sections: int) -> CreateJobIn:
    spec = parse_body(CreateJobIn, payload, "job")
    count = len(spec.outline) if spec.outline else spec.section_count
    check_section_count(count, max_sections)
    if spec.outline and spec.section_count is not None and spec.section_count != len(spec.outline):
        raise ValidationFailed(
            f"section_count is {spec.section_count} but the outline has {len(spec.outline)} sections; "
            "give one or make them agree."
        )
    for key, value in spec.metadata.items():
        if not 1 <= len(key) <= 64 or len(value) > 512:
            raise ValidationFailed("metadata keys must be 1 to 64 characters and values at most 512.")
    return spec


def check_section_count(count: int | None, max_sections: int) -> None:
    if count is not None and count > max_sections:
        raise ValidationFailed(f"A job may have at most {max_sections} sections; this one asks for {count}.")


def describe(exc: ValidationError, what: str = "job") -> str:
    """Pydantic's errors as one sentence a person can act on, naming each field."""
    parts = []
    for error in exc.errors()[:5]:
        field = ".".join(str(p) for p in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown field (it is not part of the API, or is set by the server)")
        else:
            parts.append(f"{field}: {error['msg']}")
    more = len(exc.errors()) - 5
    return f"Invalid {what}: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "") + "."


# ---- response models: the shapes the API answers with (documented in /openapi.json) ----------

class _Out(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a field the docs lack fails the contract tests


class TokenFigures(_Out):
    prompt_tokens: int | None
    completion_tokens: int | None


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = Field(description="Part of it is the local count: the provider reported nothing (aborted or cut streams)")
    attempts: int | None = None
    reported: TokenFigures | None = None
    counted: TokenFigures | None = None
    difference: TokenFigures | None = Field(default=None, description="Reported minus counted, where reported")
    cost_usd: float | None = Field(default=None, description="From the price table; null when a model has no price")
    cost_note: str | None = None


class Links(_Out):
    self: str
    start: str
    pause: str
    resume: str
    cancel: str
    retry: str
    stream: str
    manuscript: str


class JobBudget(_Out):
    max_tokens: int | None = None
    max_cost_usd: float | None = None


class CountQuota(_Out):
    limit: int | None = Field(description="null: no limit")
    used: int | None


class CostQuota(_Out):
    limit: float | None = Field(description="null: no limit")
    used: float


class QuotaUse(_Out):
    """The tenant's quotas beside their use; the daily ones reset at 00:00 UTC."""
    resets_at: str
    tokens_per_day: CountQuota
    cost_usd_per_day: CostQuota
    active_jobs: CountQuota = Field(description="Jobs queued or running at once")


class Webhook(_Out):
    id: str
    url: str
    events: list[str]
    description: str
    job: str | None = Field(description="The job whose own URL this is (null: every job of the tenant)")
    created_at: str
    previous_secret_expires_at: str | None = Field(description=(
        "After a rotation: until then the previous secret signs beside the new one"))


class WebhookWithSecret(Webhook):
    secret: str = Field(description="whsec_...: verifies the webhook-signature header; shown this once")


class WebhookList(_Out):
    webhooks: list[Webhook]


class WebhookDelivery(_Out):
    id: str = Field(description="The webhook-id header, the same on every attempt")
    event: str
    job: str | None
    status: Literal["pending", "succeeded", "failed"]
    attempts: int
    next_attempt_at: str | None = Field(description="While pending")
    last_attempt_at: str | None
    last_status_code: int | None
    last_error: str | None
    last_response: str | None = Field(description="The start of the receiver's last answer")
    delivered_at: str | None
    created_at: str


class WebhookDeliveryPage(_Out):
    deliveries: list[WebhookDelivery]
    next_cursor: str | None


class JobCreated(_Out):
    externalId: str
    status: str
    links: Links
    budget: JobBudget | None = Field(default=None, description="The budget the job runs under, defaults applied")
    quota: QuotaUse | None = Field(default=None, description="The tenant's quotas and their use when it was created")
    webhook: WebhookWithSecret | None = Field(default=None, description="The job's own webhook, when it named one")


class JobSummary(_Out):
    externalId: str
    title: str
    status: str
    model: str
    links: Links


class Progress(_Out):
    sections_total: int
    sections_done: int


class ListedUsage(_Out):
    total_tokens: int = Field(description="Billed tokens of every call so far")
    cost_usd: float | None = Field(description="null when a model it used has no price")


class JobListItem(JobSummary):
    progress: Progress
    usage: ListedUsage
    status_reason: str | None = Field(default=None, description="Why it stopped, when it says")
    error: str | None = Field(default=None, description="Why it failed")


class JobPage(_Out):
    jobs: list[JobListItem]
    next_cursor: str | None


class SectionSummary(_Out):
    index: int
    title: str
    status: str
    version: int | None = Field(description="The current version (null until the first is written)")
    locked: bool
    usage: Usage


class QueueWait(_Out):
    """Where a queued job stands."""
    waiting_for: Literal["tenant_cap", "consumer"] = Field(description=(
        "tenant_cap: the tenant runs as many jobs as its cap allows and this one is next in `position`; "
        "consumer: it is on the queue for the next free consumer slot"))
    position: int | None = Field(default=None, description="1: the tenant's next job to run")
    running: int | None = Field(default=None, description="The tenant's jobs running now")
    cap: int | None = Field(default=None, description="The most the tenant may run at once")


class ProviderWaitOut(_Out):
    """A call of a running job held back before it goes out to the provider."""
    section: int | None = Field(description="The section it writes (null: the outline)")
    model: str
    reason: Literal["requests_per_min", "tokens_per_min", "rate_limited", "provider_error"] = Field(description=(
        "requests_per_min, tokens_per_min: the provider limits every consumer shares are spent for now; "
        "rate_limited: the provider answered 429 and every consumer holds this model back for its retry-after; "
        "provider_error: a failed call (5xx, network) is tried again after a backoff"))
    remaining_s: float = Field(description="About how long it still waits, as estimated now")


class Revision(_Out):
    """The regeneration under way."""
    section: int
    cascade: bool
    sections: list[int] = Field(description="The sections being rewritten, in order")
    instructions: str | None = None


class JobDocument(JobSummary):
    priority: str
    revision: Revision | None = Field(default=None, description=(
        "While sections are being rewritten (the job is queued, running or paused); it returns to completed"))
    forked_from: dict | None = Field(default=None, description="The job and section this one was forked from")
    queue: QueueWait | None = Field(default=None, description="Only while the job is queued")
    provider_waits: list[ProviderWaitOut] | None = Field(default=None, description=(
        "Only while the job is running and some of its calls wait before they go out to the provider"))
    brief: str
    metadata: dict[str, str]
    progress: Progress
    sections: list[SectionSummary]
    usage: Usage
    status_reason: str | None = None
    error: str | None = None


class SectionDocument(_Out):
    index: int
    title: str
    brief: str
    status: str
    version: int | None = Field(description="The current version, whose ETag the response carries")
    locked: bool
    target_words: int | None = None
    usage: Usage
    content: str | None = Field(default=None, description="The current version's text, once there is one")
    partial: str | None = Field(default=None, description=(
        "Text kept by a pause, of the version being written (a first draft, or a rewrite)"))


class VersionUsage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost_usd: float | None


class SectionVersion(_Out):
    version: int
    current: bool
    maker: Literal["model", "human", "restore", "fork"]
    made_with: dict = Field(description=(
        "model: the model, its parameters and kind (draft, regeneration, cascade) and instructions; "
        "human: the API key's reference; restore: restored_from; fork: the job, index and version shared"))
    created_at: str
    chars: int
    sha256: str
    usage: VersionUsage = Field(description="The calls that wrote this version (0 for a person's or a shared one)")
    etag: str


class SectionVersionWithContent(SectionVersion):
    content: str


class VersionList(_Out):
    index: int
    current: int | None
    versions: list[SectionVersion]


class SectionLock(_Out):
    index: int
    locked: bool
    version: int | None


class StreamToken(_Out):
    token: str
    expires_in: int
    stream_url: str


class ErrorDetail(_Out):
    code: str
    message: str


class ErrorBody(_Out):
    error: ErrorDetail


class Health(_Out):
    status: str


class Readiness(_Out):
    status: str
    checks: dict[str, dict]


class JobDeleted(_Out):
    externalId: str
    status: Literal["deleted", "deleting"] = Field(description=(
        "deleted: its rows, objects and events are gone; deleting: gone from the API, its data removed once the "
        "consumer that was running it has let go (a repeated DELETE or the next prune finishes it)"))


class UsageFigures(_Out):
    prompt_tokens: int = Field(description="Billed: as the provider reported, else as counted")
    completion_tokens: int
    total_tokens: int
    reported: TokenFigures = Field(description="Summed over the calls the provider reported usage for")
    counted: TokenFigures = Field(description="Our own count of every call")
    estimated_attempts: int = Field(description="Calls billed by our count: the provider reported nothing")
    cost_usd: float | None = Field(description="Null when a call's model has no price")
    attempts: int
    jobs: int = Field(description="Jobs with calls in the group (a job counts in each day it spent on)")
    deleted_jobs: int = Field(description="Of those, jobs deleted since: their usage is kept for billing")


class UsageGroup(UsageFigures):
    day: str | None = Field(default=None, description="group_by=day: the UTC day, YYYY-MM-DD")
    model: str | None = Field(default=None, description="group_by=model")


class UsageReport(_Out):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)
    from_: str = Field(alias="from", description="The first UTC day counted")
    to: str = Field(description="The last UTC day counted (included)")
    group_by: Literal["day", "model"]
    groups: list[UsageGroup]
    total: UsageFigures
