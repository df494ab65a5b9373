"""`Idempotency-Key` for unsafe requests: the same key and body get the stored answer, the same
key with another body is refused, and concurrent duplicates do the work once."""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from .db import Database
from ..errors import BadRequest, InvalidTransition, ValidationFailed

MAX_KEY_CHARS = 255


@dataclass(frozen=True)
class Answer:
    status: int
    body: Any
    replayed: bool = False


def fingerprint(method: str, path: str, body: bytes) -> str:
    try:  # the same JSON written differently is the same request
        canonical = json.dumps(json.loads(body), sort_keys=True, separators=(",", ":")).encode()
    except (ValueError, UnicodeDecodeError, RecursionError):
        canonical = body
    return hashlib.sha256(method.encode() + b" " + path.encode() + b"\n" + canonical).hexdigest()


def check_key(key: str) -> str:
    key = key.strip()
    if not key or len(key) > MAX_KEY_CHARS or not key.isprintable():
        raise BadRequest(f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} printable characters.")
    return key


class IdempotencyStore:
    def __init__(self, db: Database, *, in_progress_ttl_s: float = 60.0, wait_s: float = 10.0, poll_s: float = 0.05,
                 clock=time.monotonic, sleep=time.sleep):
        self.db = db
        # A claim older than this with no answer is a request that died mid-way (a killed
        # function): it no longer holds the key, so the client's retry does the work.
        self.in_progress_ttl_s = in_progress_ttl_s
        self.wait_s = wait_s
        self.poll_s = poll_s
        self.clock = clock
        self.sleep = sleep

    def run(self, tenant: str, key: str, request_hash: str, action: Callable[[], Answer]) -> Answer:
        deadline = self.clock() + self.wait_s
        while True:
            claimed = self.db.row(
                "INSERT INTO idempotency_keys (tenant, key, request_hash) VALUES (:t, :k, :h)"
                " ON CONFLICT DO NOTHING RETURNING 1 AS claimed", t=tenant, k=key, h=request_hash)
            if claimed:
                return self._first(tenant, key, action)
            row = self.db.row("SELECT request_hash, response_status, response_body FROM idempotency_keys"
                              " WHERE tenant = :t AND key = :k", t=tenant, k=key)
            if row is None:
                continue  # the first request failed and let the key go: this one takes it
            if row["request_hash"] != request_hash:
                raise ValidationFailed("This Idempotency-Key was already used with a different request; "
                                       "use a new key for a new request.")
            if row["response_status"] is not None:
                return Answer(row["response_status"], row["response_body"], replayed=True)
            if self._free_if_abandoned(tenant, key):
                continue
            if self.clock() >= deadline:
                raise InvalidTransition("A request with this Idempotency-Key is still being handled; retry shortly.")
            self.sleep(self.poll_s)

    def _free_if_abandoned(self, tenant: str, key: str) -> bool:
        return self.db.run("DELETE FROM idempotency_keys WHERE tenant = :t AND key = :k AND response_status IS NULL"
                           " AND created_at < now() - make_interval(secs => :ttl)",
                           t=tenant, k=key, ttl=float(self.in_progress_ttl_s)) == 1

    def _first(self, tenant: str, key: str, action: Callable[[], Answer]) -> Answer:
        try:
            answer = action()
        except BaseException:
            # Nothing to replay: free the key so the client's retry can do the work.
            self.db.run("DELETE FROM idempotency_keys WHERE tenant = :t AND key = :k", t=tenant, k=key)
            raise
        self.db.run("UPDATE idempotency_keys SET response_status = :s, response_body = CAST(:b AS jsonb)"
                    " WHERE tenant = :t AND key = :k", s=answer.status, b=json.dumps(answer.body), t=tenant, k=key)
        return answer

    def forget_older_than(self, age_s: float) -> int:
        return self.db.run("DELETE FROM idempotency_keys WHERE created_at < now() - make_interval(secs => :a)",
                           a=float(age_s))
