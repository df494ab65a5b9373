"""API keys stored in Postgres as SHA-256 hashes, each naming its tenant."""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass

from .db import Database

KEY_PREFIX = "rtq_"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once; only its hash is stored
    tenant: str
    key_hash: str


class ApiKeyStore:
    def __init__(self, db: Database, *, cache_ttl_s: float = 30.0, clock=time.monotonic):
        self.db = db
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, str | None]] = {}

    def create(self, tenant: str, label: str = "") -> IssuedKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        self.db.run("INSERT INTO api_keys (key_hash, tenant, label) VALUES (:h, :t, :l)", h=digest, t=tenant, l=label)
        return IssuedKey(key=key, tenant=tenant, key_hash=digest)

    def revoke(self, key_hash_prefix: str) -> int:
        if len(key_hash_prefix) < 8:
            raise ValueError("give at least 8 characters of the key's hash")
        return self.db.run("UPDATE api_keys SET revoked_at = now() WHERE key_hash LIKE :p AND revoked_at IS NULL",
                           p=key_hash_prefix + "%")

    def list(self) -> list[dict]:
        return self.db.rows("SELECT key_hash, tenant, label, created_at, revoked_at FROM api_keys ORDER BY created_at")

    def tenant_for(self, key: str) -> str | None:
        """The tenant of a live key, cached briefly per warm container (a revocation takes effect
        within `cache_ttl_s`)."""
        digest = hash_key(key)
        cached = self._cache.get(digest)
        now = self.clock()
        if cached and now - cached[0] < self.cache_ttl_s:
            return cached[1]
        row = self.db.row("SELECT tenant FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL", h=digest)
        tenant = row["tenant"] if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[digest] = (now, tenant)
        return tenant
