"""Prompts for the outline step and for each section."""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any

from pydantic import BaseModel, Field, ValidationError

from ..errors import OutlineInvalid
from ..store.jobs import DEFAULT_SECTION_COUNT, Job, OutlineItem, Section
from .providers.base import GenerationRequest
from ..text import strip_unstorable

SYSTEM = (
    "You write long, well-structured documents one section at a time. Write in clear prose, "
    "stay consistent with the outline and with what came before, and never repeat earlier sections."
)
PREVIOUS_TAIL_CHARS = 1200
CURRENT_TEXT_CHARS = 12_000  # of a section being rewritten (or summarised), quoted in the prompt
SUMMARY_SYSTEM = "You summarise long documents faithfully and briefly, for the writer of their next section."
SUMMARY_WORDS = 250
SUMMARY_MAX_TOKENS = 400


class _OutlineEntry(BaseModel):
    title: str = Field(min_length=1, max_length=300)
    brief: str = Field(default="", max_length=2000)


class _Outline(BaseModel):
    sections: list[_OutlineEntry]


def outline_schema(section_count: int) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "required": ["sections"],
        "properties": {
            "sections": {
                "type": "array",
                "minItems": section_count,
                "maxItems": section_count,
                "items": {
                    "type": "object",
                    "additionalProperties": False,
                    "required": ["title", "brief"],
                    "properties": {"title": {"type": "string"}, "brief": {"type": "string"}},
                },
            }
        },
    }


def outline_request(job: Job) -> GenerationRequest:
    count = job.section_count or DEFAULT_SECTION_COUNT
    prompt = (
        f"Plan a document titled {json.dumps(job.title)}.\n\nBrief:\n{job.brief}\n\n"
        f"Return JSON with exactly {count} sections, each with a short title and a one-paragraph "
        "brief of what it must cover, in reading order."
    )
    return GenerationRequest(
        model=job.model,
        system=SYSTEM,
        prompt=prompt,
        temperature=job.params.get("temperature"),
        json_schema=outline_schema(count),
    )


def parse_outline(text: str, expected_count: int) -> list[OutlineItem]:
    """Validate the provider's outline whether or not the server enforced the schema."""
    try:
        outline = _Outline.model_validate_json(text)
    except ValidationError as exc:
        raise OutlineInvalid(f"The provider's outline is not valid JSON of the required shape: {exc.errors()[:3]}") from exc
    if len(outline.sections) != expected_count:
        raise OutlineInvalid(
            f"The provider's outline has {len(outline.sections)} sections; {expected_count} were asked for."
        )
    # A NUL or lone surrogate in the model's JSON would make Postgres refuse the outline, and the
    # job pay for it again on every retry: drop what cannot be stored, as from section text.
    return [OutlineItem(title=strip_unstorable(entry.title).strip(), brief=strip_unstorable(entry.brief).strip())
            for entry in outline.sections]


def parallel_width(job: Job) -> int:
    """How many of the job's sections may be written at once (`params.parallel_sections`, 1 by default)."""
    return max(1, int(job.params.get("parallel_sections") or 1))


def section_request(job: Job, sections: list[Section], section: Section, previous_text: str | None, *,
                    current_text: str | None = None, summary: str | None = None) -> GenerationRequest:
    """The prompt of one section: the document, the whole outline, the section's own brief (and
    its length in words, when it has a target), and the tail of the section before it; or, with
    `previous_text` None (sections written at once, when the one before may not exist yet), what
    its neighbours cover instead. `summary`: what the document said so far (context "summary").
    A rewrite (the section marked by a regeneration) also carries its current text
    (`current_text`) and what to change."""
    outline = "\n".join(f"{s.idx + 1}. {s.title}" + (f": {s.brief}" if s.brief else "") for s in sections)
    parts = [
        f"Document: {job.title}",
        f"Brief:\n{job.brief}",
        f"Outline:\n{outline}",
        f"Write section {section.idx + 1}, \"{section.title}\"." + (f" It must cover: {section.brief}" if section.brief else ""),
    ]
    if section.target_words:
        parts.append(f"Write about {section.target_words} words.")
    if summary:
        parts.append(f"What the document has said so far, in summary:\n{summary}")
    if previous_text:
        parts.append(f"The previous section ended with:\n…{previous_text[-PREVIOUS_TAIL_CHARS:]}")
    elif previous_text is None:
        for neighbour, where in ((section.idx - 1, "comes before it"), (section.idx + 1, "comes after it")):
            if 0 <= neighbour < len(sections):
                other = sections[neighbour]
                parts.append(f"Section {neighbour + 1}, \"{other.title}\", {where}"
                             + (f" and covers: {other.brief}" if other.brief else "")
                             + "; do not repeat what it covers.")
    if section.rewrite is not None:
        if current_text:
            parts.append(f"This section is being rewritten. Its current text:\n{current_text[:CURRENT_TEXT_CHARS]}")
        if section.rewrite.get("instructions"):
            parts.append(f"Rewrite it following these instructions from the writer:\n{section.rewrite['instructions']}")
        elif "after" in section.rewrite:
            parts.append(f"Section {section.rewrite['after'] + 1} was revised: rewrite this one so that it stays "
                         "consistent with the sections before it.")
    parts.append("Write only the body of this section, without its heading.")
    return GenerationRequest(
        model=job.model,
        system=SYSTEM,
        prompt="\n\n".join(parts),
        prefix=section.partial_text,
        max_tokens=job.params.get("max_tokens_per_section"),
        temperature=job.params.get("temperature"),
    )


def continuation_request(request: GenerationRequest, written: str, words_short: int) -> GenerationRequest:
    """The same section, continued after `written`, which ended short of its target length."""
    return replace(request, prompt=f"{request.prompt}\n\nThe section so far is about {words_short} words short "
                                   "of its length: continue it from where it stops, without repeating it.",
                   prefix=written)


def summary_request(job: Job, section: Section, text: str, summary_before: str | None) -> GenerationRequest:
    """A short running summary of the document through `section`: the one before, extended by it."""
    parts = [f"Document: {job.title}"]
    if summary_before:
        parts.append(f"Summary of the sections before:\n{summary_before}")
    parts.append(f"Section {section.idx + 1}, \"{section.title}\":\n{text[:CURRENT_TEXT_CHARS]}")
    parts.append(f"Write a summary of the document so far, sections 1 to {section.idx + 1}, in at most "
                 f"{SUMMARY_WORDS} words: what each section established, the names, facts and claims a later "
                 "section must stay consistent with.")
    return GenerationRequest(model=job.model, system=SUMMARY_SYSTEM, prompt="\n\n".join(parts),
                             max_tokens=SUMMARY_MAX_TOKENS, temperature=0.0)


def words_in(text: str) -> int:
    return len(text.split())
