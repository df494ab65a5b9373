-- A key may carry a tier (RTQCC_TIER_MAX_RUNNING names each tier's cap on running jobs); a job
-- keeps the tier of the key that created it, so its cap holds whoever starts or resumes it.
ALTER TABLE api_keys ADD COLUMN tier text;
ALTER TABLE jobs ADD COLUMN tier text;
