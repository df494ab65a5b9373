"""What the whole deployment holds, for operators (metrics): counts across every tenant."""

from __future__ import annotations

from .attempts import BILLED_COMPLETION, BILLED_PROMPT
from .db import Database


class Stats:
    def __init__(self, db: Database):
        self.db = db

    def jobs_by_status(self) -> dict[str, int]:
        return {row["status"]: row["n"] for row in self.db.rows("SELECT status, COUNT(*)::int AS n FROM jobs GROUP BY status")}

    def sections_done_by_model(self) -> dict[str, int]:
        rows = self.db.rows("SELECT j.model, COUNT(*)::int AS n FROM sections x JOIN jobs j ON j.id = x.job_id"
                            " WHERE x.status = 'done' GROUP BY j.model")
        return {row["model"]: row["n"] for row in rows}

    def billed_tokens_by_model(self) -> dict[str, tuple[int, int]]:
        """model -> (prompt, completion) tokens billed over every attempt."""
        rows = self.db.rows(f"SELECT model, SUM({BILLED_PROMPT})::bigint AS prompt,"
                            f" SUM({BILLED_COMPLETION})::bigint AS completion FROM generation_attempts GROUP BY model")
        return {row["model"]: (row["prompt"] or 0, row["completion"] or 0) for row in rows}

    def running_by_consumer(self) -> dict[str, int]:
        """Jobs each consumer runs now under a live lease (consumers running none are absent)."""
        rows = self.db.rows("SELECT lease_owner, COUNT(*)::int AS n FROM jobs WHERE status = 'running'"
                            " AND lease_owner IS NOT NULL AND lease_expires_at > now() GROUP BY lease_owner")
        return {row["lease_owner"]: row["n"] for row in rows}

    def checkpoint_age_s(self) -> float | None:
        """Seconds since the most recent consumer checkpoint (None before any)."""
        row = self.db.row("SELECT EXTRACT(EPOCH FROM now() - MAX(updated_at))::float8 AS age FROM consumer_checkpoints")
        return row["age"] if row else None

    def waiting_by_tenant(self) -> dict[str, int]:
        """Queued jobs of each tenant (those waiting aside for its cap included)."""
        rows = self.db.rows("SELECT tenant, COUNT(*)::int AS n FROM jobs WHERE status = 'queued' GROUP BY tenant")
        return {row["tenant"]: row["n"] for row in rows}
