"""Registering a webhook endpoint, one way for a tenant's (`POST /webhooks`) and a job's own
(`POST /jobs` with `webhook`): its URL checked, a new secret, an opaque id."""

from __future__ import annotations

from ..ids import new_webhook_id
from ..settings import Settings
from ..store.db import Connection
from ..store.webhooks import WebhookStore
from .signing import new_secret
from .targets import TargetPolicy, check_registration


def register_endpoint(store: WebhookStore, settings: Settings, tenant: str, url: str, events: list[str],
                      description: str = "", *, job_id: int | None = None, conn: Connection | None = None) -> dict:
    """Store the endpoint; its public form with its secret, which is shown this once."""
    check_registration(url, TargetPolicy(settings.webhook_allowed_networks))
    secret = new_secret()
    endpoint = store.create(tenant, new_webhook_id(), url, list(dict.fromkeys(events)), description, secret,
                            job_id=job_id, conn=conn)
    return {**endpoint.public(), "secret": secret}
