"""Versions of sections: every text a section has had, immutable once stored, the current one
named by the section's row. Content goes to S3 first, under a deterministic key, then its row
and the section's pointer in one transaction: a crash between leaves the previous version current
and the object is written again, to the same key, by the next try.

The model's versions are made by the consumer (store/leases.py's complete_section); the ones
made by a person (an edit, a restore) here, under the job's row lock and an If-Match check, so
two editors cannot overwrite each other silently."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from ..errors import Conflict, JobNotFound, NotFound, PreconditionFailed, PreconditionRequired, SectionLocked
from ..status import AT_REST, JobStatus
from .attempts import BILLED_COMPLETION, BILLED_PROMPT
from .blobs import BlobStore, section_key
from .db import Connection, Database, Row
from .manuscripts import reassemble

INSERT_VERSION = (
    "INSERT INTO section_versions (job_id, idx, version, content_key, content_sha256, content_chars, maker,"
    " made_with, prompt_tokens, completion_tokens, cost_usd)"
)
# What a version cost, summed over rows of generation_attempts (its calls).
VERSION_COST = (
    f"SELECT COALESCE(SUM({BILLED_PROMPT}), 0)::int AS prompt_tokens,"
    f" COALESCE(SUM({BILLED_COMPLETION}), 0)::int AS completion_tokens,"
    " CASE WHEN BOOL_OR(cost_usd IS NULL) THEN NULL ELSE COALESCE(SUM(cost_usd), 0) END AS cost_usd"
)
_VERSION_COLUMNS = ("idx, version, content_key, content_sha256, content_chars, maker, made_with, prompt_tokens,"
                    " completion_tokens, cost_usd, created_at")


@dataclass(frozen=True)
class SectionVersion:
    idx: int
    version: int
    content_key: str
    sha256: str
    chars: int
    maker: str                   # model, human, restore or fork
    made_with: dict[str, Any]    # the model and its parameters, who edited, what was restored or forked
    prompt_tokens: int
    completion_tokens: int
    cost_usd: float | None
    created_at: datetime

    @classmethod
    def from_row(cls, row: Row) -> "SectionVersion":
        return cls(idx=row["idx"], version=row["version"], content_key=row["content_key"],
                   sha256=row["content_sha256"], chars=row["content_chars"], maker=row["maker"],
                   made_with=row["made_with"] or {}, prompt_tokens=row["prompt_tokens"],
                   completion_tokens=row["completion_tokens"], cost_usd=row["cost_usd"], created_at=row["created_at"])

    def public(self, current: int | None) -> dict:
        return {
            "version": self.version,
            "current": self.version == current,
            "maker": self.maker,
            "made_with": self.made_with,
            "created_at": self.created_at.strftime("%Y-%m-%dT%H:%M:%S.%fZ"),
            "chars": self.chars,
            "sha256": self.sha256,
            "usage": {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                      "total_tokens": self.prompt_tokens + self.completion_tokens,
                      "cost_usd": None if self.cost_usd is None else round(self.cost_usd, 8)},
            "etag": etag(self.version),
        }


def etag(version: int) -> str:
    return f'"v{version}"'


def check_if_match(if_match: str | None, current: int, *, required: bool) -> None:
    """`If-Match` against the current version's ETag: 412 when it names another, 428 when it is
    required and missing. `*` matches whatever is current."""
    if if_match is None or not if_match.strip():
        if required:
            raise PreconditionRequired(
                f"Send If-Match with the section's ETag ({etag(current)} now, from GET of the section), "
                "so an edit cannot overwrite a version you have not seen; If-Match: * overwrites whatever is current.")
        return
    tags = [tag.strip().removeprefix("W/") for tag in if_match.split(",")]
    if "*" in tags or etag(current) in tags:
        return
    raise PreconditionFailed(f"The section is at version {current} (ETag {etag(current)}), not the one If-Match names "
                             f"({if_match.strip()[:40]}): someone changed it first. Read it again and redo your change.")


class VersionStore:
    def __init__(self, db: Database, blobs: BlobStore):
        self.db = db
        self.blobs = blobs

    def versions(self, job_id: int, idx: int) -> list[SectionVersion]:
        rows = self.db.rows(f"SELECT {_VERSION_COLUMNS} FROM section_versions WHERE job_id = :j AND idx = :i"
                            " ORDER BY version", j=job_id, i=idx)
        return [SectionVersion.from_row(row) for row in rows]

    def version(self, job_id: int, idx: int, version: int) -> SectionVersion:
        row = self.db.row(f"SELECT {_VERSION_COLUMNS} FROM section_versions WHERE job_id = :j AND idx = :i"
                          " AND version = :v", j=job_id, i=idx, v=version)
        if row is None:
            raise NotFound(f"Section {idx} has no version {version}.")
        return SectionVersion.from_row(row)

    def content(self, version: SectionVersion) -> str:
        return self.blobs.get(version.content_key).decode("utf-8")

    def write_by_hand(self, tenant: str, external_id: str, idx: int, content: str, *, if_match: str | None,
                      maker: str = "human", made_with: dict[str, Any] | None = None,
                      if_match_required: bool = True) -> SectionVersion:
        """Store `content` as the section's next version, made by a person (`human`, or `restore`
        of an earlier one), and make it current; on a completed job the manuscript is assembled
        again in the same transaction. Only while no consumer writes the job."""
        body = content.encode("utf-8")
        sha256 = hashlib.sha256(body).hexdigest()
        with self.db.transaction() as conn:
            job = job_at_rest(conn, tenant, external_id, "edit its sections")
            section = section_row(conn, job, idx, lock=True)
            if section["locked"]:
                raise SectionLocked(f"Section {idx} is locked; unlock it before changing it.")
            check_if_match(if_match, section["current_version"], required=if_match_required)
            version = section["current_version"] + 1
            key = section_key(external_id, idx, version)
            self.blobs.put(key, body)
            row = conn.row(
                f"{INSERT_VERSION} VALUES (:j, :i, :v, :key, :sha, :chars, :maker, CAST(:made AS jsonb), 0, 0, 0)"
                f" RETURNING {_VERSION_COLUMNS}",
                j=job["id"], i=idx, v=version, key=key, sha=sha256, chars=len(content), maker=maker,
                made=json.dumps(made_with or {}))
            # A pending rewrite of this section (a paused revision) gives way to the person's text.
            conn.run("UPDATE sections SET status = 'done', partial_text = '', rewrite = NULL, summary = NULL,"
                     " content_key = :key,"
                     " content_sha256 = :sha, content_chars = :chars, current_version = :v, completed_at = now()"
                     " WHERE job_id = :j AND idx = :i", key=key, sha=sha256, chars=len(content), v=version,
                     j=job["id"], i=idx)
            if job["status"] == JobStatus.COMPLETED.value and job["manuscript_key"]:
                reassemble(conn, self.blobs, job, replaced={idx: content})
        assert row is not None
        return SectionVersion.from_row(row)

    def restore(self, tenant: str, external_id: str, idx: int, version: int, *, if_match: str | None) -> SectionVersion:
        """Make an earlier version's text current again, as a new version (history only grows, so
        an ETag never comes back to mean other text)."""
        with self.db.connection() as conn:
            job = job_row(conn, tenant, external_id)
        earlier = self.version(job["id"], idx, version)
        return self.write_by_hand(tenant, external_id, idx, self.content(earlier), if_match=if_match,
                                  maker="restore", made_with={"restored_from": version}, if_match_required=False)


def job_row(conn: Connection, tenant: str, external_id: str, *, lock: bool = False) -> Row:
    row = conn.row("SELECT id, external_id, title, status, manuscript_key, manuscript_revision, revision FROM jobs"
                   " WHERE external_id = :e AND tenant = :t" + (" FOR UPDATE" if lock else ""), e=external_id, t=tenant)
    if row is None:
        raise JobNotFound(f"No job {external_id} exists for this API key.")
    return row


def job_at_rest(conn: Connection, tenant: str, external_id: str, doing: str) -> Row:
    """The job's row, locked, if no consumer may be writing it (else 409)."""
    job = job_row(conn, tenant, external_id, lock=True)
    if JobStatus(job["status"]) not in AT_REST:
        raise Conflict(f"Job {external_id} is {job['status']}; pause it or let it finish before you {doing}.")
    return job


def section_row(conn: Connection, job: Row, idx: int, *, lock: bool = False, written: bool = True) -> Row:
    """The section's row (locked with `lock`); with `written`, 409 unless it has a current version."""
    row = conn.row("SELECT idx, status, locked, current_version, content_key FROM sections WHERE job_id = :j AND idx = :i"
                   + (" FOR UPDATE" if lock else ""), j=job["id"], i=idx)
    if row is None:
        count = conn.row("SELECT COUNT(*)::int AS n FROM sections WHERE job_id = :j", j=job["id"])["n"]
        raise NotFound(f"Job {job['external_id']} has no section {idx} (it has {count}).")
    if written and row["current_version"] is None:
        raise Conflict(f"Section {idx} has not been written yet; start or resume the job to write it.")
    return row
