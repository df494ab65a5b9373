"""Per-tenant quotas: tokens and cost per UTC day, jobs queued or running at once, and the budget
a job gets (a default when it gives none, a cap its own may not exceed).

Limits come from settings (`RTQCC_QUOTA_*`, `RTQCC_JOB_*`), overridden per tenant by a row of
`tenant_quotas` (a NULL column inherits the setting). They are checked before a job is enqueued
(create; start, resume, retry: 429 `quota_exceeded`) and enforced live: the orchestrator reads the
tenant's spend today once per provider call (the outline, each section) and its BudgetMeter pauses
the job (`quota_exceeded`) the moment the next token would pass the daily quota. Jobs of one
tenant running at once each see the others' spend as of their own call's start, so together they
can pass a daily quota by at most what their calls in flight spend.

Spend today is what `generation_attempts` recorded since 00:00 UTC; an attempt without a price
counts its tokens but no cost (a cost quota refuses unpriced models up front)."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from datetime import datetime, timezone
from typing import Callable, Mapping

from .abort import StopReason
from .budget import Limit
from ..store.db import Connection, Database
from ..errors import QuotaExceeded, ValidationFailed
from ..store.jobs import Job, JobStore, TransitionResult
from ..store.tenant_usage import TenantUsage
from .pricing import Price, price_for
from ..settings import Settings
from ..status import TRANSITIONS, JobStatus

# Fewer tokens left than this is none left: every call's prompt (the system prompt, the title and
# brief, the instructions) is longer, so it would pause at once. The live meter stops a run when
# its next token would pass the quota, which leaves the tenant a little under it, not over.
MIN_CALL_TOKENS = 64


@dataclass(frozen=True)
class Quota:
    """One tenant's limits; None: no limit."""

    tokens_per_day: int | None = None
    cost_usd_per_day: float | None = None
    active_jobs: int | None = None
    job_default_max_tokens: int | None = None
    job_default_max_cost_usd: float | None = None
    job_max_tokens: int | None = None
    job_max_cost_usd: float | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> "Quota":
        return cls(
            tokens_per_day=settings.quota_tokens_per_day,
            cost_usd_per_day=settings.quota_cost_usd_per_day,
            active_jobs=settings.quota_active_jobs,
            job_default_max_tokens=settings.job_default_max_tokens,
            job_default_max_cost_usd=settings.job_default_max_cost_usd,
            job_max_tokens=settings.job_max_tokens,
            job_max_cost_usd=settings.job_max_cost_usd,
        )

    def overridden_by(self, row: Mapping[str, object]) -> "Quota":
        """This quota with a `tenant_quotas` row's non-NULL columns in place of the settings."""
        return replace(self, **{f.name: row[f.name] for f in fields(self) if row.get(f.name) is not None})

    @property
    def daily(self) -> bool:
        return self.tokens_per_day is not None or self.cost_usd_per_day is not None


_OVERRIDE_COLUMNS = tuple(f.name for f in fields(Quota))


@dataclass(frozen=True)
class Standing:
    """A tenant's quota and its use, as of one query."""

    quota: Quota
    tokens_today: int
    cost_today_usd: float
    active_jobs: int | None  # queued or running now (None: not counted)
    resets_at: datetime      # the next 00:00 UTC
    resets_in_s: float

    def daily_limit(self) -> Limit | None:
        """The daily quota as a live limit for the BudgetMeter (None without one)."""
        if not self.quota.daily:
            return None
        return Limit(StopReason.QUOTA_EXCEEDED, self.quota.tokens_per_day, self.quota.cost_usd_per_day,
                     self.tokens_today, self.cost_today_usd)

    def check_daily(self, price: Price | None) -> None:
        """Refuse (429, Retry-After: the reset) when a daily quota has too little left for one
        call (at `price`, the job's model's) to start."""
        quota, resets = self.quota, f"It resets at {_iso(self.resets_at)} (in {_duration(self.resets_in_s)})."
        retry = {"Retry-After": str(max(1, math.ceil(self.resets_in_s)))}
        if quota.tokens_per_day is not None and self.tokens_today + MIN_CALL_TOKENS > quota.tokens_per_day:
            raise QuotaExceeded(f"The daily token quota is used up: {self.tokens_today:,} of "
                                f"{quota.tokens_per_day:,} tokens used today (UTC). {resets}", headers=retry)
        call_cost = price.cost(MIN_CALL_TOKENS, 0) if price is not None else 0.0
        if quota.cost_usd_per_day is not None and self.cost_today_usd + call_cost > quota.cost_usd_per_day:
            raise QuotaExceeded(f"The daily cost quota is used up: ${self.cost_today_usd:,.4f} of "
                                f"${quota.cost_usd_per_day:,.4f} spent today (UTC). {resets}", headers=retry)

    def check_active(self) -> None:
        """Refuse (429) another queued job when the tenant has as many queued or running as allowed.
        `active_jobs` must count the others only (the job asking is not one of them yet)."""
        limit = self.quota.active_jobs
        if limit is not None and self.active_jobs is not None and self.active_jobs >= limit:
            raise QuotaExceeded(
                f"{self.active_jobs} of your jobs are queued or running, the most the quota allows at once "
                f"({limit}). Start this one when one of them finishes, or pause one.")

    def public(self) -> dict:
        """The tenant's view: each limit (null: none) beside its use."""
        quota = self.quota
        return {
            "resets_at": _iso(self.resets_at),
            "tokens_per_day": {"limit": quota.tokens_per_day, "used": self.tokens_today},
            "cost_usd_per_day": {"limit": quota.cost_usd_per_day, "used": round(self.cost_today_usd, 8)},
            "active_jobs": {"limit": quota.active_jobs, "used": self.active_jobs},
        }


class QuotaStore:
    def __init__(self, db: Database, settings: Settings):
        self.db = db
        self.settings = settings
        self.defaults = Quota.from_settings(settings)

    def standing(self, tenant: str, conn: Connection | None = None, *, measure: bool = True,
                 count_active: bool = True, excluding: str | None = None) -> Standing:
        """One query: the tenant's overrides, its spend today (always with `measure`, else only
        under a daily quota) and, with `count_active`, its queued or running jobs but `excluding`."""
        row = TenantUsage(self.db).standing_row(tenant, _OVERRIDE_COLUMNS, conn, measure=measure or self.defaults.daily,
                                                count_active=count_active, excluding=excluding)
        return Standing(quota=self.defaults.overridden_by(row), tokens_today=int(row["tokens"]),
                        cost_today_usd=float(row["cost_usd"]), active_jobs=row["active_now"],
                        resets_at=row["resets_at"], resets_in_s=float(row["resets_in_s"]))

    def admit(self, tenant: str, external_id: str, verb: str, jobs: JobStore, *,
              along: Callable[[Connection, Job], None] | None = None) -> TransitionResult:
        """start / resume / retry / approve / regenerate under the tenant's quotas: the count of
        its queued or running jobs and the transition happen under one per-tenant lock, so
        concurrent requests cannot all see room for one more. `along` writes what goes with the
        transition in its transaction (a regeneration's sections); what it raises undoes both."""
        sources, _ = TRANSITIONS[verb]
        with TenantUsage(self.db).admission(tenant, external_id) as (conn, row):
            if row is not None and JobStatus(row["status"]) in sources:
                standing = self.standing(tenant, conn, excluding=external_id)
                standing.check_daily(price_for(row["model"], self.settings.prices))
                standing.check_active()
                moved = jobs.transition(tenant, external_id, verb, conn=conn)
                if along is not None:
                    along(conn, moved.job)
                return moved
        # Not a move into the queue (unknown job, repeated start, impossible verb): nothing to
        # admit; the plain transition answers it (404, a no-op, or 409).
        return jobs.transition(tenant, external_id, verb)


def job_budget(requested: Mapping[str, float], model: str, quota: Quota, prices: Mapping[str, Price]) -> dict:
    """The budget a new job runs under: its own, each field within the tenant's cap (422 above
    it: a job is never quietly given less than it asked for); a field it leaves out gets the
    tenant's default, else the cap. Any cost limit on a model without a price is refused (422):
    it could not be enforced."""
    budget: dict[str, float] = {}
    for name, default, cap in (("max_tokens", quota.job_default_max_tokens, quota.job_max_tokens),
                               ("max_cost_usd", quota.job_default_max_cost_usd, quota.job_max_cost_usd)):
        value = requested.get(name)
        if value is not None and cap is not None and value > cap:
            raise ValidationFailed(f"budget.{name}: {value:g} is above the most a job may have here, {cap:g}; "
                                   f"ask for {cap:g} or less, or leave it out to get {min(default or cap, cap):g}.")
        if value is None:
            value = cap if default is None else default if cap is None else min(default, cap)
        if value is not None:
            budget[name] = value
    if price_for(model, prices) is None:
        unpriced = (f"model {model!r} has no price in the price table (RTQCC_PRICES_FILE or RTQCC_PRICES), "
                    "so its cost cannot be known")
        if requested.get("max_cost_usd") is not None:
            raise ValidationFailed(f"budget.max_cost_usd cannot be enforced: {unpriced}. "
                                   "Give a budget.max_tokens instead, or use a priced model.")
        if "max_cost_usd" in budget:
            raise ValidationFailed(f"This tenant's jobs carry a cost limit (budget.max_cost_usd "
                                   f"{budget['max_cost_usd']:g}) that cannot be enforced: {unpriced}. Use a priced model.")
        if quota.cost_usd_per_day is not None:
            raise ValidationFailed(f"This tenant's daily cost quota cannot be enforced on this job: {unpriced}. "
                                   "Use a priced model.")
    return budget


def _iso(moment: datetime) -> str:
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _duration(seconds: float) -> str:
    minutes = max(1, math.ceil(seconds / 60))
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min"
