-- Deletion and retention: a job being deleted, each tenant's retention, and the usage of deleted
-- jobs kept for billing without them.

-- `deleting`: marked first, so the job disappears from the API at once; its objects, Redis keys
-- and rows go after, and a repeated deletion (or `rtqcc prune`) finishes one a crash interrupted.
-- NOT VALID: the new check allows more than the old one, so every existing row already passes it;
-- not validating spares a scan of jobs under the exclusive lock this transaction holds.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_known;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_known CHECK (status IN
    ('created', 'queued', 'awaiting_review', 'running', 'paused', 'completed', 'failed', 'cancelled', 'deleting'))
    NOT VALID;

-- Days a tenant's finished jobs are kept (NULL: RTQCC_RETENTION_DAYS applies; 0: kept forever).
ALTER TABLE tenant_quotas ADD COLUMN retention_days integer CHECK (retention_days >= 0);

-- What `rtqcc prune` looks for: finished jobs by when they finished. On a large jobs table, build it
-- first with CREATE INDEX CONCURRENTLY (docs/operations.md): this statement then does nothing.
CREATE INDEX IF NOT EXISTS jobs_finished_at ON jobs (finished_at)
    WHERE status IN ('completed', 'failed', 'cancelled', 'deleting');

-- The usage of deleted jobs, summed per tenant, UTC day and model: billing and the daily quotas
-- count it as before the deletion, and it names no job.
CREATE TABLE deleted_usage (
    tenant                     text NOT NULL,
    day                        date NOT NULL,
    model                      text NOT NULL,
    jobs                       integer NOT NULL DEFAULT 0,
    attempts                   integer NOT NULL DEFAULT 0,
    billed_prompt_tokens       bigint NOT NULL DEFAULT 0,
    billed_completion_tokens   bigint NOT NULL DEFAULT 0,
    reported_prompt_tokens     bigint NOT NULL DEFAULT 0,
    reported_completion_tokens bigint NOT NULL DEFAULT 0,
    counted_prompt_tokens      bigint NOT NULL DEFAULT 0,
    counted_completion_tokens  bigint NOT NULL DEFAULT 0,
    estimated_attempts         integer NOT NULL DEFAULT 0,   -- billed by our count: nothing reported
    cost_usd                   double precision NOT NULL DEFAULT 0,
    unpriced_attempts          integer NOT NULL DEFAULT 0,   -- no price: the cost of the group is unknown
    PRIMARY KEY (tenant, day, model)
);
