"""Webhooks in Postgres: tenants' endpoints, and the outbox of deliveries.

A delivery is written by the statement that makes the change it announces (`outbox_insert`, used
by store/leases.py and store/jobs.py), so an event is never lost and never sent for a change that
rolled back; the consumer side claims due deliveries (`claim_due`, FOR UPDATE SKIP LOCKED) and
records each attempt (`record_attempt`)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from ..errors import NotFound
from .db import Connection, Database, Row

# Events a tenant may subscribe to; a job's state `s` is announced as `job.s`, so a state no
# endpoint can name (queued, running, paused) writes nothing.
JOB_EVENTS = ("job.completed", "job.failed", "job.cancelled", "job.awaiting_review")
EVENTS = (*JOB_EVENTS, "section.completed")

_NOW_ISO = "to_char(now() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')"
_NEW_DELIVERY_ID = "'msg_' || replace(CAST(gen_random_uuid() AS text), '-', '')"

# For a job event: the job's state as it is after the change (`src` has the jobs row's columns).
JOB_EVENT = "'job.' || src.status"
JOB_EVENT_DATA = ("jsonb_strip_nulls(jsonb_build_object('externalId', src.external_id, 'title', src.title,"
                  " 'status', src.status, 'status_reason', src.status_reason, 'error', src.error))")


def outbox_insert(source: str, event: str = JOB_EVENT, data: str = JOB_EVENT_DATA) -> str:
    """An `INSERT ... SELECT` writing one delivery per endpoint subscribed to `event` (an SQL
    expression over `src`) for each job row of `source` (a CTE with the job's id, tenant and
    external_id), its payload `{"type", "timestamp", "data"}` with `data` (SQL jsonb over `src`).
    Put in a WITH of the statement that changes the job: one transaction. A tenant with no
    endpoint costs one index probe and writes nothing."""
    return (
        "INSERT INTO webhook_deliveries (public_id, endpoint_id, event_type, job_external_id, payload)"
        f" SELECT {_NEW_DELIVERY_ID}, e.id, {event}, src.external_id,"
        f" jsonb_build_object('type', {event}, 'timestamp', {_NOW_ISO}, 'data', {data})"
        f" FROM {source} AS src JOIN webhook_endpoints e ON e.tenant = src.tenant AND {event} = ANY(e.events)"
        " AND (e.job_id IS NULL OR e.job_id = src.id)"
    )


def _iso(moment: datetime | None) -> str | None:
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%fZ") if moment else None


_ENDPOINT_COLUMNS = ("e.id, e.public_id, e.tenant, e.url, e.events, e.description, e.created_at,"
                     " e.previous_secret_expires_at, j.external_id AS job")
_ENDPOINT_FROM = "webhook_endpoints e LEFT JOIN jobs j ON j.id = e.job_id"


@dataclass(frozen=True)
class Endpoint:
    id: int
    public_id: str
    url: str
    events: list[str]
    description: str
    job: str | None
    created_at: datetime
    previous_secret_expires_at: datetime | None

    @classmethod
    def from_row(cls, row: Row) -> "Endpoint":
        return cls(id=row["id"], public_id=row["public_id"], url=row["url"], events=list(row["events"]),
                   description=row["description"], job=row["job"], created_at=row["created_at"],
                   previous_secret_expires_at=row["previous_secret_expires_at"])

    def public(self) -> dict:
        """What a tenant sees of it: never a secret."""
        return {"id": self.public_id, "url": self.url, "events": self.events, "description": self.description,
                "job": self.job, "created_at": _iso(self.created_at),
                "previous_secret_expires_at": _iso(self.previous_secret_expires_at)}


@dataclass(frozen=True)
class DueDelivery:
    """A delivery claimed for one attempt: what to send, where, signed with which secrets."""

    id: int
    public_id: str
    payload: str        # the body, as stored: the bytes signed
    attempt: int
    url: str
    secrets: tuple[str, ...]  # the current secret, and the previous one during a rotation's grace


_DELIVERY_COLUMNS = ("public_id, event_type, job_external_id, status, attempts, next_attempt_at, last_attempt_at,"
                     " last_status_code, last_error, last_response, delivered_at, created_at")


def public_delivery(row: Row) -> dict:
    return {"id": row["public_id"], "event": row["event_type"], "job": row["job_external_id"],
            "status": row["status"], "attempts": row["attempts"],
            "next_attempt_at": _iso(row["next_attempt_at"]) if row["status"] == "pending" else None,
            "last_attempt_at": _iso(row["last_attempt_at"]), "last_status_code": row["last_status_code"],
            "last_error": row["last_error"], "last_response": row["last_response"],
            "delivered_at": _iso(row["delivered_at"]), "created_at": _iso(row["created_at"])}


class WebhookStore:
    def __init__(self, db: Database):
        self.db = db

    # ---- endpoints (every read and write scoped by tenant) ---------------------------------

    def create(self, tenant: str, public_id: str, url: str, events: list[str], description: str, secret: str,
               *, job_id: int | None = None, conn: Connection | None = None) -> Endpoint:
        """`conn`: inside the caller's transaction (a job's own URL, stored with the job)."""
        row = (conn or self.db).row(
            "WITH e AS (INSERT INTO webhook_endpoints (public_id, tenant, job_id, url, events, description, secret)"
            " VALUES (:p, :t, :job, :url, CAST(:events AS text[]), :d, :secret) RETURNING *)"
            f" SELECT {_ENDPOINT_COLUMNS} FROM e LEFT JOIN jobs j ON j.id = e.job_id",
            p=public_id, t=tenant, job=job_id, url=url, events=events, d=description, secret=secret)
        assert row is not None
        return Endpoint.from_row(row)

    def count(self, tenant: str) -> int:
        """The tenant's own endpoints (jobs' URLs not counted: they go with their jobs)."""
        return self.db.row("SELECT COUNT(*)::int AS n FROM webhook_endpoints WHERE tenant = :t AND job_id IS NULL",
                           t=tenant)["n"]

    def list(self, tenant: str) -> list[Endpoint]:
        rows = self.db.rows(f"SELECT {_ENDPOINT_COLUMNS} FROM {_ENDPOINT_FROM}"
                            " WHERE e.tenant = :t AND e.job_id IS NULL ORDER BY e.id", t=tenant)
        return [Endpoint.from_row(row) for row in rows]

    def get(self, tenant: str, public_id: str) -> Endpoint:
        row = self.db.row(f"SELECT {_ENDPOINT_COLUMNS} FROM {_ENDPOINT_FROM} WHERE e.public_id = :p AND e.tenant = :t",
                          p=public_id, t=tenant)
        if row is None:
            raise _not_found(public_id)
        return Endpoint.from_row(row)

    def delete(self, tenant: str, public_id: str) -> None:
        """The endpoint and its delivery log; a delivery being sent right now still ends."""
        if not self.db.run("DELETE FROM webhook_endpoints WHERE public_id = :p AND tenant = :t", p=public_id, t=tenant):
            raise _not_found(public_id)

    def rotate_secret(self, tenant: str, public_id: str, secret: str, grace_s: float) -> Endpoint:
        """`secret` signs from now on; the one it replaces signs beside it for `grace_s`, so
        receivers can switch without dropping a delivery."""
        row = self.db.row(
            "WITH e AS (UPDATE webhook_endpoints SET previous_secret = secret, secret = :secret,"
            " previous_secret_expires_at = now() + make_interval(secs => :grace)"
            " WHERE public_id = :p AND tenant = :t RETURNING *)"
            f" SELECT {_ENDPOINT_COLUMNS} FROM e LEFT JOIN jobs j ON j.id = e.job_id",
            secret=secret, grace=float(grace_s), p=public_id, t=tenant)
        if row is None:
            raise _not_found(public_id)
        return Endpoint.from_row(row)

    # ---- the delivery log ---------------------------------------------------------------------

    def deliveries(self, tenant: str, public_id: str, *, before: str | None, limit: int) -> list[Row]:
        """The endpoint's deliveries, newest first, from before the delivery `before` (a cursor)."""
        endpoint = self.get(tenant, public_id)
        return self.db.rows(
            f"SELECT {_DELIVERY_COLUMNS} FROM webhook_deliveries WHERE endpoint_id = :e"
            " AND (CAST(:before AS text) IS NULL OR id < (SELECT id FROM webhook_deliveries"
            " WHERE public_id = :before AND endpoint_id = :e))"
            " ORDER BY id DESC LIMIT :limit", e=endpoint.id, before=before, limit=limit)

    def redeliver(self, tenant: str, public_id: str, delivery_id: str) -> Row:
        """Send a delivery again, now, with the same `webhook-id`; its retry window starts over."""
        row = self.db.row(
            "UPDATE webhook_deliveries d SET status = 'pending', next_attempt_at = now(), retry_from = now()"
            " FROM webhook_endpoints e WHERE e.id = d.endpoint_id AND e.public_id = :p AND e.tenant = :t"
            f" AND d.public_id = :d RETURNING {', '.join('d.' + c.strip() for c in _DELIVERY_COLUMNS.split(','))}",
            p=public_id, t=tenant, d=delivery_id)
        if row is None:
            raise NotFound(f"Webhook {public_id} has no delivery {delivery_id}.")
        return row

    # ---- the sender's side ----------------------------------------------------------------------

    def claim_due(self, limit: int, hold_s: float) -> list[DueDelivery]:
        """Up to `limit` due deliveries, each counted as an attempt and held for `hold_s` (past it,
        a sender that died mid-attempt leaves it due again: at least once). SKIP LOCKED: senders
        running at once each take their own."""
        rows = self.db.rows(
            "WITH due AS (SELECT id FROM webhook_deliveries WHERE status = 'pending' AND next_attempt_at <= now()"
            " ORDER BY next_attempt_at LIMIT :n FOR UPDATE SKIP LOCKED)"
            " UPDATE webhook_deliveries d SET attempts = d.attempts + 1, last_attempt_at = now(),"
            " next_attempt_at = now() + make_interval(secs => :hold)"
            " FROM due, webhook_endpoints e WHERE d.id = due.id AND e.id = d.endpoint_id"
            " RETURNING d.id, d.public_id, CAST(d.payload AS text) AS payload, d.attempts, e.url, e.secret,"
            " CASE WHEN e.previous_secret_expires_at > now() THEN e.previous_secret END AS previous_secret",
            n=limit, hold=float(hold_s))
        return [DueDelivery(id=row["id"], public_id=row["public_id"], payload=row["payload"], attempt=row["attempts"],
                            url=row["url"], secrets=tuple(filter(None, (row["secret"], row["previous_secret"]))))
                for row in rows]

    def record_attempt(self, delivery_id: int, *, delivered: bool, status_code: int | None, error: str | None,
                       response: str | None, retry_in_s: float, retry_for_s: float) -> str:
        """An attempt's outcome. A failed one is due again in `retry_in_s`, unless that falls past
        `retry_for_s` from the start of its retry window: then it is failed. A redelivery asked
        for while the attempt was under way stays due. Its status after."""
        row = self.db.row(
            "UPDATE webhook_deliveries SET last_status_code = :code, last_error = :error, last_response = :response,"
            " status = CASE WHEN retry_from > last_attempt_at THEN 'pending' WHEN :ok THEN 'succeeded'"
            " WHEN now() + make_interval(secs => :delay) > retry_from + make_interval(secs => :window) THEN 'failed'"
            " ELSE 'pending' END,"
            " delivered_at = CASE WHEN :ok THEN now() ELSE delivered_at END,"
            " next_attempt_at = CASE WHEN retry_from > last_attempt_at THEN next_attempt_at"
            " ELSE now() + make_interval(secs => :delay) END"
            " WHERE id = :id RETURNING status",
            code=status_code, error=error, response=response, ok=delivered, delay=float(retry_in_s),
            window=float(retry_for_s), id=delivery_id)
        return row["status"] if row else "deleted"


def _not_found(public_id: str) -> NotFound:
    return NotFound(f"No webhook {public_id} exists for this API key.")


__all__ = ["DueDelivery", "EVENTS", "Endpoint", "JOB_EVENTS", "WebhookStore", "outbox_insert", "public_delivery"]
