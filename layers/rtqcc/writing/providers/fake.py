"""A deterministic offline provider: the same request always yields the same text, streamed
at a configurable pace. The default when no API key is set, and the workhorse of the tests."""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
from typing import Callable

from ..abort import AbortSignal
from ..tokens import count_tokens
from .base import GenerationRequest, GenerationResult, OnWait
from .stream_loop import run_stream

_WORDS = (
    "the system records each step so that work survives a crash and resumes where it stopped "
    "durable queues carry jobs between stateless functions while a lease keeps two workers apart "
    "every section is stored before it is marked done and readers follow progress as it happens "
    "careful accounting of tokens lets teams see the cost of long documents before it surprises them "
    "design choices favour plain contracts small modules and tests that exercise real services"
).split()

DEFAULT_SECTION_TOKENS = 120


class FakeProvider:
    name = "fake"

    def __init__(self, *, tokens_per_s: float = 0.0, first_token_ms: int = 0):
        self.tokens_per_s = tokens_per_s
        self.first_token_ms = first_token_ms

    def stream(self, request: GenerationRequest, abort: AbortSignal,
               on_delta: Callable[[str], None], on_wait: OnWait | None = None) -> GenerationResult:
        full = self.full_text(request)
        # Continue after the prefix when it is ours; a foreign prefix is followed by a fresh answer.
        remaining = full[len(request.prefix):] if full.startswith(request.prefix) else full
        pieces = _split_tokens(remaining)
        if self.tokens_per_s <= 0 and not self.first_token_ms:
            # Instant: no waiting, so no reason to leave the run's thread.
            produced: list[str] = []
            for piece in pieces:
                if abort.aborted:
                    return self._aborted(produced, abort)
                produced.append(piece)
                on_delta(piece)
            return self._finished(request, produced)
        return run_stream(lambda: self._paced(request, pieces, abort, on_delta), abort)

    async def _paced(self, request: GenerationRequest, pieces: list[str], abort: AbortSignal,
                     on_delta: Callable[[str], None]) -> GenerationResult:
        loop = asyncio.get_running_loop()
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
        produced: list[str] = []
        try:
            if self.first_token_ms:
                await asyncio.sleep(self.first_token_ms / 1000)
            # Each token is due on the stream's own clock, as a server sends it whether or not its
            # reader keeps up: a late reader gets what it missed at once, as from a socket's buffer.
            due = loop.time()
            for piece in pieces:
                due += interval
                await asyncio.sleep(due - loop.time())
                if abort.aborted:  # raised by on_delta itself (a budget reached)
                    return self._aborted(produced, abort)
                produced.append(piece)
                on_delta(piece)
        except asyncio.CancelledError:
            return self._aborted(produced, abort)
        return self._finished(request, produced)

    def _finished(self, request: GenerationRequest, produced: list[str]) -> GenerationResult:
        text = "".join(produced)
        return GenerationResult(
            text=text,
            finish_reason="stop",
            reported_prompt_tokens=(count_tokens(request.system, request.model)
                                    + count_tokens(request.prompt + request.prefix, request.model)),
            reported_completion_tokens=count_tokens(text, request.model),
        )

    def full_text(self, request: GenerationRequest) -> str:
        seed = hashlib.sha256(f"{request.model}\0{request.system}\0{request.prompt}".encode()).digest()
        rng = random.Random(seed)
        if request.json_schema is not None:
            return json.dumps(_outline(rng, request.json_schema))
        return _prose(rng, request.max_tokens or DEFAULT_SECTION_TOKENS)

    def _aborted(self, produced: list[str], abort: AbortSignal) -> GenerationResult:
        # Like a real server cut short: no finish reason and no usage report.
        return GenerationResult(text="".join(produced), finish_reason=None, aborted=abort.reason or "aborted")


def _split_tokens(text: str) -> list[str]:
    """Words with their leading whitespace, so the pieces join back to exactly the text."""
    pieces: list[str] = []
    start = 0
    for index in range(1, len(text)):
        if text[index].isspace() and not text[index - 1].isspace():
            pieces.append(text[start:index])
            start = index
    if start < len(text):
        pieces.append(text[start:])
    return pieces


def _prose(rng: random.Random, tokens: int) -> str:
    paragraphs: list[str] = []
    words_left = max(tokens, 1)
    while words_left > 0:
        sentences = []
        for _ in range(rng.randint(2, 4)):
            length = min(words_left, rng.randint(8, 16))
            if length <= 0:
                break
            words = [rng.choice(_WORDS) for _ in range(length)]
            words_left -= length
            sentences.append(" ".join(words).capitalize() + ".")
        paragraphs.append(" ".join(sentences))
    return "\n\n".join(paragraphs)


def _outline(rng: random.Random, schema: dict) -> dict:
    sections_schema = schema.get("properties", {}).get("sections", {})
    count = sections_schema.get("minItems") or 5
    return {
        "sections": [
            {
                "title": " ".join(rng.choice(_WORDS) for _ in range(3)).title(),
                "brief": " ".join(rng.choice(_WORDS) for _ in range(12)).capitalize() + ".",
            }
            for _ in range(count)
        ]
    }
