"""Revision of a job by its writer: the outline replaced under review, sections locked, marked for
rewriting (one, or it and every later unlocked one), a revision cancelled back to the versions
it started from, and forks that share a job's first sections. Each is one transaction on the
job's locked row; the consumer writes the new versions (run/orchestrator.py)."""

from __future__ import annotations

import json
from typing import Any

from ..errors import Conflict, InvalidTransition, SectionLocked
from ..status import JobStatus
from .blobs import BlobStore
from .db import Connection, Database, Row
from .jobs import Job, JobStore, NewJob, TransitionResult
from .manuscripts import reassemble
from .sections import OutlineItem, insert_sections
from .versions import INSERT_VERSION, job_at_rest, job_row, section_row


class RevisionStore:
    def __init__(self, db: Database, jobs: JobStore, blobs: BlobStore):
        self.db = db
        self.jobs = jobs
        self.blobs = blobs

    def replace_outline(self, tenant: str, external_id: str, outline: list[OutlineItem]) -> Job:
        """A job's outline, replaced before any section is written: while it is created or
        awaiting review (409 otherwise)."""
        with self.db.transaction() as conn:
            job = job_row(conn, tenant, external_id, lock=True)
            if job["status"] not in (JobStatus.CREATED.value, JobStatus.AWAITING_REVIEW.value):
                raise InvalidTransition(f"Cannot replace the outline of job {external_id}: it is {job['status']}; "
                                        "an outline is replaced only while the job is created or awaiting review.")
            conn.run("DELETE FROM sections WHERE job_id = :j", j=job["id"])
            insert_sections(conn, job["id"], outline)
            conn.run("UPDATE jobs SET section_count = :n, outline_given = true, updated_at = now() WHERE id = :j",
                     n=len(outline), j=job["id"])
        return self.jobs.get(tenant, external_id)

    def mark_for_rewrite(self, conn: Connection, job: Job, idx: int, *, instructions: str | None,
                         brief: str | None, cascade: bool) -> list[int]:
        """Inside the transaction that moved the job to `queued` for a regeneration: section `idx`,
        and with `cascade` every later unlocked written one, marked to be written again (their
        current versions stay current until the new ones are stored). The sections marked."""
        section = section_row(conn, {"id": job.id, "external_id": job.external_id}, idx, lock=True)
        if section["locked"]:
            raise SectionLocked(f"Section {idx} is locked; unlock it to regenerate it.")
        rewrite = {"instructions": instructions} if instructions else {}
        # A section's running summary holds while its version does.
        conn.run("UPDATE sections SET status = 'pending', partial_text = '', rewrite = CAST(:rewrite AS jsonb),"
                 " summary = NULL, brief = COALESCE(CAST(:brief AS text), brief) WHERE job_id = :j AND idx = :i",
                 rewrite=json.dumps(rewrite), brief=brief, j=job.id, i=idx)
        marked = [idx]
        if cascade:
            rows = conn.rows(
                "UPDATE sections SET status = 'pending', partial_text = '', rewrite = CAST(:rewrite AS jsonb),"
                " summary = NULL WHERE job_id = :j AND idx > :i AND NOT locked AND current_version IS NOT NULL RETURNING idx",
                rewrite=json.dumps({"after": idx}), j=job.id, i=idx)
            marked += sorted(row["idx"] for row in rows)
        revision = {"section": idx, "cascade": cascade, "sections": marked}
        if instructions:
            revision["instructions"] = instructions
        conn.run("UPDATE jobs SET revision = CAST(:revision AS jsonb) WHERE id = :j", revision=json.dumps(revision),
                 j=job.id)
        return marked

    def cancel_revision(self, tenant: str, external_id: str) -> TransitionResult | None:
        """Cancel a revision of a completed job: every section keeps (or gets back) the version
        that was current before its rewrite, and the job is completed again, its manuscript
        assembled from those. None when the job is not revising a completed manuscript (a plain
        cancel applies)."""
        with self.db.transaction() as conn:
            job = conn.row(
                "SELECT id, external_id, title, status, manuscript_revision FROM jobs WHERE external_id = :e"
                " AND tenant = :t AND revision IS NOT NULL AND manuscript_key IS NOT NULL"
                " AND status IN ('queued', 'running', 'paused') FOR UPDATE", e=external_id, t=tenant)
            if job is None or conn.row("SELECT 1 AS unwritten FROM sections WHERE job_id = :j"
                                       " AND current_version IS NULL LIMIT 1", j=job["id"]):
                return None
            # The consumer's fenced writes skip a section that is done again; a stream still
            # running is stopped by the cancel command the caller sends.
            conn.run("UPDATE sections SET status = 'done', partial_text = '', rewrite = NULL"
                     " WHERE job_id = :j AND status <> 'done'", j=job["id"])
            conn.run("UPDATE jobs SET status = 'completed', status_reason = 'revision_cancelled', revision = NULL,"
                     " finished_at = now(), updated_at = now() WHERE id = :j", j=job["id"])
            # A section may have been stored while the revision ran: the manuscript shows what is current.
            reassemble(conn, self.blobs, job)
        return TransitionResult(job=self.jobs.get(tenant, external_id), changed=True, previous=JobStatus(job["status"]))

    def set_lock(self, tenant: str, external_id: str, idx: int, locked: bool) -> Row:
        """Lock or unlock a written section. Locking needs the job at rest (a pending rewrite of
        the section, in a paused revision, is dropped); unlocking may happen at any time."""
        with self.db.transaction() as conn:
            if locked:
                job = job_at_rest(conn, tenant, external_id, "lock a section")
            else:
                job = job_row(conn, tenant, external_id, lock=True)
            section_row(conn, job, idx, lock=True)
            return conn.row(
                "UPDATE sections SET locked = :locked,"
                " status = CASE WHEN :locked THEN 'done' ELSE status END,"
                " partial_text = CASE WHEN :locked THEN '' ELSE partial_text END,"
                " rewrite = CASE WHEN :locked THEN NULL ELSE rewrite END"
                " WHERE job_id = :j AND idx = :i RETURNING idx, locked, current_version",
                locked=locked, j=job["id"], i=idx)

    def fork(self, source: Job, from_section: int, outline: list[OutlineItem] | None) -> Job:
        """A new job (created, not started) with the source's brief, model, params and budget,
        whose sections before `from_section` are the source's current versions, shared (the same
        S3 objects, no call made, nothing billed), and which writes the rest: the source's
        outline from there on, or `outline` in its place."""
        sections = self.jobs.sections(source.id)
        if not 0 <= from_section <= len(sections):
            raise Conflict(f"from_section must be from 0 to {len(sections)} (the job has {len(sections)} sections).")
        unwritten = [s.idx for s in sections[:from_section] if s.current_version is None]
        if unwritten:
            raise Conflict(f"Section {unwritten[0]} of job {source.external_id} has not been written yet; a fork shares "
                           "only written sections. Fork from an earlier section, or let the job write it first.")
        kept = [OutlineItem(s.title, s.brief, s.target_words) for s in sections[:from_section]]
        rest = outline if outline is not None else [OutlineItem(s.title, s.brief, s.target_words)
                                                    for s in sections[from_section:]]
        if not kept + rest:
            raise Conflict("The fork would have no sections: give an outline for it.")
        # Its context carries over; the source's outline review was done (the fork's outline is given).
        options: dict[str, Any] = {key: value for key, value in source.options.items() if key == "context"}
        options["forked_from"] = {"job": source.external_id, "from_section": from_section}

        def share(conn: Connection, fork: Job) -> None:
            conn.run(
                "UPDATE sections AS f SET status = 'done', content_key = s.content_key,"
                " content_sha256 = s.content_sha256, content_chars = s.content_chars, current_version = 1,"
                " summary = s.summary, completed_at = now()"
                " FROM sections s WHERE s.job_id = :source AND f.job_id = :fork AND f.idx = s.idx AND s.idx < :n",
                source=source.id, fork=fork.id, n=from_section)
            conn.run(
                f"{INSERT_VERSION} SELECT :fork, s.idx, 1, s.content_key, s.content_sha256, s.content_chars, 'fork',"
                " jsonb_build_object('job', CAST(:ext AS text), 'index', s.idx, 'version', s.current_version), 0, 0, 0"
                " FROM sections s WHERE s.job_id = :source AND s.idx < :n",
                fork=fork.id, ext=source.external_id, source=source.id, n=from_section)

        return self.jobs.create(NewJob(
            tenant=source.tenant, title=source.title, brief=source.brief, model=source.model,
            outline=kept + rest, section_count=None, params=source.params, budget=source.budget,
            metadata=source.metadata, priority=source.priority, options=options, tier=source.tier), then=share)
