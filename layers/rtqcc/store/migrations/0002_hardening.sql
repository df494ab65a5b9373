-- Poison work, idempotent requests and stored API keys.

-- Runs that ended in an error or a crash (not pauses, budgets or cancels): the poison counter.
ALTER TABLE jobs ADD COLUMN failures integer NOT NULL DEFAULT 0;

-- One row per (tenant, Idempotency-Key): the request's fingerprint and, once known, its answer.
CREATE TABLE idempotency_keys (
    tenant          text NOT NULL,
    key             text NOT NULL,
    request_hash    text NOT NULL,
    response_status integer,          -- NULL while the first request is still being handled
    response_body   jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, key)
);

-- API keys are stored as SHA-256 hashes: a leaked table leaks no key.
CREATE TABLE api_keys (
    key_hash    text PRIMARY KEY,
    tenant      text NOT NULL,
    label       text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
