"""Short-lived signed tokens that let a browser open one job's event stream: EventSource cannot
send an Authorization header, and an API key must not travel in a URL."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time

from ..errors import Unauthorized

TOKEN_TTL_S = 300


def signing_key(secret: str | None, api_keys: dict[str, str]) -> bytes:
    """The configured secret, or one derived from the API keys so every stateless handler agrees
    on it without more configuration (changing the keys revokes outstanding tokens)."""
    if secret:
        return secret.encode()
    material = "\n".join(f"{key}:{tenant}" for key, tenant in sorted(api_keys.items()))
    return hashlib.sha256(b"rtqcc-stream-token\n" + material.encode()).digest()


def issue(key: bytes, tenant: str, external_id: str, *, ttl_s: int = TOKEN_TTL_S, now: float | None = None) -> str:
    payload = json.dumps({"t": tenant, "j": external_id, "exp": int((now or time.time()) + ttl_s)},
                         separators=(",", ":")).encode()
    return f"{_b64(payload)}.{_b64(_sign(key, payload))}"


def verify(key: bytes, token: str, external_id: str, *, now: float | None = None) -> str:
    """The tenant the token was issued to, if it is genuine, unexpired and for this job."""
    encoded, _, signature = token.partition(".")
    try:
        payload = _unb64(encoded)
        genuine = hmac.compare_digest(_unb64(signature), _sign(key, payload))
        claims = json.loads(payload) if genuine else None
    except (ValueError, UnicodeDecodeError):
        claims = None
    if not isinstance(claims, dict) or claims.get("j") != external_id:
        raise Unauthorized("This stream token is not valid for this job; ask for a new one.")
    if claims.get("exp", 0) < (now or time.time()):
        raise Unauthorized("This stream token has expired; ask for a new one.")
    return str(claims["t"])


def _sign(key: bytes, payload: bytes) -> bytes:
    return hmac.new(key, payload, hashlib.sha256).digest()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
