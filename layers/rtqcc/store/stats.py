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
