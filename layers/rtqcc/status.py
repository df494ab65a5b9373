"""Job and section states, and which transitions each control verb may make."""

from __future__ import annotations

from enum import Enum


class JobStatus(str, Enum):
    CREATED = "created"      # stored, not yet asked to run
    QUEUED = "queued"        # waiting in `jobs:pending` for a consumer
    AWAITING_REVIEW = "awaiting_review"  # outline drafted, waiting for the writer to approve it
    RUNNING = "running"      # a consumer holds its lease and is generating
    PAUSED = "paused"        # stopped on request; partial text kept; resumable
    COMPLETED = "completed"  # every section stored and the manuscript assembled
    FAILED = "failed"        # stopped by an error a retry of the same input will not fix
    CANCELLED = "cancelled"  # stopped on request; never resumes
    DELETING = "deleting"    # being deleted: gone from the API, its data removed next (run/deletion.py)

    @property
    def terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED})

# verb -> (states it may leave, state it enters)
TRANSITIONS: dict[str, tuple[frozenset[JobStatus], JobStatus]] = {
    "start": (frozenset({JobStatus.CREATED}), JobStatus.QUEUED),
    "pause": (frozenset({JobStatus.QUEUED, JobStatus.RUNNING}), JobStatus.PAUSED),
    "resume": (frozenset({JobStatus.PAUSED}), JobStatus.QUEUED),
    "retry": (frozenset({JobStatus.FAILED}), JobStatus.QUEUED),
    "cancel": (
        frozenset({JobStatus.CREATED, JobStatus.QUEUED, JobStatus.AWAITING_REVIEW, JobStatus.RUNNING,
                   JobStatus.PAUSED}),
        JobStatus.CANCELLED,
    ),
    # Revision: a job that asked to review its outline, and a finished (or paused) one rewritten.
    "review": (frozenset({JobStatus.CREATED}), JobStatus.AWAITING_REVIEW),  # start, its outline given
    "approve": (frozenset({JobStatus.AWAITING_REVIEW}), JobStatus.QUEUED),
    "regenerate": (frozenset({JobStatus.COMPLETED, JobStatus.PAUSED}), JobStatus.QUEUED),
}
# Where a job's sections may be edited, locked or restored by hand: no consumer is writing it.
AT_REST = frozenset({JobStatus.COMPLETED, JobStatus.PAUSED, JobStatus.FAILED, JobStatus.CANCELLED})


class JobPriority(str, Enum):
    """Which of a tenant's jobs take its running slots first when it has more queued than its cap
    lets run (`RTQCC_MAX_RUNNING_PER_TENANT`): high, then normal, then low, each oldest first.
    Between tenants, no priority: each has its own cap."""

    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"

    @property
    def rank(self) -> int:
        return _PRIORITY_RANKS[self]


_PRIORITY_RANKS = {JobPriority.HIGH: 0, JobPriority.NORMAL: 1, JobPriority.LOW: 2}


class SectionStatus(str, Enum):
    PENDING = "pending"  # not started, or started and interrupted (partial text may be kept)
    RUNNING = "running"  # a consumer is streaming it now
    DONE = "done"        # content stored in S3, then this row marked: never generated again
