"""Generation attempts: one row per provider call, each paid for, with the provider's reported
tokens beside our own count, and what they cost. Not fenced: tokens spent are a fact whoever
holds the lease."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Iterable

from .db import Database, Row


# "Reported, else counted": what a call is billed, in tokens. The one home of the rule, for every
# query that sums tokens (`alias` names the table of generation_attempts in the query).
def billed_tokens_sql(kind: str, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return f"COALESCE({prefix}reported_{kind}_tokens, {prefix}counted_{kind}_tokens)"


BILLED_PROMPT = billed_tokens_sql("prompt")
BILLED_COMPLETION = billed_tokens_sql("completion")

# One section's usage (or the outline step's) summed over rows of generation_attempts: what
# public_usage() shows.
USAGE_COLUMNS = (
    f"SUM({BILLED_PROMPT})::int AS prompt_tokens,"
    f" SUM({BILLED_COMPLETION})::int AS completion_tokens,"
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
)
ATTEMPT_COLUMNS = ("section_idx, model, reported_prompt_tokens, reported_completion_tokens, counted_prompt_tokens,"
                   " counted_completion_tokens, finish_reason, aborted, cost_usd, section_version, purpose")
# Attempts of job :j from :attempts (attempts_json), as one statement whatever their number.
INSERT_ATTEMPTS = (
    f"INSERT INTO generation_attempts (job_id, {ATTEMPT_COLUMNS}) SELECT :j, {ATTEMPT_COLUMNS}"
    " FROM jsonb_to_recordset(CAST(:attempts AS jsonb)) AS a(section_idx int, model text,"
    " reported_prompt_tokens int, reported_completion_tokens int, counted_prompt_tokens int,"
    " counted_completion_tokens int, finish_reason text, aborted text, cost_usd float8, section_version int,"
    " purpose text)"
)


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
    section_version: int | None = None  # the version of the section it was paid for (None: the outline)
    purpose: str = "draft"  # outline, draft, continuation (a section short of its target) or summary

    @property
    def billed_prompt_tokens(self) -> int:
        return self.reported_prompt_tokens if self.reported_prompt_tokens is not None else self.counted_prompt_tokens

    @property
    def billed_completion_tokens(self) -> int:
        return (self.reported_completion_tokens if self.reported_completion_tokens is not None
                else self.counted_completion_tokens)


def billed_total(attempts: Iterable[Attempt]) -> tuple[int, float | None]:
    """Billed tokens of `attempts` and their cost (None if any had no price): what spent() sums."""
    tokens, cost = 0, 0.0
    for attempt in attempts:
        tokens += attempt.billed_prompt_tokens + attempt.billed_completion_tokens
        cost = None if cost is None or attempt.cost_usd is None else cost + attempt.cost_usd
    return tokens, cost


def attempts_json(attempts: list[Attempt]) -> str:
    # Its fields are plain values: its __dict__ as it is, without asdict's deep copy.
    return json.dumps([vars(attempt) for attempt in attempts])


class AttemptLedger:
    """The attempts of jobs: recorded as calls end, summed for usage and budgets."""

    db: Database

    def record_attempts(self, job_id: int, attempts: list[Attempt]) -> None:
        """Record calls in one statement (outline calls, and calls of a run stopped mid-section;
        a completed section's go with it: `complete_section`)."""
        if attempts:
            self.db.run(INSERT_ATTEMPTS, j=job_id, attempts=attempts_json(attempts))

    def usage_by_section(self, job_id: int) -> dict[int | None, Row]:
        """Billed tokens per section (None: the outline step), summed over every attempt."""
        rows = self.db.rows(f"SELECT section_idx, {USAGE_COLUMNS} FROM generation_attempts WHERE job_id = :j"
                            " GROUP BY section_idx", j=job_id)
        return {row["section_idx"]: row for row in rows}

    def list_figures(self, job_ids: list[int]) -> dict[int, Row]:
        """For a page of jobs, in one statement: their sections (all, done) and billed tokens and
        cost (None if any call is unpriced), what a jobs list shows beside each."""
        rows = self.db.rows(
            "SELECT j.id,"
            " (SELECT COUNT(*) FROM sections s WHERE s.job_id = j.id)::int AS sections_total,"
            " (SELECT COUNT(*) FROM sections s WHERE s.job_id = j.id AND s.status = 'done')::int AS sections_done,"
            f" COALESCE(SUM({billed_tokens_sql('prompt', 'a')} + {billed_tokens_sql('completion', 'a')}), 0)::bigint"
            " AS total_tokens,"
            " CASE WHEN BOOL_OR(a.job_id IS NOT NULL AND a.cost_usd IS NULL) THEN NULL"
            " ELSE COALESCE(SUM(a.cost_usd), 0) END AS cost_usd"
            # From the ids, not the jobs table: the page's rows are already read, and a join with
            # jobs may be planned as a scan of the whole table.
            " FROM unnest(CAST(:ids AS bigint[])) AS j(id) LEFT JOIN generation_attempts a ON a.job_id = j.id"
            " GROUP BY j.id",
            ids=list(job_ids),
        )
        return {row["id"]: row for row in rows}

    def spent(self, job_id: int) -> tuple[int, float | None]:
        """Billed tokens of every attempt of the job, and their cost (None if any is unpriced)."""
        row = self.db.row(
            f"SELECT COALESCE(SUM({BILLED_PROMPT} + {BILLED_COMPLETION}), 0)::bigint AS tokens,"
            " CASE WHEN BOOL_OR(cost_usd IS NULL) THEN NULL ELSE COALESCE(SUM(cost_usd), 0) END AS cost_usd"
            " FROM generation_attempts WHERE job_id = :j",
            j=job_id,
        )
        assert row is not None
        return int(row["tokens"]), row["cost_usd"]
