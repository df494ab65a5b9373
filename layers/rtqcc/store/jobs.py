"""Jobs in Postgres: creation, reads and the conditional transitions of their life. Every state
change is a compare-and-set that reports whether it won. The lease holder's fenced writes live in
leases.py, the attempts ledger in attempts.py, sections in sections.py; JobStore is all of them
over one database."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable

from ..errors import InvalidTransition, JobNotFound
from ..ids import new_external_id
from ..status import TRANSITIONS, JobPriority, JobStatus
from .attempts import Attempt, AttemptLedger
from .db import Connection, Database, Row
from .leases import RUNNING_SLOTS_LOCK, Lease, LeaseWrites, TenantAtCapacity, acquire_statement, lease_from
from .sections import SECTION_COLUMNS, OutlineItem, Section, insert_sections
from .webhooks import outbox_insert

# Where callers have always found them.
__all__ = ["Attempt", "DEFAULT_SECTION_COUNT", "Job", "JobStore", "Lease", "NewJob", "OutlineItem", "Section",
           "TransitionResult"]


DEFAULT_SECTION_COUNT = 5  # when the client gives neither an outline nor a section count


@dataclass(frozen=True)
class NewJob:
    tenant: str
    title: str
    brief: str
    model: str
    outline: list[OutlineItem] | None
    section_count: int | None
    params: dict[str, Any]
    budget: dict[str, Any]
    metadata: dict[str, str]
    priority: JobPriority = JobPriority.NORMAL
    options: dict[str, Any] | None = None  # review, context, forked_from
    tier: str | None = None  # of the key that created it: its tenant's cap on running jobs


@dataclass(frozen=True)
class Job:
    id: int
    external_id: str
    tenant: str
    title: str
    brief: str
    model: str
    params: dict[str, Any]
    budget: dict[str, Any]
    metadata: dict[str, str]
    section_count: int | None
    status: JobStatus
    status_reason: str | None
    error: str | None
    manuscript_key: str | None
    priority: JobPriority = JobPriority.NORMAL
    created_at: datetime | None = None
    options: dict[str, Any] = field(default_factory=dict)
    revision: dict[str, Any] | None = None  # the regeneration under way
    manuscript_revision: int = 0            # which assembly of the manuscript is current
    tier: str | None = None

    @property
    def awaits_outline_review(self) -> bool:
        """It asked to review its outline and it has not been approved yet."""
        review = self.options.get("review") or {}
        return bool(review.get("outline")) and not review.get("approved")

    @property
    def context(self) -> str:
        """What each section's prompt carries of what came before: "tail" or "summary"."""
        return self.options.get("context") or "tail"

    @classmethod
    def from_row(cls, row: Row) -> "Job":
        return cls(
            id=row["id"],
            external_id=row["external_id"],
            tenant=row["tenant"],
            title=row["title"],
            brief=row["brief"],
            model=row["model"],
            params=row["params"] or {},
            budget=row["budget"] or {},
            metadata=row["metadata"] or {},
            section_count=row["section_count"],
            status=JobStatus(row["status"]),
            status_reason=row["status_reason"],
            error=row["error"],
            manuscript_key=row["manuscript_key"],
            priority=JobPriority(row["priority"]),
            created_at=row["created_at"],
            options=row["options"] or {},
            revision=row["revision"],
            manuscript_revision=row["manuscript_revision"],
            tier=row["tier"],
        )


@dataclass(frozen=True)
class TransitionResult:
    job: Job
    changed: bool
    previous: JobStatus


_JOB_COLUMNS = (
    "id, external_id, tenant, title, brief, model, params, budget, metadata, section_count, status,"
    " status_reason, error, manuscript_key, priority, created_at, options, revision, manuscript_revision, tier"
)


class JobStore(LeaseWrites, AttemptLedger):
    """Jobs in Postgres: creation, reads and transitions here; the lease holder's writes
    (store/leases.py) and the attempts ledger (store/attempts.py) alongside."""

    def __init__(self, db: Database):
        self.db = db

    # ---- creation and reads -------------------------------------------------------------

    def create(self, spec: NewJob, *, then: Callable[[Connection, Job], None] | None = None) -> Job:
        """Store a new job and its outline; `then` writes more in the same transaction (a fork's
        shared sections)."""
        external_id = new_external_id()
        with self.db.transaction() as conn:
            row = conn.row(
                f"INSERT INTO jobs (external_id, tenant, title, brief, model, params, budget, metadata,"
                f" section_count, outline_given, priority, options, tier, status)"
                f" VALUES (:e, :t, :title, :brief, :model, CAST(:params AS jsonb), CAST(:budget AS jsonb),"
                f" CAST(:metadata AS jsonb), :count, :given, :priority, CAST(:options AS jsonb), :tier, 'created')"
                f" RETURNING {_JOB_COLUMNS}",
                e=external_id,
                t=spec.tenant,
                title=spec.title,
                brief=spec.brief,
                model=spec.model,
                params=json.dumps(spec.params),
                budget=json.dumps(spec.budget),
                metadata=json.dumps(spec.metadata),
                count=len(spec.outline) if spec.outline else spec.section_count,
                given=spec.outline is not None,
                priority=spec.priority.value,
                options=json.dumps(spec.options or {}),
                tier=spec.tier,
            )
            assert row is not None
            if spec.outline:
                insert_sections(conn, row["id"], spec.outline)
            job = Job.from_row(row)
            if then is not None:
                then(conn, job)
        return job

    def get(self, tenant: str, external_id: str) -> Job:
        row = self.db.row(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE external_id = :e AND tenant = :t AND status <> 'deleting'",
            e=external_id, t=tenant
        )
        if row is None:
            raise JobNotFound(f"No job {external_id} exists for this API key.")
        return Job.from_row(row)

    def get_by_external_id(self, external_id: str) -> Job | None:
        row = self.db.row(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE external_id = :e", e=external_id)
        return Job.from_row(row) if row else None

    def take_for_run(self, external_id: str, owner: str, ttl_s: float,
                     running_cap: Callable[[str | None], int | None] | None = None) -> tuple[Job | None, Lease | None]:
        """The job, and a lease on it if it should run and nobody holds a live one. With
        `running_cap` (the most jobs a tenant may run at once, for a job of a tier; None: no
        cap), raise TenantAtCapacity instead when its tenant already runs that many: a tenant's
        takings queue behind one lock, so two consumers cannot both take its last slot.
        Without caps one round trip (two when the lease is not taken); with them, four."""
        params = {"e": external_id, "owner": owner, "ttl": float(ttl_s)}
        if running_cap is None:
            row = self.db.row(acquire_statement(_JOB_COLUMNS), **params)
            if row is None:  # why not (finished, someone else's, unknown) is the caller's to tell
                return self.get_by_external_id(external_id), None
            return Job.from_row(row), lease_from(row, external_id, owner)
        with self.db.transaction() as conn:
            row = conn.row(f"SELECT {_JOB_COLUMNS}, pg_advisory_xact_lock(:ns, hashtext(tenant))::text AS locked"
                           " FROM jobs WHERE external_id = :e", ns=RUNNING_SLOTS_LOCK, e=external_id)
            if row is None:
                return None, None
            job = Job.from_row(row)
            if job.status not in (JobStatus.QUEUED, JobStatus.RUNNING):
                return job, None
            cap = running_cap(job.tier)
            if cap is None:
                taken = conn.row(acquire_statement(_JOB_COLUMNS), **params)
            else:
                taken = conn.row(acquire_statement(_JOB_COLUMNS, below_cap=True), t=job.tenant, cap=cap, **params)
                if taken["id"] is None and taken["running_now"] >= cap:
                    raise TenantAtCapacity(job, taken["running_now"], cap)
            if taken is None or taken["id"] is None:
                return job, None
            return Job.from_row(taken), lease_from(taken, external_id, owner)

    def list(self, tenant: str, *, status: JobStatus | None, before: str | None, limit: int) -> list[Job]:
        rows = self.db.rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant = :t AND status <> 'deleting'"
            " AND (CAST(:status AS text) IS NULL OR status = :status)"
            " AND (CAST(:before AS text) IS NULL OR external_id < :before)"
            " ORDER BY external_id DESC LIMIT :limit",
            t=tenant,
            status=status.value if status else None,
            before=before,
            limit=limit,
        )
        return [Job.from_row(row) for row in rows]

    def runnable_but_unclaimed(self, *, queue_lost: bool, queued_stale_after_s: float) -> list[str]:
        """The jobs that should be on the queue and may not be: running ones whose lease expired,
        and queued ones nobody picked up for a while (every queued one, when the queue was lost)."""
        rows = self.db.rows(
            "SELECT external_id FROM jobs"
            " WHERE (status = 'running' AND (lease_owner IS NULL OR lease_expires_at < now()))"
            " OR (status = 'queued' AND (:lost OR updated_at < now() - make_interval(secs => :stale)))"
            " ORDER BY external_id",
            lost=queue_lost,
            stale=float(queued_stale_after_s),
        )
        return [row["external_id"] for row in rows]

    def running_counts(self, tenants: list[str]) -> dict[str, int]:
        """How many jobs each tenant runs under a live lease now (0 for those running none)."""
        rows = self.db.rows(
            "SELECT tenant, COUNT(*)::int AS n FROM jobs WHERE tenant = ANY(CAST(:t AS text[])) AND status = 'running'"
            " AND lease_owner IS NOT NULL AND lease_expires_at > now() GROUP BY tenant", t=list(tenants))
        return {tenant: 0 for tenant in tenants} | {row["tenant"]: row["n"] for row in rows}

    def sections(self, job_id: int) -> list[Section]:
        rows = self.db.rows(f"SELECT {SECTION_COLUMNS} FROM sections WHERE job_id = :j ORDER BY idx", j=job_id)
        return [Section.from_row(row) for row in rows]

    # ---- control: conditional transitions ---------------------------------------------------

    def transition(self, tenant: str, external_id: str, verb: str, *, reason: str | None = None,
                   conn: Connection | None = None) -> TransitionResult:
        """`conn`: inside the caller's transaction (writing/quotas.py checks a quota and transitions under one lock)."""
        sources, target = TRANSITIONS[verb]
        row = (conn or self.db).row(
            "WITH before AS (SELECT id, status FROM jobs WHERE external_id = :e AND tenant = :t FOR UPDATE),"
            f" moved AS (UPDATE jobs SET status = :target, status_reason = :reason, updated_at = now(),"
            # A retried job starts with a clean slate: no error, no failed runs counted.
            " error = CASE WHEN :retry THEN NULL ELSE jobs.error END,"
            " failures = CASE WHEN :retry THEN 0 ELSE jobs.failures END,"
            # An approved outline is not reviewed again, whatever happens to the run after.
            " options = CASE WHEN :approve THEN jsonb_set(jobs.options, '{review,approved}', 'true') ELSE jobs.options END,"
            " finished_at = CASE WHEN :target IN ('completed', 'failed', 'cancelled') THEN now() END"
            " FROM before WHERE jobs.id = before.id AND before.status = ANY(CAST(:sources AS text[]))"
            f" RETURNING before.status AS previous, {', '.join('jobs.' + c.strip() for c in _JOB_COLUMNS.split(','))}),"
            # Its webhook deliveries (job.cancelled, job.awaiting_review) in the same statement: the outbox.
            f" announced AS ({outbox_insert('moved')}) SELECT * FROM moved",
            e=external_id,
            t=tenant,
            target=target.value,
            reason=reason,
            retry=verb == "retry",
            approve=verb == "approve",
            sources=[s.value for s in sources],
        )
        if row is not None:
            return TransitionResult(job=Job.from_row(row), changed=True, previous=JobStatus(row["previous"]))
        current = self.get(tenant, external_id)
        if verb in ("start", "review") and current.status in (JobStatus.QUEUED, JobStatus.RUNNING,
                                                              JobStatus.AWAITING_REVIEW):
            return TransitionResult(job=current, changed=False, previous=current.status)
        raise InvalidTransition(_refusal(verb, current))







def _refusal(verb: str, job: Job) -> str:
    hints = {
        "start": "only a created job can be started" + (" (use resume for a paused job)" if job.status == JobStatus.PAUSED else ""),
        "pause": "only a queued or running job can be paused",
        "resume": "only a paused job can be resumed",
        "cancel": "a finished job cannot be cancelled",
        "retry": "only a failed job can be retried",
        "review": "only a created job can be started",
        "approve": "only a job awaiting review can be approved",
        "regenerate": "a section is regenerated on a completed or paused job (pause a running one first)",
    }
    return f"Cannot {verb} job {job.external_id}: it is {job.status.value}; {hints[verb]}."
