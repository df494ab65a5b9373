"""The fault suite's oracle: whatever was killed, cut or restarted, Postgres, S3 and Redis must
agree about every job afterwards.

For each job it checks:
- every section marked done points at its current version's key (`manuscripts/{id}/sections/{n}.md`
  for version 1, `{n}.v{k}.md` after), that object exists, and its SHA-256 and length are what
  Postgres recorded (nothing marked done that is not stored);
- each section's versions run 1, 2, ... with no gap, the last one current, each stored in S3 with
  the SHA-256 its row records: no version lost, none made twice;
- no stray objects under the job's prefix (nothing stored twice under another name);
- a completed job has every section done and a manuscript at the key of its latest revision
  that holds each section's current text exactly once, in order, under its heading;
- with the deterministic fake provider, each version the model wrote is exactly what one
  uninterrupted generation of its prompt gives (for a rewrite, the prompt that quoted the version
  before it and the section before as it then was): a resumed or regenerated section neither
  repeats nor drops a token;
- the job is completed, failed, cancelled, paused or queued, or running under a live lease or
  with a message still waiting for it: never stuck `running` with no one to finish it.

`Tally.of(verdicts)` adds up the jobs checked and the sections lost or duplicated."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

from redis import Redis
from redis.exceptions import ResponseError

from rtqcc.store.blobs import BlobMissing, manuscript_key, section_key
from rtqcc.store.db import Database
from rtqcc.store.jobs import JobStore
from rtqcc.store.manuscripts import assemble
from rtqcc.writing.prompts import parallel_width, section_request
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.status import JobStatus, SectionStatus
from rtqcc.bus.events import stream_id_tuple
from rtqcc.bus.work_queue import GROUP, STREAM

SETTLED = {JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED, JobStatus.PAUSED, JobStatus.QUEUED}


@dataclass
class Verdict:
    external_id: str
    status: str
    sections: int = 0
    lost: list[int] = field(default_factory=list)        # sections whose stored content is gone or wrong
    duplicated: list[int] = field(default_factory=list)  # sections whose text appears more than once
    problems: list[str] = field(default_factory=list)    # anything else that breaks the contract

    @property
    def ok(self) -> bool:
        return not (self.lost or self.duplicated or self.problems)

    def __str__(self) -> str:
        return (f"{self.external_id} ({self.status}, {self.sections} sections): lost {self.lost}, "
                f"duplicated {self.duplicated}, problems {self.problems}")


@dataclass(frozen=True)
class Tally:
    jobs: int
    lost: int
    duplicated: int

    @classmethod
    def of(cls, verdicts: list[Verdict]) -> "Tally":
        return cls(len(verdicts), sum(len(v.lost) for v in verdicts), sum(len(v.duplicated) for v in verdicts))

    def line(self) -> str:
        return f"jobs {self.jobs}, sections lost {self.lost}, duplicated {self.duplicated}"


def has_waiting_message(redis: Redis, external_id: str) -> bool:
    """A message for the job that some consumer will still handle: not yet delivered, or
    delivered and not acknowledged (pending, so it is reclaimed if its consumer died)."""
    try:
        groups = {g["name"]: g for g in redis.xinfo_groups(STREAM)}
    except ResponseError:
        return False
    group = groups.get(GROUP)
    last_delivered = stream_id_tuple(group["last-delivered-id"]) if group else (0, 0)
    pending = {row["message_id"] for row in redis.xpending_range(STREAM, GROUP, min="-", max="+", count=100_000)} \
        if group else set()
    return any(fields.get("externalId") == external_id
               and (entry_id in pending or stream_id_tuple(entry_id) > last_delivered)
               for entry_id, fields in redis.xrange(STREAM))


def check_job(external_id: str, *, db: Database, blobs, redis: Redis, provider: FakeProvider | None = None) -> Verdict:
    jobs = JobStore(db)
    job = jobs.get_by_external_id(external_id)
    if job is None:
        return Verdict(external_id, "missing", problems=["no such job in Postgres"])
    verdict = Verdict(external_id, job.status.value)
    lease = db.row("SELECT lease_owner, lease_expires_at > now() AS live FROM jobs WHERE id = :j", j=job.id)
    if job.status not in SETTLED and not (job.status == JobStatus.RUNNING and lease["live"]) \
            and not has_waiting_message(redis, external_id):
        verdict.problems.append(f"stuck {job.status.value}: lease {lease}, and no message waits for it")

    sections = jobs.sections(job.id)
    verdict.sections = len(sections)
    rows = {row["idx"]: row for row in db.rows("SELECT idx, content_chars FROM sections WHERE job_id = :j", j=job.id)}
    texts: dict[int, str] = {}
    for section in sections:
        if section.status != SectionStatus.DONE:
            if job.status == JobStatus.COMPLETED:
                verdict.lost.append(section.idx)
                verdict.problems.append(f"section {section.idx} is {section.status.value} in a completed job")
            continue
        if section.content_key != _current_key(db, job, section):
            verdict.problems.append(f"section {section.idx} points at {section.content_key!r}")
        try:
            body = blobs.get(section.content_key)
        except BlobMissing:
            verdict.lost.append(section.idx)
            verdict.problems.append(f"section {section.idx} is done but {section.content_key} is not in S3")
            continue
        if hashlib.sha256(body).hexdigest() != section.content_sha256:
            verdict.lost.append(section.idx)
            verdict.problems.append(f"section {section.idx}: S3 holds other bytes than Postgres's sha256 says")
            continue
        texts[section.idx] = body.decode("utf-8")
        if rows[section.idx]["content_chars"] != len(texts[section.idx]):
            verdict.problems.append(f"section {section.idx}: {len(texts[section.idx])} chars stored, "
                                    f"{rows[section.idx]['content_chars']} recorded")

    versions = _versions(db, job.id)
    _check_versions(verdict, job, sections, versions, blobs)
    if provider is not None and job.context == "tail" and not any(s.target_words for s in sections):
        _check_generations(verdict, job, sections, versions, blobs, provider)

    stray = _stray_objects(blobs, job, versions)
    if stray:
        verdict.problems.append(f"objects no section owns: {stray}")

    if job.status == JobStatus.COMPLETED and len(texts) == len(sections):
        _check_manuscript(verdict, job, sections, texts, blobs)
    return verdict


def _check_manuscript(verdict: Verdict, job, sections, texts: dict[int, str], blobs) -> None:
    key = manuscript_key(job.external_id, job.manuscript_revision)
    if job.manuscript_key != key:
        verdict.problems.append(f"the manuscript key is {job.manuscript_key!r}, not {key!r}")
    try:
        manuscript = blobs.get(key).decode("utf-8")
    except BlobMissing:
        verdict.problems.append(f"completed, but {key} is not in S3")
        return
    position = 0
    for section in sections:
        body = texts[section.idx].strip()
        found = manuscript.count(body)
        if found == 0:
            verdict.lost.append(section.idx)
        elif found > 1:
            verdict.duplicated.append(section.idx)
        at = manuscript.find(f"## {section.title}\n\n{body}\n", position)
        if found == 1 and at < 0:
            verdict.problems.append(f"section {section.idx} is out of order or under the wrong heading")
        position = max(position, at)
    if manuscript != assemble(job.title, [(s.title, texts[s.idx]) for s in sections]):
        verdict.problems.append("the manuscript is not the assembly of its stored sections")


def _versions(db: Database, job_id: int) -> dict[int, list[dict]]:
    """Each section's versions, oldest first."""
    found: dict[int, list[dict]] = {}
    for row in db.rows("SELECT idx, version, content_key, content_sha256, content_chars, maker, made_with, created_at"
                       " FROM section_versions WHERE job_id = :j ORDER BY idx, version", j=job_id):
        found.setdefault(row["idx"], []).append(row)
    return found


def _current_key(db: Database, job, section) -> str | None:
    row = db.row("SELECT content_key FROM section_versions WHERE job_id = :j AND idx = :i AND version = :v",
                 j=job.id, i=section.idx, v=section.current_version)
    return row["content_key"] if row else section_key(job.external_id, section.idx, section.current_version or 1)


def _check_versions(verdict: Verdict, job, sections, versions: dict[int, list[dict]], blobs) -> None:
    for section in sections:
        made = versions.get(section.idx, [])
        numbers = [v["version"] for v in made]
        if numbers != list(range(1, len(made) + 1)):
            verdict.problems.append(f"section {section.idx} has versions {numbers}")
        if section.current_version != (numbers[-1] if numbers else None):
            verdict.problems.append(f"section {section.idx} is at version {section.current_version}, its last is "
                                    f"{numbers[-1] if numbers else None}")
        for version in made:
            if version["maker"] != "fork" and version["content_key"] != section_key(
                    job.external_id, section.idx, version["version"]):
                verdict.problems.append(f"section {section.idx} version {version['version']} is stored at "
                                        f"{version['content_key']!r}")
            try:
                body = blobs.get(version["content_key"])
            except BlobMissing:
                verdict.lost.append(section.idx)
                verdict.problems.append(f"section {section.idx} version {version['version']} is not in S3")
                continue
            if hashlib.sha256(body).hexdigest() != version["content_sha256"] or len(body.decode()) != version["content_chars"]:
                verdict.lost.append(section.idx)
                verdict.problems.append(f"section {section.idx} version {version['version']}: S3 holds other bytes")


def _check_generations(verdict: Verdict, job, sections, versions: dict[int, list[dict]], blobs,
                       provider: FakeProvider) -> None:
    """Each version the model wrote against what one uninterrupted generation of its prompt gives."""
    in_parallel = parallel_width(job) > 1  # then no section's prompt holds the text before it
    for section in sections:
        made = versions.get(section.idx, [])
        for number, version in enumerate(made, start=1):
            if version["maker"] != "model":
                continue
            if in_parallel:
                previous = None
            elif section.idx == 0:
                previous = ""
            else:
                before = [v for v in versions.get(section.idx - 1, []) if v["created_at"] < version["created_at"]]
                if not before:
                    continue
                previous = blobs.get(before[-1]["content_key"]).decode("utf-8")
            rewrite, current = None, None
            if number > 1:
                made_with = version["made_with"]
                rewrite = ({"after": made_with["after"]} if made_with.get("kind") == "cascade"
                           else {"instructions": made_with["instructions"]} if made_with.get("instructions") else {})
                current = blobs.get(made[number - 2]["content_key"]).decode("utf-8")
            as_written = replace(section, rewrite=rewrite, partial_text="")
            expected = provider.full_text(section_request(job, sections, as_written, previous, current_text=current))
            try:
                got = blobs.get(version["content_key"]).decode("utf-8")
            except BlobMissing:
                continue  # counted by _check_versions
            if got != expected:
                if got.count(expected[: max(20, len(expected) // 3)]) > 1 or len(got) > len(expected):
                    verdict.duplicated.append(section.idx)
                else:
                    verdict.lost.append(section.idx)
                verdict.problems.append(f"section {section.idx} version {number} is not what one uninterrupted "
                                        f"generation gives ({len(got)} chars, expected {len(expected)})")


def _stray_objects(blobs, job, versions: dict[int, list[dict]]) -> list[str]:
    client = getattr(blobs, "client", None)
    if client is None:
        return []
    prefix = f"manuscripts/{job.external_id}/"
    expected = {v["content_key"] for made in versions.values() for v in made}
    expected |= {manuscript_key(job.external_id, r) for r in range(job.manuscript_revision + 1)}
    found = client.list_objects_v2(Bucket=blobs.bucket, Prefix=prefix)
    return sorted(obj["Key"] for obj in found.get("Contents", []) if obj["Key"] not in expected)
