"""Who is calling: bearer API keys, each mapped to a tenant: keys from settings (development,
bootstrap) and keys created with `rtqcc keys create`, stored hashed in Postgres. Failed attempts
are throttled per client address before any lookup."""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from ..store.api_keys import ApiKeyStore, key_ref
from ..errors import Unauthorized
from .rate_limit import FailedAuthThrottle

_CHALLENGE = {"WWW-Authenticate": "Bearer"}


@dataclass(frozen=True)
class Caller:
    tenant: str
    key_ref: str  # names the API key used, without being it
    tier: str | None = None  # the key's tier: its tenant's cap on running jobs (RTQCC_TIER_MAX_RUNNING)


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>'.", headers=_CHALLENGE)
    return token.strip()


class Authenticator:
    def __init__(self, configured_keys: dict[str, str], store: ApiKeyStore | None,
                 throttle: FailedAuthThrottle | None = None, configured_tiers: dict[str, str] | None = None):
        self.configured_keys = configured_keys
        self.configured_tiers = configured_tiers or {}
        self.configured_refs = {key_ref(key): tenant for key, tenant in configured_keys.items()}
        self.store = store
        self.throttle = throttle

    def caller(self, authorization: str | None, client: str) -> Caller:
        """The caller an Authorization header proves, or Unauthorized (counted against `client`)."""
        if self.throttle is not None:
            self.throttle.check(client)
        try:
            return self._caller(bearer_token(authorization))
        except Unauthorized:
            if self.throttle is not None:
                self.throttle.record_failure(client)
            raise

    def _caller(self, token: str) -> Caller:
        for key, tenant in self.configured_keys.items():
            if hmac.compare_digest(key.encode(), token.encode()):
                return Caller(tenant, key_ref(key), self.configured_tiers.get(key))
        owner = self.store.owner_of(token) if self.store is not None else None
        if owner is None:
            raise Unauthorized("That API key is not valid.", headers=_CHALLENGE)
        return Caller(owner.tenant, key_ref(token), owner.tier)

    def is_live(self, caller: Caller) -> bool:
        """The key named by `caller.key_ref` still exists, is not revoked, and is the tenant's."""
        if self.configured_refs.get(caller.key_ref) == caller.tenant:
            return True
        return self.store is not None and self.store.tenant_for_ref(caller.key_ref) == caller.tenant
