"""Sections: the parts of a job's outline, each a row that a consumer fills in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..status import SectionStatus
from .db import Connection, Row


@dataclass(frozen=True)
class OutlineItem:
    title: str
    brief: str = ""
    target_words: int | None = None  # a section the model ends well short of this is continued


@dataclass(frozen=True)
class Section:
    idx: int
    title: str
    brief: str
    status: SectionStatus
    partial_text: str
    content_key: str | None
    content_sha256: str | None
    content_chars: int | None = None
    current_version: int | None = None  # the version the manuscript uses; None until the first is done
    locked: bool = False                # never rewritten by the model while locked
    rewrite: dict[str, Any] | None = None  # what a pending rewrite must do ({"instructions": ...})
    target_words: int | None = None
    summary: str | None = None          # the document so far, summarised up to this section

    @property
    def next_version(self) -> int:
        """The version its next text becomes."""
        return (self.current_version or 0) + 1

    @classmethod
    def from_row(cls, row: Row) -> "Section":
        return cls(
            idx=row["idx"],
            title=row["title"],
            brief=row["brief"],
            status=SectionStatus(row["status"]),
            partial_text=row["partial_text"],
            content_key=row["content_key"],
            content_sha256=row["content_sha256"],
            content_chars=row["content_chars"],
            current_version=row["current_version"],
            locked=row["locked"],
            rewrite=row["rewrite"],
            target_words=row["target_words"],
            summary=row["summary"],
        )


SECTION_COLUMNS = ("idx, title, brief, status, partial_text, content_key, content_sha256, content_chars,"
                   " current_version, locked, rewrite, target_words, summary")


def insert_sections(conn: Connection, job_id: int, outline: list[OutlineItem]) -> None:
    for idx, item in enumerate(outline):
        conn.run(
            "INSERT INTO sections (job_id, idx, title, brief, target_words) VALUES (:j, :i, :title, :brief, :words)",
            j=job_id,
            i=idx,
            title=item.title,
            brief=item.brief,
            words=item.target_words,
        )
