-- A job's priority among its tenant's jobs waiting for a running slot (high, normal, low).
ALTER TABLE jobs ADD COLUMN priority text NOT NULL DEFAULT 'normal'
    CHECK (priority IN ('high', 'normal', 'low'));

-- A tenant's running jobs are counted each time one of its jobs takes a lease (the per-tenant cap).
CREATE INDEX jobs_running_by_tenant ON jobs (tenant) WHERE status = 'running';
