"""What travels through Redis: the work queue `jobs:pending`, each job's event log, and the
control channel that stops a running job."""
