"""Short-lived signed tokens that let a browser open one job's event stream: EventSource cannot
send an Authorization header, and an API key must not travel in a URL.

A token is `payload.signature`, the payload naming the signing key (`k`, so the secret can be
rotated), the tenant, the job, the issuing API key (`a`, so revoking the key kills its tokens)
and the expiry. The secret is random and configured on its own (RTQCC_STREAM_TOKEN_SECRET):
never derived from API keys, which every key holder would then be able to recompute."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from dataclasses import dataclass

from ..errors import ConfigError, Unauthorized
from ..settings import Settings

TOKEN_TTL_S = 300


@dataclass(frozen=True)
class SigningKey:
    kid: str  # names the secret in the token; a digest, not the secret
    secret: bytes

    @classmethod
    def of(cls, secret: str) -> "SigningKey":
        raw = secret.encode()
        return cls(hashlib.sha256(b"rtqcc stream token key id\n" + raw).hexdigest()[:12], raw)


@dataclass(frozen=True)
class SigningKeys:
    """The key tokens are signed with, and the keys they are still accepted under."""

    current: SigningKey
    previous: tuple[SigningKey, ...] = ()

    @classmethod
    def from_settings(cls, settings: Settings) -> "SigningKeys":
        if not settings.stream_token_secret:
            raise ConfigError("RTQCC_STREAM_TOKEN_SECRET is not set, so no stream token can be issued or checked")
        previous = (SigningKey.of(settings.stream_token_previous_secret),) if settings.stream_token_previous_secret else ()
        return cls(SigningKey.of(settings.stream_token_secret), previous)

    def find(self, kid: object) -> SigningKey | None:
        return next((key for key in (self.current, *self.previous) if key.kid == kid), None)


@dataclass(frozen=True)
class StreamGrant:
    """What a genuine token grants: one job's stream, for a tenant, on behalf of one API key."""

    tenant: str
    external_id: str
    key_ref: str


def issue(keys: SigningKeys, grant: StreamGrant, *, ttl_s: int = TOKEN_TTL_S, now: float | None = None) -> str:
    claims = {"k": keys.current.kid, "t": grant.tenant, "j": grant.external_id, "a": grant.key_ref,
              "exp": int((time.time() if now is None else now) + ttl_s)}
    payload = json.dumps(claims, separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(_sign(keys.current.secret, payload))}"


def verify(keys: SigningKeys, token: str, external_id: str, *, now: float | None = None) -> StreamGrant:
    """The grant of a genuine, unexpired token for this job; Unauthorized otherwise. Whether the
    issuing key is still live is the caller's to check (it needs the key store)."""
    claims = _genuine_claims(keys, token)
    if claims is None or claims.get("j") != external_id:
        raise Unauthorized("This stream token is not valid for this job; ask for a new one.")
    expires = claims.get("exp")
    if not isinstance(expires, int) or expires < (time.time() if now is None else now):
        raise Unauthorized("This stream token has expired; ask for a new one.")
    tenant, key_ref = claims.get("t"), claims.get("a")
    if not isinstance(tenant, str) or not isinstance(key_ref, str):
        raise Unauthorized("This stream token is not valid for this job; ask for a new one.")
    return StreamGrant(tenant, external_id, key_ref)


def _genuine_claims(keys: SigningKeys, token: str) -> dict | None:
    encoded, _, signature = token.partition(".")
    try:
        payload = _unb64(encoded)
        claims = json.loads(payload)
        key = keys.find(claims.get("k")) if isinstance(claims, dict) else None
        if key is None or not hmac.compare_digest(_unb64(signature), _sign(key.secret, payload)):
            return None
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return claims


def _sign(secret: bytes, payload: bytes) -> bytes:
    return hmac.new(secret, payload, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text.encode("ascii") + b"=" * (-len(text) % 4))
