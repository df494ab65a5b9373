"""The manuscript: a job's sections, each at its current version, assembled into one markdown
document and stored under the key of its revision (store/blobs.py's manuscript_key)."""

from __future__ import annotations

from .blobs import BlobStore, manuscript_key
from .db import Connection


def assemble(title: str, sections: list[tuple[str, str]]) -> str:
    parts = [f"# {title}\n"]
    for heading, body in sections:
        parts.append(f"## {heading}\n\n{body.strip()}\n")
    return "\n".join(parts)


def reassemble(conn: Connection, blobs: BlobStore, job: dict, *, replaced: dict[int, str] | None = None) -> str:
    """Inside the caller's transaction, which holds the job's row (`id`, `external_id`, `title`,
    `manuscript_revision`): assemble the current versions, store them under the next revision's
    key and point the job at it. `replaced`: texts the caller has just stored, not to be read back.
    A crash before the commit leaves the job on its previous manuscript; the next try writes the
    same key again."""
    replaced = replaced or {}
    rows = conn.rows("SELECT idx, title, content_key FROM sections WHERE job_id = :j ORDER BY idx", j=job["id"])
    body = assemble(job["title"], [
        (row["title"], replaced[row["idx"]] if row["idx"] in replaced else blobs.get(row["content_key"]).decode("utf-8"))
        for row in rows])
    revision = job["manuscript_revision"] + 1
    key = manuscript_key(job["external_id"], revision)
    blobs.put(key, body.encode("utf-8"))
    conn.run("UPDATE jobs SET manuscript_key = :key, manuscript_revision = :r, updated_at = now() WHERE id = :j",
             key=key, r=revision, j=job["id"])
    return key
