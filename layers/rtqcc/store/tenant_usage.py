"""A tenant's standing in Postgres, the SQL behind writing/quotas.py: its quota overrides
(`tenant_quotas`), what it spent today (from the attempts, billed as reported, else counted), how
many of its jobs are queued or running, and the per-tenant lock its admissions queue behind."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Sequence

from .attempts import billed_tokens_sql
from .db import Connection, Database, Row

# pg_advisory_xact_lock(namespace, hashtext(tenant)): a tenant's admissions queue behind each other
# (two tenants whose names hash alike merely share a queue). The migration lock uses the one-key
# form, a separate space.
_ADMISSION_LOCK = 0x5154_4F54
ACTIVE_STATUSES = ("queued", "running")


class TenantUsage:
    def __init__(self, db: Database):
        self.db = db

    def standing_row(self, tenant: str, override_columns: Sequence[str], conn: Connection | None = None, *,
                     measure: bool, count_active: bool, excluding: str | None) -> Row:
        """One query: the tenant's overrides (NULL where none), its spend today (measured when
        `measure` or when its overrides set a daily quota), when today ends (UTC), and with
        `count_active` its queued or running jobs but `excluding`."""
        overrides = ", ".join(f"q.{name}" for name in override_columns)
        row = (conn or self.db).row(
            f"SELECT {overrides}, day.start + interval '1 day' AS resets_at,"
            " EXTRACT(EPOCH FROM day.start + interval '1 day' - now())::float8 AS resets_in_s,"
            # Its deleted jobs' usage counts too (deleted_usage): deleting a job gives no quota back.
            " spend.tokens + gone.tokens AS tokens, spend.cost_usd + gone.cost_usd AS cost_usd,"
            " CASE WHEN :count_active THEN (SELECT COUNT(*) FROM jobs WHERE tenant = :t"
            "  AND status = ANY(CAST(:active AS text[]))"
            "  AND (CAST(:excluding AS text) IS NULL OR external_id <> :excluding))"
            " END::int AS active_now"
            " FROM (SELECT date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC' AS start) AS day"
            " LEFT JOIN tenant_quotas q ON q.tenant = :t"
            f" CROSS JOIN LATERAL (SELECT COALESCE(SUM({billed_tokens_sql('prompt', 'a')}"
            f"  + {billed_tokens_sql('completion', 'a')}), 0)::bigint AS tokens,"
            "  COALESCE(SUM(a.cost_usd), 0)::float8 AS cost_usd"
            "  FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
            # Only outer values: Postgres checks it once (a one-time filter) and skips the scan when false.
            "  WHERE (:measure OR q.tokens_per_day IS NOT NULL OR q.cost_usd_per_day IS NOT NULL)"
            "  AND j.tenant = :t AND a.created_at >= day.start) AS spend"
            " CROSS JOIN LATERAL (SELECT COALESCE(SUM(d.billed_prompt_tokens + d.billed_completion_tokens), 0)::bigint"
            "  AS tokens, COALESCE(SUM(d.cost_usd), 0)::float8 AS cost_usd FROM deleted_usage d"
            "  WHERE (:measure OR q.tokens_per_day IS NOT NULL OR q.cost_usd_per_day IS NOT NULL)"
            "  AND d.tenant = :t AND d.day = (day.start AT TIME ZONE 'UTC')::date) AS gone",
            t=tenant, measure=measure, count_active=count_active, active=list(ACTIVE_STATUSES), excluding=excluding)
        assert row is not None
        return row

    @contextmanager
    def admission(self, tenant: str, external_id: str) -> Iterator[tuple[Connection, Row | None]]:
        """A transaction holding the tenant's admission lock, with the job's status and model."""
        with self.db.transaction() as conn:
            conn.run("SELECT pg_advisory_xact_lock(:ns, hashtext(:t))", ns=_ADMISSION_LOCK, t=tenant)
            yield conn, conn.row("SELECT status, model FROM jobs WHERE external_id = :e AND tenant = :t",
                                 e=external_id, t=tenant)
