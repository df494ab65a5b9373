-- Webhooks: endpoints per tenant (or per job), and an outbox of deliveries written in the same
-- statement as the state change they announce, sent by the consumer side.

-- An endpoint: its tenant's jobs' events (job_id NULL), or one job's (the URL named at its
-- creation; gone with the job). secret signs every delivery (Standard Webhooks, `whsec_...`);
-- after a rotation, previous_secret signs beside it until previous_secret_expires_at.
CREATE TABLE webhook_endpoints (
    id                         bigserial PRIMARY KEY,
    public_id                  text NOT NULL UNIQUE,
    tenant                     text NOT NULL,
    job_id                     bigint REFERENCES jobs (id) ON DELETE CASCADE,
    url                        text NOT NULL,
    events                     text[] NOT NULL,
    description                text NOT NULL DEFAULT '',
    secret                     text NOT NULL,
    previous_secret            text,
    previous_secret_expires_at timestamptz,
    created_at                 timestamptz NOT NULL DEFAULT now()
);
-- The outbox's lookup on every state change: a tenant without endpoints costs one index probe.
CREATE INDEX webhook_endpoints_tenant ON webhook_endpoints (tenant);

-- One event for one endpoint. public_id is the `webhook-id` header, the same on every attempt.
-- status: pending (due at next_attempt_at; a sender's claim moves that on while it sends),
-- succeeded, failed (refused until the retry window from retry_from closed).
CREATE TABLE webhook_deliveries (
    id               bigserial PRIMARY KEY,
    public_id        text NOT NULL UNIQUE,
    endpoint_id      bigint NOT NULL REFERENCES webhook_endpoints (id) ON DELETE CASCADE,
    event_type       text NOT NULL,
    job_external_id  text,
    payload          jsonb NOT NULL,
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'succeeded', 'failed')),
    attempts         integer NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT now(),
    retry_from       timestamptz NOT NULL DEFAULT now(),
    last_attempt_at  timestamptz,
    last_status_code integer,
    last_error       text,
    last_response    text,
    delivered_at     timestamptz,
    created_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX webhook_deliveries_due ON webhook_deliveries (next_attempt_at) WHERE status = 'pending';
CREATE INDEX webhook_deliveries_endpoint ON webhook_deliveries (endpoint_id, id DESC);
