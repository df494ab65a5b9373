"""The provider boundary: one method, streaming deltas to a callback."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable, Protocol

from ..abort import AbortSignal
from ...errors import ProviderError, RtqccError


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
class CallUsage:
    """What one HTTP call to the provider cost. One `stream()` may make several (a cut stream
    continued from its text); each is paid for, so each is recorded."""

    reported_prompt_tokens: int | None     # None: the server sent no usage (aborted, cut, not asked)
    reported_completion_tokens: int | None
    counted_prompt_tokens: int             # our own count of what was sent ...
    counted_completion_tokens: int         # ... and of what came back
    finish_reason: str | None
    aborted: str | None = None


@dataclass(frozen=True)
class GenerationResult:
    text: str                          # what this call produced, without the prefix
    finish_reason: str | None          # None: the stream ended without one (aborted or cut)
    reported_prompt_tokens: int | None = None
    reported_completion_tokens: int | None = None
    aborted: str | None = None         # the abort reason, if the stream was stopped on purpose
    # One entry per HTTP call that reached the model, in order. Empty: the provider made one
    # call and the caller counts it from the request and `text` (the fake provider).
    calls: list[CallUsage] = field(default_factory=list)


class WaitReason(StrEnum):
    """Why a call to the provider is held back before it goes out."""

    REQUESTS_PER_MIN = "requests_per_min"  # the requests per minute every consumer shares are spent for now
    TOKENS_PER_MIN = "tokens_per_min"      # the tokens per minute, likewise
    RATE_LIMITED = "rate_limited"          # the provider answered 429: every consumer holds the model back
    PROVIDER_ERROR = "provider_error"      # a failed call (5xx, network) is tried again after a backoff


@dataclass(frozen=True)
class ProviderWait:
    """A call held back: for what, and until when as known now (`time.time()`)."""

    model: str
    reason: WaitReason
    until: float


# Told when a call starts to wait (again, with a new estimate, while it waits) and, with None,
# when it goes out.
OnWait = Callable[[ProviderWait | None], None]


CONTINUE_INSTRUCTION = "Continue exactly where the text stops; do not repeat anything."


def chat_messages(request: GenerationRequest, prefix: str) -> list[dict[str, str]]:
    """The chat messages of a request: system, user prompt, and, to continue text already
    written, that text as the assistant's turn followed by an instruction to go on from it."""
    messages = []
    if request.system:
        messages.append({"role": "system", "content": request.system})
    messages.append({"role": "user", "content": request.prompt})
    if prefix:
        messages.append({"role": "assistant", "content": prefix})
        messages.append({"role": "user", "content": CONTINUE_INSTRUCTION})
    return messages


class ProviderRefused(ProviderError):
    """The server refused the work in a way a retry will not fix (no quota, bad key, unknown model).
    `partial` holds what earlier calls of the same answer produced and cost, if any."""

    def __init__(self, message: str, *, partial: GenerationResult | None = None, status: int | None = None):
        super().__init__(message)  # for the log: it may name the server and quote its answer
        self.partial = partial
        self.status = status


class QuotaExceeded(ProviderRefused):
    """The account behind the API key has no quota left (`insufficient_quota`)."""


class ProviderUnavailable(RtqccError):
    """The server kept refusing or could not be reached (rate limits, 5xx, network) after every
    retry. Transient: the job is handed back, not failed."""


class Provider(Protocol):
    name: str

    def stream(self, request: GenerationRequest, abort: AbortSignal,
               on_delta: Callable[[str], None], on_wait: OnWait | None = None) -> GenerationResult:
        """Stream the answer, calling `on_delta` for each piece, until done or `abort` fires;
        `on_wait` hears of each wait before a call goes out (rate limits, retries)."""
        ...
