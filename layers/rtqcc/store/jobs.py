"""Job and section state in Postgres. Every state change is a compare-and-set that reports
whether it won; every write a consumer makes is fenced by its lease version."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Iterable

from .db import Connection, Database, Row
from ..errors import InvalidTransition, JobNotFound, LeaseLost
from ..ids import new_external_id
from ..status import TRANSITIONS, JobStatus, SectionStatus


DEFAULT_SECTION_COUNT = 5  # when the client gives neither an outline nor a section count


@dataclass(frozen=True)
class OutlineItem:
    title: str
    brief: str = ""


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
        )


@dataclass(frozen=True)
class Section:
    idx: int
    title: str
    brief: str
    status: SectionStatus
    partial_text: str
    content_key: str | None
    content_sha256: str | None
    content_chars: int | None = None

    @classmethod
    def from_row(cls, row: Row) -> "Section":
        return cls(
            idx=row["idx"],
            title=row["title"],
            brief=row["brief"],
            status=SectionStatus(row["status"]),
            partial_text=row["partial_text"],
            content_key=row["content_key"],
            content_sha256=row["content_sha256"],
            content_chars=row["content_chars"],
        )


@dataclass(frozen=True)
class Lease:
    """The right to write one job, until `version` is superseded."""

    job_id: int
    external_id: str
    owner: str
    version: int
    failures: int = 0  # runs of this job that ended in an error or a crash, before this one
    last_error: str | None = None


@dataclass(frozen=True)
class Attempt:
    """What one provider call cost: reported by the provider (None if not) and counted locally."""

    section_idx: int | None
    model: str
    reported_prompt_tokens: int | None
    reported_completion_tokens: int | None
    counted_prompt_tokens: int
    counted_completion_tokens: int
    finish_reason: str | None
    aborted: str | None
    cost_usd: float | None = None  # billed tokens at the model's price; None: no price known

    @property
    def billed_tokens(self) -> int:
        """What the provider charges: its own figures where it reported them, else our count."""
        prompt = self.reported_prompt_tokens if self.reported_prompt_tokens is not None else self.counted_prompt_tokens
        completion = (self.reported_completion_tokens if self.reported_completion_tokens is not None
                      else self.counted_completion_tokens)
        return prompt + completion


@dataclass(frozen=True)
class TransitionResult:
    job: Job
    changed: bool
    previous: JobStatus


_JOB_COLUMNS = (
    "id, external_id, tenant, title, brief, model, params, budget, metadata, section_count, status,"
    " status_reason, error, manuscript_key"
)


class JobStore:
    def __init__(self, db: Database):
        self.db = db

    # ---- creation and reads -------------------------------------------------------------

    def create(self, spec: NewJob) -> Job:
        external_id = new_external_id()
        with self.db.transaction() as conn:
            row = conn.row(
                f"INSERT INTO jobs (external_id, tenant, title, brief, model, params, budget, metadata,"
                f" section_count, outline_given, status)"
                f" VALUES (:e, :t, :title, :brief, :model, CAST(:params AS jsonb), CAST(:budget AS jsonb),"
                f" CAST(:metadata AS jsonb), :count, :given, 'created') RETURNING {_JOB_COLUMNS}",
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
            )
            assert row is not None
            if spec.outline:
                _insert_sections(conn, row["id"], spec.outline)
        return Job.from_row(row)

    def get(self, tenant: str, external_id: str) -> Job:
        row = self.db.row(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE external_id = :e AND tenant = :t", e=external_id, t=tenant
        )
        if row is None:
            raise JobNotFound(f"No job {external_id} exists for this API key.")
        return Job.from_row(row)

    def get_by_external_id(self, external_id: str) -> Job | None:
        row = self.db.row(f"SELECT {_JOB_COLUMNS} FROM jobs WHERE external_id = :e", e=external_id)
        return Job.from_row(row) if row else None

    def list(self, tenant: str, *, status: JobStatus | None, before: str | None, limit: int) -> list[Job]:
        rows = self.db.rows(
            f"SELECT {_JOB_COLUMNS} FROM jobs WHERE tenant = :t"
            " AND (CAST(:status AS text) IS NULL OR status = :status)"
            " AND (CAST(:before AS text) IS NULL OR external_id < :before)"
            " ORDER BY external_id DESC LIMIT :limit",
            t=tenant,
            status=status.value if status else None,
            before=before,
            limit=limit,
        )
        return [Job.from_row(row) for row in rows]

    def sections(self, job_id: int) -> list[Section]:
        rows = self.db.rows(
            "SELECT idx, title, brief, status, partial_text, content_key, content_sha256, content_chars"
            " FROM sections WHERE job_id = :j ORDER BY idx",
            j=job_id,
        )
        return [Section.from_row(row) for row in rows]

    def usage_by_section(self, job_id: int) -> dict[int | None, Row]:
        """Billed tokens per section (None: the outline step), summed over every attempt."""
        rows = self.db.rows(
            "SELECT section_idx,"
            " SUM(COALESCE(reported_prompt_tokens, counted_prompt_tokens))::int AS prompt_tokens,"
            " SUM(COALESCE(reported_completion_tokens, counted_completion_tokens))::int AS completion_tokens,"
            " SUM(reported_prompt_tokens)::int AS reported_prompt_tokens,"
            " SUM(reported_completion_tokens)::int AS reported_completion_tokens,"
            " SUM(counted_prompt_tokens)::int AS counted_prompt_tokens,"
            " SUM(counted_completion_tokens)::int AS counted_completion_tokens,"
            " BOOL_OR(reported_prompt_tokens IS NULL OR reported_completion_tokens IS NULL) AS estimated,"
            " COUNT(*)::int AS attempts,"
            # Reported minus counted, over the attempts the provider reported (how far off our count is).
            " SUM(reported_prompt_tokens - counted_prompt_tokens)::int AS prompt_difference,"
            " SUM(reported_completion_tokens - counted_completion_tokens)::int AS completion_difference,"
            " SUM(cost_usd) AS cost_usd,"
            " COALESCE(array_agg(DISTINCT model) FILTER (WHERE cost_usd IS NULL), '{}') AS unpriced_models"
            " FROM generation_attempts WHERE job_id = :j GROUP BY section_idx",
            j=job_id,
        )
        return {row["section_idx"]: row for row in rows}

    def spent(self, job_id: int) -> tuple[int, float | None]:
        """Billed tokens of every attempt of the job, and their cost (None if any is unpriced)."""
        row = self.db.row(
            "SELECT COALESCE(SUM(COALESCE(reported_prompt_tokens, counted_prompt_tokens)"
            " + COALESCE(reported_completion_tokens, counted_completion_tokens)), 0)::bigint AS tokens,"
            " CASE WHEN BOOL_OR(cost_usd IS NULL) THEN NULL ELSE COALESCE(SUM(cost_usd), 0) END AS cost_usd"
            " FROM generation_attempts WHERE job_id = :j",
            j=job_id,
        )
        assert row is not None
        return int(row["tokens"]), row["cost_usd"]

    # ---- control: conditional transitions ---------------------------------------------------

    def transition(self, tenant: str, external_id: str, verb: str, *, reason: str | None = None,
                   conn: Connection | None = None) -> TransitionResult:
        """`conn`: inside the caller's transaction (writing/quotas.py checks a quota and transitions under one lock)."""
        sources, target = TRANSITIONS[verb]
        row = (conn or self.db).row(
            "WITH before AS (SELECT id, status FROM jobs WHERE external_id = :e AND tenant = :t FOR UPDATE)"
            f" UPDATE jobs SET status = :target, status_reason = :reason, updated_at = now(),"
            # A retried job starts with a clean slate: no error, no failed runs counted.
            " error = CASE WHEN :retry THEN NULL ELSE jobs.error END,"
            " failures = CASE WHEN :retry THEN 0 ELSE jobs.failures END,"
            " finished_at = CASE WHEN :target IN ('completed', 'failed', 'cancelled') THEN now() END"
            " FROM before WHERE jobs.id = before.id AND before.status = ANY(CAST(:sources AS text[]))"
            f" RETURNING before.status AS previous, {', '.join('jobs.' + c.strip() for c in _JOB_COLUMNS.split(','))}",
            e=external_id,
            t=tenant,
            target=target.value,
            reason=reason,
            retry=verb == "retry",
            sources=[s.value for s in sources],
        )
        if row is not None:
            return TransitionResult(job=Job.from_row(row), changed=True, previous=JobStatus(row["previous"]))
        current = self.get(tenant, external_id)
        if verb == "start" and current.status in (JobStatus.QUEUED, JobStatus.RUNNING):
            return TransitionResult(job=current, changed=False, previous=current.status)
        raise InvalidTransition(_refusal(verb, current))

    # ---- consumer side: leases and fenced writes --------------------------------------------

    def acquire_lease(self, external_id: str, owner: str, ttl_s: float) -> Lease | None:
        """Take the job if it should run and nobody holds a live lease on it."""
        row = self.db.row(
            "UPDATE jobs SET status = 'running', lease_owner = :owner,"
            " lease_expires_at = now() + make_interval(secs => :ttl), lease_version = lease_version + 1,"
            " deliveries = deliveries + 1, started_at = COALESCE(started_at, now()), updated_at = now(),"
            # Taking over a job still marked running means its last consumer died mid-run.
            " failures = failures + CASE WHEN status = 'running' THEN 1 ELSE 0 END,"
            " error = CASE WHEN status = 'running' THEN 'its consumer stopped mid-run (crash or timeout)'"
            " ELSE error END"
            " WHERE external_id = :e AND (status = 'queued' OR status = 'running')"
            " AND (lease_owner IS NULL OR lease_expires_at < now())"
            " RETURNING id, lease_version, failures, error",
            e=external_id,
            owner=owner,
            ttl=float(ttl_s),
        )
        if row is None:
            return None
        return Lease(job_id=row["id"], external_id=external_id, owner=owner, version=row["lease_version"],
                     failures=row["failures"], last_error=row["error"])

    def renew_lease(self, lease: Lease, ttl_s: float) -> JobStatus | None:
        """Extend the lease; return the job's status, or None if the lease is lost."""
        row = self.db.row(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :ttl)"
            " WHERE id = :j AND lease_version = :v AND lease_owner = :owner RETURNING status",
            j=lease.job_id,
            v=lease.version,
            owner=lease.owner,
            ttl=float(ttl_s),
        )
        return JobStatus(row["status"]) if row else None

    def status_of(self, job_id: int) -> JobStatus:
        row = self.db.row("SELECT status FROM jobs WHERE id = :j", j=job_id)
        assert row is not None
        return JobStatus(row["status"])

    def release_lease(self, lease: Lease, *, requeue: bool = False, error: str | None = None,
                      failed: bool = False) -> JobStatus | None:
        """Give the job up. With `requeue`, a still-running job goes back to `queued`; `error` is
        recorded, and with `failed` the run counts toward the poison limit (a service outage does
        not: it is the service's failure, not the job's). Returns the job's status after, or None
        if the lease was already lost."""
        row = self.db.row(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),"
            " status = CASE WHEN :requeue AND status = 'running' THEN 'queued' ELSE status END,"
            " failures = failures + CASE WHEN :failed THEN 1 ELSE 0 END,"
            " error = COALESCE(CAST(:error AS text), error)"
            " WHERE id = :j AND lease_version = :v AND lease_owner = :owner RETURNING status",
            j=lease.job_id,
            v=lease.version,
            owner=lease.owner,
            requeue=requeue,
            error=error,
            failed=failed,
        )
        return JobStatus(row["status"]) if row else None

    def finish(self, lease: Lease, status: JobStatus, *, error: str | None = None,
               manuscript_key: str | None = None, reason: str | None = None) -> bool:
        """Move a running job to a terminal or paused state; False if it was no longer running
        under this lease (cancelled or paused meanwhile, or taken over)."""
        changed = self.db.run(
            "UPDATE jobs SET status = :s, error = :error, status_reason = :reason,"
            " manuscript_key = COALESCE(:key, manuscript_key), lease_owner = NULL, lease_expires_at = NULL,"
            " finished_at = CASE WHEN :s IN ('completed', 'failed', 'cancelled') THEN now() END,"
            " updated_at = now()"
            " WHERE id = :j AND lease_version = :v AND lease_owner = :owner AND status = 'running'",
            s=status.value,
            error=error,
            reason=reason,
            key=manuscript_key,
            j=lease.job_id,
            v=lease.version,
            owner=lease.owner,
        )
        return changed == 1

    def save_outline(self, lease: Lease, outline: Iterable[OutlineItem]) -> None:
        with self.db.transaction() as conn:
            _check_fence(conn, lease)
            if conn.row("SELECT 1 AS present FROM sections WHERE job_id = :j LIMIT 1", j=lease.job_id):
                return
            _insert_sections(conn, lease.job_id, list(outline))

    def mark_section_running(self, lease: Lease, idx: int) -> None:
        self._fenced_section_update(
            lease, idx, "status = 'running', started_at = COALESCE(sections.started_at, now())")

    def save_partial(self, lease: Lease, idx: int, text: str) -> None:
        """Keep the text generated so far, so a resume continues it instead of paying again."""
        self._fenced_section_update(lease, idx, "status = 'pending', partial_text = :text", text=text)

    def mark_section_done(self, lease: Lease, idx: int, *, key: str, sha256: str, chars: int) -> bool:
        """Point the section at its stored content. Called only after the S3 write succeeded."""
        return self._fenced_section_update(
            lease, idx,
            "status = 'done', partial_text = '', content_key = :key, content_sha256 = :sha,"
            " content_chars = :chars, written_version = :v, completed_at = now()",
            key=key, sha=sha256, chars=chars)

    def _fenced_section_update(self, lease: Lease, idx: int, assignments: str, **params: Any) -> bool:
        """One statement: lock the job row (FOR SHARE, so a takeover waits for us), check the lease
        is still ours, and update a section that is not done yet. True if a row changed."""
        row = self.db.row(
            "WITH fence AS (SELECT id FROM jobs WHERE id = :j AND lease_version = :v AND lease_owner = :owner"
            " FOR SHARE), changed AS ("
            f" UPDATE sections SET {assignments} FROM fence"
            " WHERE sections.job_id = fence.id AND sections.idx = :i AND sections.status <> 'done' RETURNING 1)"
            " SELECT (SELECT COUNT(*) FROM fence)::int AS held, (SELECT COUNT(*) FROM changed)::int AS changed",
            j=lease.job_id, v=lease.version, owner=lease.owner, i=idx, **params)
        assert row is not None
        if not row["held"]:
            raise LeaseLost(f"Job {lease.external_id}: lease version {lease.version} is no longer held by {lease.owner}")
        return row["changed"] == 1

    def record_attempt(self, job_id: int, attempt: Attempt) -> None:
        # Not fenced: tokens spent are a fact whoever holds the lease.
        self.db.run(
            "INSERT INTO generation_attempts (job_id, section_idx, model, reported_prompt_tokens,"
            " reported_completion_tokens, counted_prompt_tokens, counted_completion_tokens, finish_reason, aborted,"
            " cost_usd) VALUES (:j, :i, :model, :rp, :rc, :cp, :cc, :finish, :aborted, :cost)",
            j=job_id,
            i=attempt.section_idx,
            model=attempt.model,
            rp=attempt.reported_prompt_tokens,
            rc=attempt.reported_completion_tokens,
            cp=attempt.counted_prompt_tokens,
            cc=attempt.counted_completion_tokens,
            finish=attempt.finish_reason,
            aborted=attempt.aborted,
            cost=attempt.cost_usd,
        )


def _insert_sections(conn: Connection, job_id: int, outline: list[OutlineItem]) -> None:
    for idx, item in enumerate(outline):
        conn.run(
            "INSERT INTO sections (job_id, idx, title, brief) VALUES (:j, :i, :title, :brief)",
            j=job_id,
            i=idx,
            title=item.title,
            brief=item.brief,
        )


def _check_fence(conn: Connection, lease: Lease) -> None:
    """Inside a transaction: hold the job row against a takeover, and check we still own it.
    `acquire_lease` needs the row exclusively, so it waits until this write has committed."""
    row = conn.row(
        "SELECT 1 AS held FROM jobs WHERE id = :j AND lease_version = :v AND lease_owner = :owner FOR SHARE",
        j=lease.job_id,
        v=lease.version,
        owner=lease.owner,
    )
    if row is None:
        raise LeaseLost(f"Job {lease.external_id}: lease version {lease.version} is no longer held by {lease.owner}")


def _refusal(verb: str, job: Job) -> str:
    hints = {
        "start": "only a created job can be started" + (" (use resume for a paused job)" if job.status == JobStatus.PAUSED else ""),
        "pause": "only a queued or running job can be paused",
        "resume": "only a paused job can be resumed",
        "cancel": "a finished job cannot be cancelled",
        "retry": "only a failed job can be retried",
    }
    return f"Cannot {verb} job {job.external_id}: it is {job.status.value}; {hints[verb]}."
