-- Revision: outline review, versions of every section, locks, regeneration and forks.

-- A job that asked for review stops after its outline until approved.
ALTER TABLE jobs DROP CONSTRAINT jobs_status_known;
ALTER TABLE jobs ADD CONSTRAINT jobs_status_known CHECK (status IN
    ('created', 'queued', 'awaiting_review', 'running', 'paused', 'completed', 'failed', 'cancelled'));

-- options: what the job asked for beyond its params ({"review": {"outline": true}, "context": "summary",
-- "forked_from": {...}}). revision: the regeneration under way, NULL when none. manuscript_revision:
-- which assembly of the manuscript is current (0: the first draft's manuscript.md).
ALTER TABLE jobs ADD COLUMN options jsonb NOT NULL DEFAULT '{}';
ALTER TABLE jobs ADD COLUMN revision jsonb;
ALTER TABLE jobs ADD COLUMN manuscript_revision integer NOT NULL DEFAULT 0;

-- current_version: the version the manuscript is assembled from (NULL until the first is done).
-- rewrite: what the pending rewrite of a section must do ({"instructions": ...}), NULL otherwise.
-- summary: a running summary of the document up to and including this section (context "summary").
ALTER TABLE sections ADD COLUMN current_version integer;
ALTER TABLE sections ADD COLUMN locked boolean NOT NULL DEFAULT false;
ALTER TABLE sections ADD COLUMN rewrite jsonb;
ALTER TABLE sections ADD COLUMN target_words integer CHECK (target_words >= 1);
ALTER TABLE sections ADD COLUMN summary text;

-- Every version of every section, immutable once stored: content in S3 first, then this row, in
-- the statement that makes it current. maker: model (a draft, a regeneration, a cascade), human
-- (an edit), restore (a copy of an earlier version), fork (shared from another job, not billed).
CREATE TABLE section_versions (
    job_id             bigint NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx                integer NOT NULL,
    version            integer NOT NULL CHECK (version >= 1),
    content_key        text NOT NULL,
    content_sha256     text NOT NULL,
    content_chars      integer NOT NULL,
    maker              text NOT NULL CHECK (maker IN ('model', 'human', 'restore', 'fork')),
    made_with          jsonb NOT NULL DEFAULT '{}',
    prompt_tokens      integer NOT NULL DEFAULT 0,
    completion_tokens  integer NOT NULL DEFAULT 0,
    cost_usd           double precision,
    created_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, idx, version),
    FOREIGN KEY (job_id, idx) REFERENCES sections (job_id, idx) ON DELETE CASCADE
);

-- Which version a call was paid for (NULL: the outline), and what it was for.
ALTER TABLE generation_attempts ADD COLUMN section_version integer;
ALTER TABLE generation_attempts ADD COLUMN purpose text NOT NULL DEFAULT 'draft'
    CHECK (purpose IN ('outline', 'draft', 'continuation', 'summary'));
UPDATE generation_attempts SET purpose = 'outline' WHERE section_idx IS NULL;
UPDATE generation_attempts SET section_version = 1 WHERE section_idx IS NOT NULL;

-- Sections written before versions existed are their version 1.
INSERT INTO section_versions (job_id, idx, version, content_key, content_sha256, content_chars, maker, made_with,
                              prompt_tokens, completion_tokens, cost_usd, created_at)
SELECT s.job_id, s.idx, 1, s.content_key, s.content_sha256, COALESCE(s.content_chars, 0), 'model',
       jsonb_build_object('model', j.model),
       COALESCE((SELECT SUM(COALESCE(a.reported_prompt_tokens, a.counted_prompt_tokens)) FROM generation_attempts a
                 WHERE a.job_id = s.job_id AND a.section_idx = s.idx), 0),
       COALESCE((SELECT SUM(COALESCE(a.reported_completion_tokens, a.counted_completion_tokens))
                 FROM generation_attempts a WHERE a.job_id = s.job_id AND a.section_idx = s.idx), 0),
       (SELECT SUM(a.cost_usd) FROM generation_attempts a WHERE a.job_id = s.job_id AND a.section_idx = s.idx),
       COALESCE(s.completed_at, now())
FROM sections s JOIN jobs j ON j.id = s.job_id WHERE s.status = 'done';
UPDATE sections SET current_version = 1 WHERE status = 'done';
