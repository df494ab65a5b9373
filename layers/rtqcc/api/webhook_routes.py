"""The routes of webhooks: a tenant's endpoints, their secrets and their delivery log. Nothing is
sent from here: deliveries are written with the state changes they announce and sent by the
consumer side (run/webhook_sender.py). Each is `view(call, **path_params)`; api/edge.py mounts
them behind the one error mapping."""

from __future__ import annotations

from chalice import Response

from ..delivery.endpoints import register_endpoint
from ..delivery.signing import new_secret
from ..errors import BadRequest, Conflict, NotFound
from ..ids import is_delivery_id, is_webhook_id
from ..store.webhooks import public_delivery
from .edge import ApiCall, route
from .job_routes import MAX_PAGE, int_param


def _webhook_id(webhook_id: str) -> str:
    if not is_webhook_id(webhook_id):
        raise NotFound(f"{webhook_id[:60]!r} is not a webhook id (they look like wh_01J...).")
    return webhook_id


@route("/webhooks", "POST")
def create_webhook(call: ApiCall) -> Response:
    from .models import WebhookIn, parse_body

    owner = call.tenant()
    spec = parse_body(WebhookIn, call.json_body(), "webhook")
    s = call.svc
    most = s.settings.max_webhooks_per_tenant
    if s.webhooks.count(owner) >= most:
        raise Conflict(f"This tenant has {most} webhooks, the most it may have; delete one first.")
    created = register_endpoint(s.webhooks, s.settings, owner, spec.url, spec.events, spec.description)
    return Response(body=created, status_code=201, headers={"Location": f"/webhooks/{created['id']}"})


@route("/webhooks", "GET")
def list_webhooks(call: ApiCall) -> dict:
    return {"webhooks": [endpoint.public() for endpoint in call.svc.webhooks.list(call.tenant())]}


@route("/webhooks/{webhook_id}", "GET")
def get_webhook(call: ApiCall, webhook_id: str) -> dict:
    return call.svc.webhooks.get(call.tenant(), _webhook_id(webhook_id)).public()


@route("/webhooks/{webhook_id}", "DELETE")
def delete_webhook(call: ApiCall, webhook_id: str) -> Response:
    call.svc.webhooks.delete(call.tenant(), _webhook_id(webhook_id))
    return Response(body="", status_code=204)


@route("/webhooks/{webhook_id}/rotate-secret", "POST")
def rotate_secret(call: ApiCall, webhook_id: str) -> Response:
    s, secret = call.svc, new_secret()
    endpoint = s.webhooks.rotate_secret(call.tenant(), _webhook_id(webhook_id), secret, s.settings.webhook_secret_grace_s)
    return Response(body={**endpoint.public(), "secret": secret}, status_code=200)


@route("/webhooks/{webhook_id}/deliveries", "GET")
def list_deliveries(call: ApiCall, webhook_id: str) -> dict:
    owner = call.tenant()
    limit = int_param(call.params, "limit", default=20, lo=1, hi=MAX_PAGE)
    cursor = call.params.get("cursor")
    if cursor is not None and not is_delivery_id(cursor):
        raise BadRequest("cursor must be the next_cursor of a previous page.")
    found = call.svc.webhooks.deliveries(owner, _webhook_id(webhook_id), before=cursor, limit=limit + 1)
    page = found[:limit]
    return {"deliveries": [public_delivery(row) for row in page],
            "next_cursor": page[-1]["public_id"] if len(found) > limit else None}


@route("/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver", "POST")
def redeliver(call: ApiCall, webhook_id: str, delivery_id: str) -> Response:
    owner = call.tenant()
    if not is_delivery_id(delivery_id):
        raise NotFound(f"{delivery_id[:60]!r} is not a delivery id (they look like msg_0f3a...).")
    row = call.svc.webhooks.redeliver(owner, _webhook_id(webhook_id), delivery_id)
    return Response(body=public_delivery(row), status_code=202)
