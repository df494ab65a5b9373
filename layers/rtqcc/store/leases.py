"""Leases: the right of one consumer to write one job, with a fencing version every write
checks, so a consumer that lost its lease cannot overwrite newer work."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ..errors import LeaseLost, SectionWithdrawn
from ..status import JobStatus
from .attempts import ATTEMPT_COLUMNS, INSERT_ATTEMPTS, USAGE_COLUMNS, Attempt, attempts_json
from .versions import INSERT_VERSION, VERSION_COST
from .db import Connection, Database, Row
from .sections import OutlineItem, insert_sections
from .webhooks import outbox_insert

if TYPE_CHECKING:
    from .jobs import Job


@dataclass(frozen=True)
class Lease:
    """The right to write one job, until `version` is superseded."""

    job_id: int
    external_id: str
    owner: str
    version: int
    failures: int = 0  # runs of this job that ended in an error or a crash, before this one
    last_error: str | None = None
    first_run: bool = False  # the job had never run before this lease


# pg_advisory_xact_lock(namespace, hashtext(tenant)) around counting a tenant's running jobs and
# taking one more (store/tenant_usage.py's admission lock is another namespace).
RUNNING_SLOTS_LOCK = 0x5154_5253

_ACQUIRE_SET = (
    "UPDATE jobs SET status = 'running', lease_owner = :owner,"
    " lease_expires_at = now() + make_interval(secs => :ttl), lease_version = lease_version + 1,"
    " deliveries = deliveries + 1, started_at = COALESCE(started_at, now()), updated_at = now(),"
    # Taking over a job still marked running means its last consumer died mid-run.
    " failures = failures + CASE WHEN status = 'running' THEN 1 ELSE 0 END,"
    " error = CASE WHEN status = 'running' THEN 'its consumer stopped mid-run (crash or timeout)'"
    " ELSE error END"
    " WHERE external_id = :e AND (status = 'queued' OR status = 'running')"
    " AND (lease_owner IS NULL OR lease_expires_at < now())"
)


def acquire_statement(returning: str, *, below_cap: bool = False) -> str:
    """The statement that takes a job's lease (`:e`, `:owner`, `:ttl`), answering `returning`
    (columns of the job's row, `id` and `error` among them) and the lease's own. With
    `below_cap`, only while the tenant runs fewer than `:cap` other jobs under live leases, and
    the answer counts them (`running_now`) whether the lease was taken or not: one round trip,
    under the tenant's lock (RUNNING_SLOTS_LOCK) taken by an earlier statement of the same
    transaction, so that this statement's snapshot sees every taking before it."""
    acquire = (f"{_ACQUIRE_SET}{' AND (SELECT n FROM running) < :cap' if below_cap else ''}"
               f" RETURNING {returning}, lease_version, failures,"
               # The subquery reads the row as it was before this update: whether the job runs for the first time.
               " (SELECT before.started_at IS NULL FROM jobs before WHERE before.id = jobs.id) AS first_run")
    if not below_cap:
        return acquire
    return ("WITH running AS (SELECT COUNT(*)::int AS n FROM jobs WHERE tenant = :t AND status = 'running'"
            " AND lease_owner IS NOT NULL AND lease_expires_at > now() AND external_id <> :e),"
            f" acquired AS ({acquire})"
            " SELECT (SELECT n FROM running) AS running_now, acquired.* FROM (SELECT 1) AS one LEFT JOIN acquired ON true")


# complete_section's webhook deliveries: of the job in `fence`, when `done` marked the section.
_SECTION_DONE = "(SELECT fence.id, fence.tenant, fence.external_id FROM fence JOIN done ON done.job_id = fence.id)"
_SECTION_EVENT = "'section.completed'"
_SECTION_EVENT_DATA = ("jsonb_build_object('externalId', src.external_id, 'index', CAST(:i AS int),"
                       " 'version', CAST(:version AS int), 'chars', CAST(:chars AS int))")


class TenantAtCapacity(Exception):
    """The job's tenant already runs as many jobs as its cap allows: the job waits its turn."""

    def __init__(self, job: "Job", running: int, cap: int):
        super().__init__(f"tenant {job.tenant} runs {running} jobs, its cap is {cap}")
        self.job, self.running, self.cap = job, running, cap


def lease_from(row: Row | None, external_id: str, owner: str) -> Lease | None:
    """The lease an acquire_statement answered, if it took one."""
    if row is None or row["id"] is None:
        return None
    return Lease(job_id=row["id"], external_id=external_id, owner=owner, version=row["lease_version"],
                 failures=row["failures"], last_error=row["error"], first_run=bool(row["first_run"]))


class LeaseWrites:
    """What the consumer holding a job's lease writes: each statement checks the lease."""

    db: Database

    def renew_leases(self, leases: list[Lease], ttl_s: float) -> dict[int, JobStatus]:
        """Extend every lease of one consumer in one statement; each job's status by its id. A job
        missing from the answer has lost its lease."""
        if not leases:
            return {}
        rows = self.db.rows(
            "UPDATE jobs SET lease_expires_at = now() + make_interval(secs => :ttl)"
            " FROM unnest(CAST(:ids AS bigint[]), CAST(:versions AS bigint[]), CAST(:owners AS text[]))"
            " AS held(id, version, owner)"
            " WHERE jobs.id = held.id AND jobs.lease_version = held.version AND jobs.lease_owner = held.owner"
            " RETURNING jobs.id, jobs.status",
            ids=[lease.job_id for lease in leases],
            versions=[lease.version for lease in leases],
            owners=[lease.owner for lease in leases],
            ttl=float(ttl_s),
        )
        return {row["id"]: JobStatus(row["status"]) for row in rows}

    def release_lease(self, lease: Lease, *, requeue: bool = False, error: str | None = None,
                      failed: bool = False) -> JobStatus | None:
        """Give the job up. With `requeue`, a still-running job goes back to `queued`; `error` is
        recorded, and with `failed` the run counts toward the poison limit (a service outage does
        not: it is the service's failure, not the job's). Returns the job's status after, or None
        if the lease was already lost."""
        row = self.db.row(
            "UPDATE jobs SET lease_owner = NULL, lease_expires_at = NULL, updated_at = now(),"
            " status = CASE WHEN :requeue AND status = 'running' THEN 'queued' ELSE status END,"
            " failures = failures + CASE WHEN :failed THEN 1 ELSE 0 END,"
            " error = COALESCE(CAST(:error AS text), error)"
            " WHERE id = :j AND lease_version = :v AND lease_owner = :owner RETURNING status",
            j=lease.job_id,
            v=lease.version,
            owner=lease.owner,
            requeue=requeue,
            error=error,
            failed=failed,
        )
        return JobStatus(row["status"]) if row else None

    def finish(self, lease: Lease, status: JobStatus, *, error: str | None = None,
               reason: str | None = None) -> bool:
        """Move a running job to a failed, cancelled, paused or awaiting_review state; False if it
        was no longer running under this lease (cancelled or paused meanwhile, or taken over).
        A completed one ends with its manuscript: complete_with_manuscript."""
        return _finish(self.db, lease, status, error=error, reason=reason)

    def complete_with_manuscript(self, lease: Lease, *, manuscript_key: str, manuscript_revision: int,
                                 store_manuscript: Callable[[], None]) -> bool:
        """Complete the job (ending its revision, if any) with the manuscript `store_manuscript()`
        writes at `manuscript_key`, in one transaction holding the job's row: the object is
        written only while the job still runs under this lease, and nobody who takes the row
        meanwhile comes between the write and the move; above all a cancelled revision, whose
        reassembly writes the same key from the versions it left current. False, nothing
        written, if the job no longer runs under this lease. A crash between the write and the
        commit leaves an object nothing names, written again by the next run or reassembly."""
        with self.db.transaction() as conn:
            # The move comes first: its UPDATE holds the row until the commit, as a FOR UPDATE would.
            if not _finish(conn, lease, JobStatus.COMPLETED, manuscript_key=manuscript_key,
                           manuscript_revision=manuscript_revision):
                return False
            store_manuscript()  # if it fails, the move is rolled back with its webhook deliveries
            return True

    def save_outline(self, lease: Lease, outline: Iterable[OutlineItem]) -> None:
        with self.db.transaction() as conn:
            _check_fence(conn, lease)
            if conn.row("SELECT 1 AS present FROM sections WHERE job_id = :j LIMIT 1", j=lease.job_id):
                return
            insert_sections(conn, lease.job_id, list(outline))

    def mark_section_running(self, lease: Lease, idx: int) -> None:
        self._fenced_section_update(
            lease, idx, "status = 'running', started_at = COALESCE(sections.started_at, now())")

    def save_partial(self, lease: Lease, idx: int, text: str) -> None:
        """Keep the text generated so far, so a resume continues it instead of paying again."""
        self._fenced_section_update(lease, idx, "status = 'pending', partial_text = :text", text=text)

    def complete_section(self, lease: Lease, idx: int, *, version: int, key: str, sha256: str, chars: int,
                         attempts: list[Attempt], start_next: list[int], made_with: dict[str, Any]) -> Row:
        """Everything a finished section writes to Postgres, in one statement: its calls (recorded
        whoever holds the lease: they were paid for), its new version (called only after the S3
        write succeeded) made current on the fenced row, with what made it and what it cost, and
        the sections to write next marked running. Returns the section's usage over all its calls
        (usage_by_section's row). Raises LeaseLost, after recording the calls, if the lease is no
        longer ours; SectionWithdrawn, after recording the calls, if the section is done already
        (a cancelled revision put it back): it stays as it is.
        Its section.completed webhook deliveries are written by the statement too (a tenant with no
        endpoint pays an index probe: 0.02 ms a section, where asking first took 0.12 ms a run)."""
        row = self.db.row(
            "WITH fence AS (SELECT id, tenant, external_id FROM jobs WHERE id = :j AND lease_version = :v"
            f" AND lease_owner = :owner FOR SHARE), added AS ({INSERT_ATTEMPTS} RETURNING {ATTEMPT_COLUMNS}),"
            " done AS (UPDATE sections SET status = 'done', partial_text = '', content_key = :key,"
            " content_sha256 = :sha, content_chars = :chars, written_version = :v, completed_at = now(),"
            " current_version = :version, rewrite = NULL FROM fence"
            " WHERE sections.job_id = fence.id AND sections.idx = :i AND sections.status <> 'done'"
            " RETURNING sections.job_id),"
            " started AS (UPDATE sections SET status = 'running', started_at = COALESCE(sections.started_at, now())"
            " FROM fence WHERE sections.job_id = fence.id AND sections.idx = ANY(CAST(:next AS int[]))"
            " AND sections.status <> 'done' RETURNING 1),"
            f" calls AS (SELECT {ATTEMPT_COLUMNS} FROM generation_attempts WHERE job_id = :j AND section_idx = :i"
            f" UNION ALL SELECT {ATTEMPT_COLUMNS} FROM added WHERE section_idx = :i),"
            f" stored AS ({INSERT_VERSION} SELECT done.job_id, :i, :version, :key, :sha, :chars, 'model',"
            f" CAST(:made AS jsonb), paid.prompt_tokens, paid.completion_tokens, paid.cost_usd"
            f" FROM done, ({VERSION_COST} FROM calls WHERE section_version = :version AND purpose <> 'summary') AS paid RETURNING 1)"
            # section.completed for the tenant's endpoints, only when this statement marked it done
            f", announced AS ({outbox_insert(_SECTION_DONE, _SECTION_EVENT, _SECTION_EVENT_DATA)})"
            f" SELECT (SELECT COUNT(*) FROM fence)::int AS held, (SELECT COUNT(*) FROM done)::int AS marked,"
            f" {USAGE_COLUMNS} FROM calls",
            j=lease.job_id, v=lease.version, owner=lease.owner, i=idx, key=key, sha=sha256, chars=chars,
            attempts=attempts_json(attempts), next=start_next, version=version, made=json.dumps(made_with))
        assert row is not None
        if not row.pop("held"):
            raise LeaseLost(f"Job {lease.external_id}: lease version {lease.version} is no longer held by {lease.owner}")
        if not row.pop("marked"):
            raise SectionWithdrawn(f"Job {lease.external_id}: section {idx} is done already (a cancelled revision"
                                   " put it back); this run stops")
        return row

    def save_summary(self, lease: Lease, idx: int, summary: str) -> None:
        """The running summary of the document up to section `idx` (fenced; the section is done)."""
        self.db.run(
            "UPDATE sections SET summary = :summary FROM jobs WHERE sections.job_id = jobs.id AND jobs.id = :j"
            " AND jobs.lease_version = :v AND jobs.lease_owner = :owner AND sections.idx = :i",
            j=lease.job_id, v=lease.version, owner=lease.owner, i=idx, summary=summary)

    def _fenced_section_update(self, lease: Lease, idx: int, assignments: str, **params: Any) -> bool:
        """One statement: lock the job row (FOR SHARE, so a takeover waits for us), check the lease
        is still ours, and update a section that is not done yet. True if a row changed."""
        row = self.db.row(
            "WITH fence AS (SELECT id FROM jobs WHERE id = :j AND lease_version = :v AND lease_owner = :owner"
            " FOR SHARE), changed AS ("
            f" UPDATE sections SET {assignments} FROM fence"
            " WHERE sections.job_id = fence.id AND sections.idx = :i AND sections.status <> 'done' RETURNING 1)"
            " SELECT (SELECT COUNT(*) FROM fence)::int AS held, (SELECT COUNT(*) FROM changed)::int AS changed",
            j=lease.job_id, v=lease.version, owner=lease.owner, i=idx, **params)
        assert row is not None
        if not row["held"]:
            raise LeaseLost(f"Job {lease.external_id}: lease version {lease.version} is no longer held by {lease.owner}")
        return row["changed"] == 1


def _finish(db: Database | Connection, lease: Lease, status: JobStatus, *, error: str | None = None,
            reason: str | None = None, manuscript_key: str | None = None,
            manuscript_revision: int | None = None) -> bool:
    """The move out of `running` (LeaseWrites.finish, complete_with_manuscript), on `db` or
    inside the caller's transaction."""
    # Its webhook deliveries are written by the same statement (the outbox): never lost, never
    # sent for a change that did not happen.
    row = db.row(
        "WITH moved AS (UPDATE jobs SET status = :s, error = :error, status_reason = :reason,"
        " manuscript_key = COALESCE(:key, manuscript_key),"
        " manuscript_revision = COALESCE(CAST(:revision AS int), manuscript_revision),"
        " revision = CASE WHEN :s = 'completed' THEN NULL ELSE revision END,"
        " lease_owner = NULL, lease_expires_at = NULL,"
        " finished_at = CASE WHEN :s IN ('completed', 'failed', 'cancelled') THEN now() END,"
        " updated_at = now()"
        " WHERE id = :j AND lease_version = :v AND lease_owner = :owner AND status = 'running'"
        " RETURNING id, tenant, external_id, title, status, status_reason, error),"
        f" announced AS ({outbox_insert('moved')})"
        " SELECT COUNT(*)::int AS changed FROM moved",
        s=status.value,
        error=error,
        reason=reason,
        key=manuscript_key,
        revision=manuscript_revision,
        j=lease.job_id,
        v=lease.version,
        owner=lease.owner,
    )
    return row["changed"] == 1


def _check_fence(conn: Connection, lease: Lease) -> None:
    """Inside a transaction: hold the job row against a takeover, and check we still own it.
    Taking a lease (`acquire_statement`) needs the row exclusively, so it waits until this write has committed."""
    row = conn.row(
        "SELECT 1 AS held FROM jobs WHERE id = :j AND lease_version = :v AND lease_owner = :owner FOR SHARE",
        j=lease.job_id,
        v=lease.version,
        owner=lease.owner,
    )
    if row is None:
        raise LeaseLost(f"Job {lease.external_id}: lease version {lease.version} is no longer held by {lease.owner}")
