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


class ParamsIn(_Strict):
    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens_per_section: int | None = Field(default=None, ge=1, le=32_000)
    parallel_sections: int | None = Field(default=None, ge=1, le=16, description=(
        "Sections written at once once the outline is known (1, the default: in order, each prompt "
        "quoting the end of the section before; more: each prompt describes its neighbours instead)."))


class BudgetIn(_Strict):
    max_tokens: int | None = Field(default=None, ge=1)
    max_cost_usd: float | None = Field(default=None, gt=0, allow_inf_nan=False)


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


def parse_create_job(payload: object, *, max_sections: int) -> CreateJobIn:
    if not isinstance(payload, dict):
        raise ValidationFailed("The body must be a JSON object.")
    bad = find_unstorable(payload)
    if bad:
        raise ValidationFailed(f"{bad}: text must not contain NUL characters or unpaired surrogates.")
    try:
        spec = CreateJobIn.model_validate(payload)
    except ValidationError as exc:
        raise ValidationFailed(describe(exc)) from None
    count = len(spec.outline) if spec.outline else spec.section_count
    if count is not None and count > max_sections:
        raise ValidationFailed(f"A job may have at most {max_sections} sections; this one asks for {count}.")
    if spec.outline and spec.section_count is not None and spec.section_count != len(spec.outline):
        raise ValidationFailed(
            f"section_count is {spec.section_count} but the outline has {len(spec.outline)} sections; "
            "give one or make them agree."
        )
    for key, value in spec.metadata.items():
        if not 1 <= len(key) <= 64 or len(value) > 512:
            raise ValidationFailed("metadata keys must be 1 to 64 characters and values at most 512.")
    return spec


def describe(exc: ValidationError) -> str:
    """Pydantic's errors as one sentence a person can act on, naming each field."""
    parts = []
    for error in exc.errors()[:5]:
        field = ".".join(str(p) for p in error["loc"]) or "body"
        if error["type"] == "extra_forbidden":
            parts.append(f"{field}: unknown field (it is not part of the API, or is set by the server)")
        else:
            parts.append(f"{field}: {error['msg']}")
    more = len(exc.errors()) - 5
    return "Invalid job: " + "; ".join(parts) + (f"; and {more} more" if more > 0 else "") + "."


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


class JobCreated(_Out):
    externalId: str
    status: str
    links: Links
    budget: JobBudget | None = Field(default=None, description="The budget the job runs under, defaults applied")
    quota: QuotaUse | None = Field(default=None, description="The tenant's quotas and their use when it was created")


class JobSummary(_Out):
    externalId: str
    title: str
    status: str
    model: str
    links: Links


class JobPage(_Out):
    jobs: list[JobSummary]
    next_cursor: str | None


class Progress(_Out):
    sections_total: int
    sections_done: int


class SectionSummary(_Out):
    index: int
    title: str
    status: str
    usage: Usage


class QueueWait(_Out):
    """Where a queued job stands."""
    waiting_for: Literal["tenant_cap", "consumer"] = Field(description=(
        "tenant_cap: the tenant runs as many jobs as its cap allows and this one is next in `position`; "
        "consumer: it is on the queue for the next free consumer slot"))
    position: int | None = Field(default=None, description="1: the tenant's next job to run")
    running: int | None = Field(default=None, description="The tenant's jobs running now")
    cap: int | None = Field(default=None, description="The most the tenant may run at once")


class JobDocument(JobSummary):
    priority: str
    queue: QueueWait | None = Field(default=None, description="Only while the job is queued")
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
    usage: Usage
    content: str | None = Field(default=None, description="The stored text, once the section is done")
    partial: str | None = Field(default=None, description="Text kept by a pause, before the section is done")


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
