"""The provider boundary: one method, streaming deltas to a callback."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from ..abort import AbortSignal


@dataclass(frozen=True)
class GenerationRequest:
    model: str
    system: str
    prompt: str
    prefix: str = ""  # text already written for this answer: continue after it, never repeat it
    max_tokens: int | None = None
    temperature: float | None = None
    json_schema: dict[str, Any] | None = None  # ask for structured output matching this schema


@dataclass(frozen=True)
class GenerationResult:
    text: str                          # what this call produced, without the prefix
    finish_reason: str | None          # None: the stream ended without one (aborted or cut)
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None
    aborted: str | None = None         # the abort reason, if the stream was stopped on purpose
    extra: dict[str, Any] = field(default_factory=dict)


class Provider(Protocol):
    name: str

    def stream(self, request: GenerationRequest, abort: AbortSignal,
               on_delta: Callable[[str], None]) -> GenerationResult:
        """Stream the answer, calling `on_delta` for each piece, until done or `abort` fires."""
        ...
