"""Bearer API keys, each mapped to a tenant: keys from settings (development, bootstrap) and
keys created with `rtqcc keys create`, stored hashed in Postgres."""

from __future__ import annotations

import hmac

from ..api_keys import ApiKeyStore
from ..errors import Unauthorized


def bearer_token(authorization: str | None) -> str:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("Send your API key as 'Authorization: Bearer <key>'.",
                           headers={"WWW-Authenticate": "Bearer"})
    return token.strip()


def tenant_for(authorization: str | None, api_keys: dict[str, str], store: ApiKeyStore | None = None) -> str:
    token = bearer_token(authorization)
    for key, tenant in api_keys.items():
        if hmac.compare_digest(key.encode(), token.encode()):
            return tenant
    tenant = store.tenant_for(token) if store is not None else None
    if tenant is None:
        raise Unauthorized("That API key is not valid.", headers={"WWW-Authenticate": "Bearer"})
    return tenant
