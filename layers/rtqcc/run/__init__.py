"""The consumer side: the drain of `jobs:pending`, the orchestrator that writes a manuscript,
the lease keeper beside each run, failure reporting, failpoints, and the sweeper."""
