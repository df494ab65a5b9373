"""What is kept and how it is read back: Postgres (jobs, sections, leases, attempts, keys,
idempotency, migrations) and S3 (section content and manuscripts)."""
