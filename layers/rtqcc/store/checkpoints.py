"""Each consumer's own checkpoint: its last stream position and running counters, written at the
end of every invocation (an operator's view of who drained what)."""

from __future__ import annotations

from .db import Database


class ConsumerCheckpoints:
    def __init__(self, db: Database):
        self.db = db

    def record(self, consumer: str, *, last_id: str | None, processed: int, requeued: int, failed: int) -> None:
        self.db.run(
            "INSERT INTO consumer_checkpoints AS c (consumer_name, last_stream_id, invocations, processed,"
            " requeued, failed) VALUES (:n, :last, 1, :processed, :requeued, :failed)"
            " ON CONFLICT (consumer_name) DO UPDATE SET"
            " last_stream_id = COALESCE(EXCLUDED.last_stream_id, c.last_stream_id),"
            " invocations = c.invocations + 1, processed = c.processed + EXCLUDED.processed,"
            " requeued = c.requeued + EXCLUDED.requeued, failed = c.failed + EXCLUDED.failed, updated_at = now()",
            n=consumer, last=last_id, processed=processed, requeued=requeued, failed=failed,
        )
