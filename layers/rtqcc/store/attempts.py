"""Generation attempts: one row per provider call, each paid for, with the provider's reported
tokens beside our own count, and what they cost. Not fenced: tokens spent are a fact whoever
holds the lease."""

from __future__ import annotations

from dataclasses import dataclass

from .db import Database, Row


# "Reported, else counted": what a call is billed, in tokens. The one home of the rule, for every
# query that sums tokens (`alias` names the table of generation_attempts in the query).
def billed_tokens_sql(kind: str, alias: str = "") -> str:
    prefix = f"{alias}." if alias else ""
    return f"COALESCE({prefix}reported_{kind}_tokens, {prefix}counted_{kind}_tokens)"


BILLED_PROMPT = billed_tokens_sql("prompt")
BILLED_COMPLETION = billed_tokens_sql("completion")


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
    def billed_prompt_tokens(self) -> int:
        return self.reported_prompt_tokens if self.reported_prompt_tokens is not None else self.counted_prompt_tokens

    @property
    def billed_completion_tokens(self) -> int:
        return (self.reported_completion_tokens if self.reported_completion_tokens is not None
                else self.counted_completion_tokens)


class AttemptLedger:
    """The attempts of jobs: recorded as calls end, summed for usage and budgets."""

    db: Database

    def record_attempt(self, job_id: int, attempt: Attempt) -> None:
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

    def usage_by_section(self, job_id: int) -> dict[int | None, Row]:
        """Billed tokens per section (None: the outline step), summed over every attempt."""
        rows = self.db.rows(
            "SELECT section_idx,"
            f" SUM({BILLED_PROMPT})::int AS prompt_tokens,"
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
            " FROM generation_attempts WHERE job_id = :j GROUP BY section_idx",
            j=job_id,
        )
        return {row["section_idx"]: row for row in rows}

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
