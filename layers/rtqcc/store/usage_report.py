"""A tenant's usage over a range of UTC days, for billing (`GET /usage`): its jobs' calls, billed as
reported, else counted (attempts.py), plus the usage its deleted jobs left in `deleted_usage`."""

from __future__ import annotations

from datetime import date

from .attempts import BILLED_COMPLETION, BILLED_PROMPT
from .db import Database, Row

# What each grouping groups by, over live calls (a) and over deleted jobs' sums (d).
_KEYS = {
    "day": ("(a.created_at AT TIME ZONE 'UTC')::date::text", "d.day::text"),
    "model": ("a.model", "d.model"),
    "total": ("'total'", "'total'"),
}
_FIGURES = ("attempts", "prompt_tokens", "completion_tokens", "reported_prompt_tokens", "reported_completion_tokens",
            "counted_prompt_tokens", "counted_completion_tokens", "estimated_attempts", "cost_usd",
            "unpriced_attempts", "jobs", "deleted_jobs")


def usage_between(db: Database, tenant: str, first: date, last: date, group_by: str) -> list[Row]:
    """One row per group (`day`, `model` or `total`), `key` naming it, ordered by it; days
    without calls are absent."""
    live_key, gone_key = _KEYS[group_by]
    sums = ", ".join(f"SUM({name})::{'float8' if name == 'cost_usd' else 'bigint'} AS {name}" for name in _FIGURES)
    return db.rows(
        f"SELECT key, {sums} FROM ("
        f" SELECT {live_key} AS key, COUNT(*) AS attempts, SUM({BILLED_PROMPT}) AS prompt_tokens,"
        f" SUM({BILLED_COMPLETION}) AS completion_tokens,"
        " COALESCE(SUM(a.reported_prompt_tokens), 0) AS reported_prompt_tokens,"
        " COALESCE(SUM(a.reported_completion_tokens), 0) AS reported_completion_tokens,"
        " SUM(a.counted_prompt_tokens) AS counted_prompt_tokens,"
        " SUM(a.counted_completion_tokens) AS counted_completion_tokens,"
        " COUNT(*) FILTER (WHERE a.reported_prompt_tokens IS NULL OR a.reported_completion_tokens IS NULL)"
        " AS estimated_attempts, COALESCE(SUM(a.cost_usd), 0) AS cost_usd,"
        " COUNT(*) FILTER (WHERE a.cost_usd IS NULL) AS unpriced_attempts,"
        " COUNT(DISTINCT a.job_id) AS jobs, 0 AS deleted_jobs"
        " FROM generation_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.tenant = :t"
        " AND a.created_at >= CAST(:first AS date)::timestamp AT TIME ZONE 'UTC'"
        " AND a.created_at < (CAST(:last AS date) + 1)::timestamp AT TIME ZONE 'UTC'"
        " GROUP BY 1"
        " UNION ALL"
        f" SELECT {gone_key}, SUM(d.attempts), SUM(d.billed_prompt_tokens), SUM(d.billed_completion_tokens),"
        " SUM(d.reported_prompt_tokens), SUM(d.reported_completion_tokens), SUM(d.counted_prompt_tokens),"
        " SUM(d.counted_completion_tokens), SUM(d.estimated_attempts), SUM(d.cost_usd), SUM(d.unpriced_attempts),"
        " SUM(d.jobs), SUM(d.jobs)"
        " FROM deleted_usage d WHERE d.tenant = :t AND d.day BETWEEN CAST(:first AS date) AND CAST(:last AS date)"
        " GROUP BY 1"
        ") AS parts GROUP BY key ORDER BY key",
        t=tenant, first=first.isoformat(), last=last.isoformat())
