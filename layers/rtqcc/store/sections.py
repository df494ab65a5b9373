"""Sections: the parts of a job's outline, each a row that a consumer fills in order."""

from __future__ import annotations

from dataclasses import dataclass

from ..status import SectionStatus
from .db import Connection, Row


@dataclass(frozen=True)
class OutlineItem:
    title: str
    brief: str = ""


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
        )


def insert_sections(conn: Connection, job_id: int, outline: list[OutlineItem]) -> None:
    for idx, item in enumerate(outline):
        conn.run(
            "INSERT INTO sections (job_id, idx, title, brief) VALUES (:j, :i, :title, :brief)",
            j=job_id,
            i=idx,
            title=item.title,
            brief=item.brief,
        )
