-- Jobs, their sections, every generation attempt's token usage, and consumer checkpoints.

CREATE TABLE jobs (
    id                bigserial PRIMARY KEY,
    external_id       text NOT NULL UNIQUE,
    tenant            text NOT NULL,
    title             text NOT NULL,
    brief             text NOT NULL,
    model             text NOT NULL,
    params            jsonb NOT NULL DEFAULT '{}',
    budget            jsonb NOT NULL DEFAULT '{}',
    metadata          jsonb NOT NULL DEFAULT '{}',
    section_count     integer,
    outline_given     boolean NOT NULL DEFAULT false,
    status            text NOT NULL,
    status_reason     text,
    error             text,
    lease_owner       text,
    lease_expires_at  timestamptz,
    lease_version     bigint NOT NULL DEFAULT 0,
    deliveries        integer NOT NULL DEFAULT 0,
    manuscript_key    text,
    created_at        timestamptz NOT NULL DEFAULT now(),
    updated_at        timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    finished_at       timestamptz,
    CONSTRAINT jobs_status_known CHECK (status IN
        ('created', 'queued', 'running', 'paused', 'completed', 'failed', 'cancelled'))
);

-- Listing is per tenant, newest first; external ids are ULIDs, so they sort by creation time.
CREATE INDEX jobs_tenant_external_id ON jobs (tenant, external_id DESC);
CREATE INDEX jobs_runnable ON jobs (status) WHERE status IN ('queued', 'running');

CREATE TABLE sections (
    job_id           bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx              integer NOT NULL,
    title            text NOT NULL,
    brief            text NOT NULL DEFAULT '',
    status           text NOT NULL DEFAULT 'pending',
    partial_text     text NOT NULL DEFAULT '',
    content_key      text,
    content_sha256   text,
    content_chars    integer,
    written_version  bigint,
    started_at       timestamptz,
    completed_at     timestamptz,
    PRIMARY KEY (job_id, idx),
    CONSTRAINT sections_status_known CHECK (status IN ('pending', 'running', 'done')),
    CONSTRAINT sections_done_has_content CHECK (status <> 'done' OR content_key IS NOT NULL)
);

-- One row per call to the provider: tokens are paid per attempt, aborted or not.
CREATE TABLE generation_attempts (
    id                         bigserial PRIMARY KEY,
    job_id                     bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    section_idx                integer,            -- NULL for the outline step
    model                      text NOT NULL,
    reported_prompt_tokens     integer,            -- NULL when the provider reported nothing
    reported_completion_tokens integer,
    counted_prompt_tokens      integer NOT NULL,
    counted_completion_tokens  integer NOT NULL,  -- billed from these when nothing was reported
    finish_reason              text,
    aborted                    text,               -- NULL, or why the stream was cut short
    created_at                 timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX generation_attempts_job ON generation_attempts (job_id, section_idx);

CREATE TABLE consumer_checkpoints (
    consumer_name   text PRIMARY KEY,
    last_stream_id  text,
    invocations     bigint NOT NULL DEFAULT 0,
    processed       bigint NOT NULL DEFAULT 0,
    requeued        bigint NOT NULL DEFAULT 0,
    failed          bigint NOT NULL DEFAULT 0,
    updated_at      timestamptz NOT NULL DEFAULT now()
);
