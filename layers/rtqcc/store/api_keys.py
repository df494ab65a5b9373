"""API keys stored in Postgres as SHA-256 hashes, each naming its tenant."""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass

from .db import Database

KEY_PREFIX = "rtq_"
KEY_REF_CHARS = 16  # the start of the hash that names a key in `rtqcc keys list` and in stream tokens
_HEX = re.compile(r"[0-9a-f]+\Z")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_ref(key: str) -> str:
    return hash_key(key)[:KEY_REF_CHARS]


class AmbiguousKeyPrefix(ValueError):
    """A revocation prefix that names no key, or more than one."""


@dataclass(frozen=True)
class IssuedKey:
    key: str  # shown once; only its hash is stored
    tenant: str
    key_hash: str
    tier: str | None = None


@dataclass(frozen=True)
class KeyOwner:
    tenant: str
    tier: str | None


class ApiKeyStore:
    def __init__(self, db: Database, *, cache_ttl_s: float = 30.0, clock=time.monotonic):
        self.db = db
        self.cache_ttl_s = cache_ttl_s
        self.clock = clock
        self._cache: dict[str, tuple[float, KeyOwner | None]] = {}

    def create(self, tenant: str, label: str = "", tier: str | None = None) -> IssuedKey:
        key = KEY_PREFIX + secrets.token_urlsafe(32)
        digest = hash_key(key)
        self.db.run("INSERT INTO api_keys (key_hash, tenant, label, tier) VALUES (:h, :t, :l, :tier)",
                    h=digest, t=tenant, l=label, tier=tier)
        return IssuedKey(key=key, tenant=tenant, key_hash=digest, tier=tier)

    def revoke(self, key_hash_prefix: str) -> int:
        """Revoke the one live key whose hash starts with this (compared as text: no pattern)."""
        prefix = key_hash_prefix.strip().lower()
        if len(prefix) < 8 or not _HEX.match(prefix):
            raise AmbiguousKeyPrefix("give at least 8 hexadecimal characters of the key's hash "
                                     "(as `rtqcc keys list` shows it)")
        with self.db.transaction() as tx:
            matches = tx.rows("SELECT key_hash FROM api_keys WHERE left(key_hash, :n) = :p AND revoked_at IS NULL"
                              " FOR UPDATE", n=len(prefix), p=prefix)
            if len(matches) > 1:
                raise AmbiguousKeyPrefix(f"{prefix} starts the hash of {len(matches)} live keys; give more characters")
            if not matches:
                return 0
            return tx.run("UPDATE api_keys SET revoked_at = now() WHERE key_hash = :h", h=matches[0]["key_hash"])

    def list(self) -> list[dict]:
        return self.db.rows("SELECT key_hash, tenant, label, tier, created_at, revoked_at FROM api_keys"
                            " ORDER BY created_at")

    def owner_of(self, key: str) -> KeyOwner | None:
        """The tenant (and tier) of a live key, cached briefly per warm container (a revocation
        takes effect within `cache_ttl_s`)."""
        return self._owner(key_ref(key), digest=hash_key(key))

    def tenant_for(self, key: str) -> str | None:
        owner = self.owner_of(key)
        return owner.tenant if owner else None

    def tenant_for_ref(self, ref: str) -> str | None:
        """The tenant of the live key this ref names."""
        owner = self._owner(ref)
        return owner.tenant if owner else None

    def _owner(self, ref: str, *, digest: str | None = None) -> KeyOwner | None:
        cache_key = digest or ref
        cached = self._cache.get(cache_key)
        now = self.clock()
        if cached and now - cached[0] < self.cache_ttl_s:
            return cached[1]
        if digest is not None:
            row = self.db.row("SELECT tenant, tier FROM api_keys WHERE key_hash = :h AND revoked_at IS NULL", h=digest)
        else:
            row = self.db.row("SELECT tenant, tier FROM api_keys WHERE left(key_hash, :n) = :r AND revoked_at IS NULL",
                              n=KEY_REF_CHARS, r=ref)
        owner = KeyOwner(row["tenant"], row["tier"]) if row else None
        if len(self._cache) > 10_000:
            self._cache.clear()
        self._cache[cache_key] = (now, owner)
        return owner
