-- Per-tenant overrides of the quota settings (RTQCC_QUOTA_*, RTQCC_JOB_*). A NULL column means
-- "the setting applies"; a number is this tenant's limit (0 allows nothing).
CREATE TABLE tenant_quotas (
    tenant                    text PRIMARY KEY,
    tokens_per_day            bigint CHECK (tokens_per_day >= 0),
    cost_usd_per_day          double precision CHECK (cost_usd_per_day >= 0),
    active_jobs               integer CHECK (active_jobs >= 0),           -- queued or running at once
    job_default_max_tokens    bigint CHECK (job_default_max_tokens >= 1),  -- a job's budget when it gives none
    job_default_max_cost_usd  double precision CHECK (job_default_max_cost_usd >= 0),
    job_max_tokens            bigint CHECK (job_max_tokens >= 1),          -- the most a job's budget may be
    job_max_cost_usd          double precision CHECK (job_max_cost_usd >= 0),
    updated_at                timestamptz NOT NULL DEFAULT now()
);

-- A tenant's spend today is summed over today's attempts (joined to their jobs for the tenant),
-- once per provider call while a job runs: this keeps it to today's rows.
CREATE INDEX generation_attempts_created_at ON generation_attempts (created_at);
