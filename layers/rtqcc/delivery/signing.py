"""Webhook secrets and signatures, per the Standard Webhooks spec (the `standardwebhooks` package
signs; receivers verify with the same package or any implementation of the spec)."""

from __future__ import annotations

import base64
import secrets
from datetime import datetime, timezone

from standardwebhooks import Webhook

SECRET_PREFIX = "whsec_"
SECRET_BYTES = 32


def new_secret() -> str:
    """A random signing secret in the spec's form: `whsec_` and base64 of 32 random bytes."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def signed_headers(message_id: str, body: str, signing_secrets: tuple[str, ...], now: datetime | None = None) -> dict[str, str]:
    """The spec's three headers for `body`: `webhook-id` (the same on every attempt, so a receiver
    can drop repeats), `webhook-timestamp`, and `webhook-signature` with one `v1,...` per secret
    (during a rotation's grace both the new and the previous secret sign)."""
    moment = now or datetime.now(timezone.utc)
    signatures = " ".join(Webhook(secret).sign(message_id, moment, body) for secret in signing_secrets)
    return {"webhook-id": message_id, "webhook-timestamp": str(int(moment.timestamp())),
            "webhook-signature": signatures}
