"""Deleting jobs, the SQL side: the mark that hides a job at once and fences off its consumer, who
else still uses the objects it names, the removal of its rows with its usage kept (job-less) for
billing, and the jobs retention says are due. The steps in order: run/deletion.py."""

from __future__ import annotations

from dataclasses import dataclass

from ..status import JobStatus
from .attempts import BILLED_COMPLETION, BILLED_PROMPT
from .db import Database

FINISHED = ("completed", "failed", "cancelled")


@dataclass(frozen=True)
class Doomed:
    """A job marked `deleting`."""

    id: int
    external_id: str
    tenant: str
    was: JobStatus           # its status before the mark (DELETING when it was marked already)
    consumer_gone: bool      # no consumer can still write it: its lease was free or has expired


# Its usage, per UTC day and model, added to what the tenant's deleted jobs used before.
_KEEP_USAGE = (
    "INSERT INTO deleted_usage AS d (tenant, day, model, jobs, attempts, billed_prompt_tokens,"
    " billed_completion_tokens, reported_prompt_tokens, reported_completion_tokens, counted_prompt_tokens,"
    " counted_completion_tokens, estimated_attempts, cost_usd, unpriced_attempts)"
    " SELECT j.tenant, (a.created_at AT TIME ZONE 'UTC')::date, a.model, 1, COUNT(*),"
    f" SUM({BILLED_PROMPT}), SUM({BILLED_COMPLETION}),"
    " COALESCE(SUM(a.reported_prompt_tokens), 0), COALESCE(SUM(a.reported_completion_tokens), 0),"
    " SUM(a.counted_prompt_tokens), SUM(a.counted_completion_tokens),"
    " COUNT(*) FILTER (WHERE a.reported_prompt_tokens IS NULL OR a.reported_completion_tokens IS NULL),"
    " COALESCE(SUM(a.cost_usd), 0),"
    " COUNT(*) FILTER (WHERE a.cost_usd IS NULL)"
    " FROM generation_attempts a JOIN jobs j ON j.id = a.job_id WHERE a.job_id = :j"
    " GROUP BY j.tenant, 2, a.model"
    " ON CONFLICT (tenant, day, model) DO UPDATE SET jobs = d.jobs + EXCLUDED.jobs,"
    " attempts = d.attempts + EXCLUDED.attempts,"
    " billed_prompt_tokens = d.billed_prompt_tokens + EXCLUDED.billed_prompt_tokens,"
    " billed_completion_tokens = d.billed_completion_tokens + EXCLUDED.billed_completion_tokens,"
    " reported_prompt_tokens = d.reported_prompt_tokens + EXCLUDED.reported_prompt_tokens,"
    " reported_completion_tokens = d.reported_completion_tokens + EXCLUDED.reported_completion_tokens,"
    " counted_prompt_tokens = d.counted_prompt_tokens + EXCLUDED.counted_prompt_tokens,"
    " counted_completion_tokens = d.counted_completion_tokens + EXCLUDED.counted_completion_tokens,"
    " estimated_attempts = d.estimated_attempts + EXCLUDED.estimated_attempts, cost_usd = d.cost_usd + EXCLUDED.cost_usd, unpriced_attempts = d.unpriced_attempts + EXCLUDED.unpriced_attempts"
)


class JobDeletions:
    def __init__(self, db: Database):
        self.db = db

    def mark(self, tenant: str, external_id: str) -> Doomed | None:
        """Mark the tenant's job `deleting` (again, if it was): from this statement on the API
        answers 404 for it, no consumer can take its lease, and the one running it (if any) can
        write nothing more: its lease version moves on, so its fenced writes raise LeaseLost and
        its next renewal aborts the run. The lease's expiry is kept: until then that consumer may
        still be stopping. None: the tenant has no such job."""
        row = self.db.row(
            "WITH before AS (SELECT id, status FROM jobs WHERE external_id = :e AND tenant = :t FOR UPDATE)"
            " UPDATE jobs SET status = 'deleting', updated_at = now(),"
            " lease_version = jobs.lease_version + CASE WHEN before.status = 'deleting' THEN 0 ELSE 1 END"
            " FROM before WHERE jobs.id = before.id"
            " RETURNING jobs.id, jobs.external_id, jobs.tenant, before.status AS was,"
            " (jobs.lease_owner IS NULL OR jobs.lease_expires_at < now()) AS consumer_gone",
            e=external_id, t=tenant)
        if row is None:
            return None
        return Doomed(id=row["id"], external_id=row["external_id"], tenant=row["tenant"],
                      was=JobStatus(row["was"]), consumer_gone=bool(row["consumer_gone"]))

    def keys_named(self, job_id: int) -> set[str]:
        """Every object key the job's rows name: its own, and those a fork shares with its source."""
        rows = self.db.rows(
            "SELECT content_key AS key FROM section_versions WHERE job_id = :j"
            " UNION SELECT content_key FROM sections WHERE job_id = :j AND content_key IS NOT NULL"
            " UNION SELECT manuscript_key FROM jobs WHERE id = :j AND manuscript_key IS NOT NULL", j=job_id)
        return {row["key"] for row in rows}

    def keys_used_by_others(self, job_id: int, keys: list[str]) -> set[str]:
        """Which of `keys` another job still names (a fork shares its source's objects)."""
        if not keys:
            return set()
        rows = self.db.rows(
            "SELECT content_key AS key FROM section_versions WHERE job_id <> :j AND content_key = ANY(CAST(:k AS text[]))"
            " UNION SELECT content_key FROM sections WHERE job_id <> :j AND content_key = ANY(CAST(:k AS text[]))"
            " UNION SELECT manuscript_key FROM jobs WHERE id <> :j AND manuscript_key = ANY(CAST(:k AS text[]))",
            j=job_id, k=keys)
        return {row["key"] for row in rows}

    def existing(self, external_ids: list[str]) -> set[str]:
        """Which of these jobs still have a row (being deleted or not)."""
        if not external_ids:
            return set()
        rows = self.db.rows("SELECT external_id FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))",
                            e=external_ids)
        return {row["external_id"] for row in rows}

    def remove(self, job_id: int) -> bool:
        """The last step, in one transaction: the job's usage added to `deleted_usage`, the stored
        answers of requests that name it and the webhook deliveries about it dropped, and its row
        deleted with every row that references it (sections, versions, attempts, its own webhook
        endpoint: ON DELETE CASCADE). False when it was gone."""
        with self.db.transaction() as conn:
            job = conn.row("SELECT tenant, external_id FROM jobs WHERE id = :j AND status = 'deleting' FOR UPDATE",
                           j=job_id)
            if job is None:
                return False
            conn.run(_KEEP_USAGE, j=job_id)
            conn.run("DELETE FROM idempotency_keys WHERE tenant = :t AND response_body ->> 'externalId' = :e",
                     t=job["tenant"], e=job["external_id"])
            # Deliveries about it to the tenant's endpoints carry its id and events: they go too
            # (those of its own endpoint go with the job row, by cascade).
            conn.run("DELETE FROM webhook_deliveries WHERE job_external_id = :e", e=job["external_id"])
            conn.run("DELETE FROM jobs WHERE id = :j", j=job_id)
        return True

    def due(self, *, default_days: int | None, limit: int) -> list[tuple[str, str]]:
        """(tenant, externalId) of up to `limit` jobs to delete now: those whose deletion was left
        half-done (a crash, or a consumer that was still stopping), then finished jobs older than
        their tenant's retention (tenant_quotas.retention_days, else `default_days`; 0 or neither:
        kept), the oldest first."""
        rows = self.db.rows(
            "(SELECT tenant, external_id FROM jobs WHERE status = 'deleting'"
            "  AND (lease_owner IS NULL OR lease_expires_at < now()) ORDER BY id LIMIT :n)"
            " UNION ALL"
            " (SELECT j.tenant, j.external_id FROM jobs j LEFT JOIN tenant_quotas q ON q.tenant = j.tenant"
            "  WHERE j.status = ANY(CAST(:finished AS text[])) AND COALESCE(q.retention_days, CAST(:days AS int)) > 0"
            "  AND j.finished_at < now() - make_interval(days => COALESCE(q.retention_days, CAST(:days AS int)))"
            "  ORDER BY j.finished_at LIMIT :n)"
            " LIMIT :n",
            n=limit, days=default_days, finished=list(FINISHED))
        return [(row["tenant"], row["external_id"]) for row in rows]
