"""Bearer API keys, each mapped to a tenant."""

from __future__ import annotations

import hmac

from ..errors import Unauthorized


def tenant_for(authorization: str | None, api_keys: dict[str, str]) -> str:
    if not api_keys:
        raise Unauthorized("No API keys are configured on this server; set RTQCC_DEV_API_KEY or RTQCC_API_KEYS.")
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>'.",
                           headers={"WWW-Authenticate": "Bearer"})
    token = token.strip()
    for key, tenant in api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return tenant
    raise Unauthorized("That API key is not valid.", headers={"WWW-Authenticate": "Bearer"})
