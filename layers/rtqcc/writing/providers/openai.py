"""The OpenAI provider: streaming chat completions through the official SDK, for OpenAI itself and
any OpenAI-compatible server (vLLM, llama.cpp server, Ollama, LM Studio, Azure-style gateways).

One `stream()` is one answer, which may take several HTTP calls:
- refused before the first token (429, 408/409, 5xx, no connection, no answer in time): retried
  with exponential backoff and full jitter, waiting at least what `retry-after` asks;
- cut mid-way (the connection drops, a chunk is garbled, the server goes quiet for longer than
  the idle timeout, or the stream ends without a finish reason): continued from the text so far,
  up to `max_continuations` times, then returned without a finish reason so the orchestrator
  keeps the text and hands the job back;
- no quota left (`insufficient_quota`), a bad key, an unknown model: `ProviderRefused` at once.
Every call that reached the model is reported in `GenerationResult.calls`, with the server's
usage (asked for with `stream_options.include_usage`) and our own count.

Each call's HTTP stream runs on the process's stream loop (`stream_loop`), not on the run's
thread, which sleeps until the call ends: hundreds of streams cost one thread woken per burst of
chunks instead of a thread woken per token. Abort cancels the call's task from whichever thread
raises it: the connection closes at once, so the server sees it go, whether the call was waiting
for headers, for its next chunk, or reading one. Each call uses a fresh connection (keep-alive
off: one handshake per section is nothing beside the generation, and no connection a cancelled
call left half-read is ever reused)."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import httpx2
import openai

from ..abort import AbortSignal
from ..rate_limits import ProviderRateLimiter
from ..tokens import tokenizer_for
from .base import (CONTINUE_INSTRUCTION, CallUsage, GenerationRequest, GenerationResult, OnWait, ProviderRefused,
                   ProviderUnavailable, ProviderWait, QuotaExceeded, WaitReason, chat_messages)
from .stream_loop import run_stream

log = logging.getLogger(__name__)

__all__ = ["CONTINUE_INSTRUCTION", "OpenAIProvider"]

RETRYABLE_STATUS = frozenset({408, 409, 429})
# Ways of asking for structured output, best first; a server that rejects one gets the next.
_RESPONSE_FORMATS = ("json_schema", "json_object", "none")

class _AbortedEarly(Exception):
    """Stopped before the server answered: no token was generated for us, nothing to bill."""


class _Retry(Exception):
    """A call refused before its first token, worth another try after `retry_after_s`;
    `rate_limited`: a 429, which every consumer holds the model back for."""

    def __init__(self, reason: str, retry_after_s: float | None = None, *, rate_limited: bool = False):
        super().__init__(reason)
        self.retry_after_s = retry_after_s
        self.rate_limited = rate_limited


@dataclass
class _Streamed:
    """What one HTTP call's stream brought, as its coroutine hands it back to the run's thread."""

    pieces: list[str]
    finish_reason: str | None
    usage: Any  # the server's usage chunk, if it sent one
    cut: str | None


@dataclass
class _Call:
    text: str
    finish_reason: str | None
    usage: CallUsage
    aborted: str | None
    cut: str | None  # why the stream ended early, when it was not aborted


# What a call without max_tokens is counted as before it starts, against a tokens-per-minute limit.
ESTIMATED_ANSWER_TOKENS = 1000


class OpenAIProvider:
    name = "openai"

    def __init__(self, *, api_key: str, base_url: str | None = None, organization: str | None = None,
                 project: str | None = None, timeout_s: float = 60.0, idle_timeout_s: float = 30.0,
                 max_retries: int = 4, max_continuations: int = 2, backoff_s: float = 0.5,
                 backoff_max_s: float = 20.0,
                 rng: random.Random | None = None, limiter: ProviderRateLimiter | None = None):
        self.limiter = limiter  # the requests and tokens per minute every consumer shares (None: none)
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_retries = max_retries
        self.max_continuations = max_continuations
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.rng = rng or random.Random()
        self.server = base_url or "https://api.openai.com/v1"
        host = urlparse(self.server).hostname or ""
        # OpenAI's reasoning models accept only `max_completion_tokens`; many compatible servers
        # know only `max_tokens`.
        self.max_tokens_field = "max_completion_tokens" if host.endswith(("openai.com", "openai.azure.com")) else "max_tokens"
        self._formats: dict[str, str] = {}  # model -> the structured-output form its server accepts
        self.organization, self.project, self._api_key, self._base_url = organization, project, api_key, base_url
        self._clients: tuple[int, openai.AsyncOpenAI] | None = None  # (pid, client): made on the stream loop

    def _client(self) -> openai.AsyncOpenAI:
        """The client of this process's stream loop (a forked child makes its own)."""
        if self._clients is None or self._clients[0] != os.getpid():
            # The answer must start within timeout_s and chunks come within idle_timeout_s of each
            # other (both enforced by the call itself); httpx's read timeout is a backstop behind.
            timeout = httpx2.Timeout(self.timeout_s, read=self.timeout_s + self.idle_timeout_s)
            http = openai.DefaultAsyncHttpxClient(
                timeout=timeout, limits=httpx2.Limits(max_connections=None, max_keepalive_connections=0))
            self._clients = (os.getpid(), openai.AsyncOpenAI(
                api_key=self._api_key, organization=self.organization, project=self.project,
                base_url=self._base_url, timeout=timeout, http_client=http,
                max_retries=0,  # ours: a retry waits on the run's thread, where an abort ends the wait
            ))
        return self._clients[1]

    @classmethod
    def from_settings(cls, settings, *, limiter: ProviderRateLimiter | None = None) -> "OpenAIProvider":
        return cls(limiter=limiter,
            api_key=settings.openai_api_key, base_url=settings.openai_base_url,
            organization=settings.openai_organization, project=settings.openai_project,
            timeout_s=settings.openai_timeout_s, idle_timeout_s=settings.openai_idle_timeout_s,
            max_retries=settings.openai_max_retries, max_continuations=settings.openai_max_continuations,
            backoff_s=settings.openai_backoff_s, backoff_max_s=settings.openai_backoff_max_s,
        )

    def close(self) -> None:
        if self._clients is not None and self._clients[0] == os.getpid():
            client, self._clients = self._clients[1], None
            run_stream(client.close)

    # ---- one answer ---------------------------------------------------------------------------

    def stream(self, request: GenerationRequest, abort: AbortSignal,
               on_delta: Callable[[str], None], on_wait: OnWait | None = None) -> GenerationResult:
        calls: list[CallUsage] = []
        kept: list[str] = []   # this answer's text so far, after request.prefix
        refusals = cuts = 0
        while True:
            if abort.aborted:
                return _result(kept, None, calls, abort.reason or "aborted")
            try:
                call = self._call(request, request.prefix + "".join(kept), abort, on_delta, on_wait)
            except _AbortedEarly as exc:
                return _result(kept, None, calls, str(exc))
            except _Retry as exc:
                if exc.rate_limited and self.limiter is not None:
                    # Every consumer holds this model back, not only this call.
                    self.limiter.hold(request.model, exc.retry_after_s if exc.retry_after_s is not None else self.backoff_s)
                if abort.aborted:
                    return _result(kept, None, calls, abort.reason or "aborted")
                refusals += 1
                delay = self._backoff(refusals, exc.retry_after_s)
                if refusals > self.max_retries or delay is None:
                    why = (f"{self.server} refused {refusals} calls for {request.model}; last: {exc}"
                           if delay is not None else f"{self.server} asks to wait {exc.retry_after_s:.0f}s: {exc}")
                    if calls:  # some text is paid for: keep it, and let the job come back later
                        log.warning("%s; handing back %d chars", why, len("".join(kept)))
                        return _result(kept, None, calls, None)
                    raise ProviderUnavailable(why) from exc
                log.info("%s; retry %d in %.2fs", exc, refusals, delay)
                if on_wait is not None:
                    on_wait(ProviderWait(request.model, WaitReason.RATE_LIMITED if exc.rate_limited
                                         else WaitReason.PROVIDER_ERROR, time.time() + delay))
                if abort.wait(delay):
                    return _result(kept, None, calls, abort.reason or "aborted")
                continue
            except ProviderRefused as exc:
                if calls:
                    exc.partial = _result(kept, None, calls, None)
                raise

            calls.append(call.usage)
            if request.json_schema is not None and call.finish_reason is None and not call.aborted:
                kept = []  # half a JSON document cannot be continued reliably: start it again
            else:
                kept.append(call.text)
            if call.aborted:
                return _result(kept, None, calls, call.aborted)
            if call.finish_reason is not None:
                return _result(kept, call.finish_reason, calls, None)
            cuts += 1
            if cuts > self.max_continuations:
                log.warning("stream from %s cut %d times (%s); handing back", self.server, cuts, call.cut)
                return _result(kept, None, calls, None)
            log.info("stream from %s cut (%s) after %d chars; continuing", self.server, call.cut, len(call.text))

    def _backoff(self, attempt: int, retry_after_s: float | None) -> float | None:
        """Full jitter over an exponential cap; at least `retry-after`. None: the server asks
        for a longer wait than we are willing to block a consumer for."""
        if retry_after_s is not None and retry_after_s > self.backoff_max_s:
            return None
        delay = self.rng.uniform(0, min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)))
        if retry_after_s is not None:
            delay = retry_after_s + self.rng.uniform(0, min(retry_after_s, self.backoff_s) * 0.2)
        return delay

    # ---- one HTTP call ------------------------------------------------------------------------

    def _call(self, request: GenerationRequest, prefix: str, abort: AbortSignal,
              on_delta: Callable[[str], None], on_wait: OnWait | None) -> _Call:
        tokenizer = tokenizer_for(request.model)
        messages = chat_messages(request, prefix)
        fmt = self._formats.get(request.model, _RESPONSE_FORMATS[0]) if request.json_schema is not None else None
        params = self._params(request, messages, fmt)
        estimate = tokenizer.count_chat(messages) + (request.max_tokens or ESTIMATED_ANSWER_TOKENS)
        if self.limiter is not None:
            self.limiter.acquire(request.model, estimate, abort, on_wait)
            if abort.aborted:
                raise _AbortedEarly(abort.reason or "aborted")
        if on_wait is not None:
            on_wait(None)  # it goes out now
        streamed = run_stream(lambda: self._stream_call(request, params, fmt, abort, on_delta), abort)
        pieces, finish, usage = streamed.pieces, streamed.finish_reason, streamed.usage
        text = "".join(pieces)
        aborted = (abort.reason or "aborted") if abort.aborted and finish is None else None
        if self.limiter is not None:
            used = (usage.prompt_tokens + usage.completion_tokens if usage is not None
                    else tokenizer.count_chat(messages) + tokenizer.count(text))
            self.limiter.settle(request.model, estimated=estimate, used=used)
        return _Call(
            text=text,
            finish_reason=None if aborted else finish,
            aborted=aborted,
            cut=None if aborted else streamed.cut,
            usage=CallUsage(
                reported_prompt_tokens=usage.prompt_tokens if usage is not None else None,
                reported_completion_tokens=usage.completion_tokens if usage is not None else None,
                counted_prompt_tokens=tokenizer.count_chat(messages),
                counted_completion_tokens=tokenizer.count(text),
                finish_reason=None if aborted else finish,
                aborted=aborted,
            ),
        )

    async def _stream_call(self, request: GenerationRequest, params: dict[str, Any], fmt: str | None,
                           abort: AbortSignal, on_delta: Callable[[str], None]) -> _Streamed:
        """One HTTP call, on the stream loop: its chunks handed to `on_delta` as they come."""
        loop = asyncio.get_running_loop()
        pieces: list[str] = []
        finish: str | None = None
        usage = None
        cut: str | None = None
        stream = None
        try:
            # Until the first token (a bare role chunk does not count) the answer has timeout_s to
            # start; after it, every chunk gives the next idle_timeout_s.
            async with asyncio.timeout(self.timeout_s) as quiet:
                try:
                    stream = await self._client().chat.completions.create(**params)
                except openai.APIStatusError as exc:
                    self._refusal(request, exc, fmt)  # raises
                except (openai.APIConnectionError, httpx2.HTTPError) as exc:
                    raise _Retry(f"cannot reach {self.server}: {exc}") from exc
                try:
                    async for chunk in stream:
                        if chunk.usage is not None:
                            usage = chunk.usage
                        for choice in chunk.choices[:1]:
                            text = choice.delta.content if choice.delta else None
                            if text:
                                pieces.append(text)
                                on_delta(text)
                            if choice.finish_reason:
                                finish = choice.finish_reason
                        if pieces or finish is not None or usage is not None:
                            quiet.reschedule(loop.time() + self.idle_timeout_s)
                        if abort.aborted:  # raised by on_delta itself (a budget reached)
                            break
                except (openai.APIError, httpx2.HTTPError, json.JSONDecodeError, ValueError) as exc:
                    cut = f"{type(exc).__name__}: {exc}"
        except TimeoutError as exc:
            if stream is None:
                raise _Retry("no answer in time") from exc
            cut = "went quiet"
        except asyncio.CancelledError:  # aborted
            if stream is None:
                raise _AbortedEarly(abort.reason or "aborted") from None
        finally:
            if stream is not None:
                # Shielded: an abort's cancel may still arrive now, and the connection must close.
                try:
                    await asyncio.shield(stream.close())
                except asyncio.CancelledError:
                    pass
        if cut is None and finish is None and not abort.aborted:
            cut = "ended without a finish reason"
        return _Streamed(pieces, finish, usage, cut)

    def _params(self, request: GenerationRequest, messages: list[dict[str, str]], fmt: str | None) -> dict[str, Any]:
        params: dict[str, Any] = {
            "model": request.model,
            "messages": messages,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        if request.temperature is not None:
            params["temperature"] = request.temperature
        if request.max_tokens:
            params[self.max_tokens_field] = request.max_tokens
        if fmt == "json_schema":
            params["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "structured_answer", "schema": request.json_schema, "strict": True},
            }
        elif fmt == "json_object":
            params["response_format"] = {"type": "json_object"}
        return params

    def _refusal(self, request: GenerationRequest, exc: openai.APIStatusError, fmt: str | None) -> None:
        """Turn an error answer into a retry, a downgrade of structured output, or a refusal."""
        status, code, kind = exc.status_code, exc.code or "", exc.type or ""
        message = _error_message(exc)
        if "insufficient_quota" in (code, kind):
            raise QuotaExceeded(
                f"{self.server} refused {request.model}: insufficient_quota: the API key's account has no "
                f"quota left ({message}). Check its plan and billing, then retry the job.", status=status)
        if status in RETRYABLE_STATUS or status >= 500:
            retry_after_s = _retry_after_s(exc.response)
            raise _Retry(f"{self.server} answered {status} {code or kind}".rstrip(), retry_after_s,
                         rate_limited=status == 429)
        if fmt is not None and fmt != "none" and status in (400, 422) and _about_response_format(exc):
            following = _RESPONSE_FORMATS[_RESPONSE_FORMATS.index(fmt) + 1]
            log.info("%s does not take response_format %s for %s; trying %s", self.server, fmt, request.model, following)
            self._formats[request.model] = following
            raise _Retry(f"response_format {fmt} not supported", 0.0)
        raise ProviderRefused(f"{self.server} refused {request.model} ({status} {code or kind}): {message}",
                              status=status)


def _result(kept: list[str], finish: str | None, calls: list[CallUsage], aborted: str | None) -> GenerationResult:
    reported = all(c.reported_prompt_tokens is not None and c.reported_completion_tokens is not None for c in calls)
    return GenerationResult(
        text="".join(kept),
        finish_reason=finish,
        aborted=aborted,
        reported_prompt_tokens=sum(c.reported_prompt_tokens or 0 for c in calls) if calls and reported else None,
        reported_completion_tokens=sum(c.reported_completion_tokens or 0 for c in calls) if calls and reported else None,
        calls=list(calls),
    )


def _error_message(exc: openai.APIStatusError) -> str:
    body = exc.body
    if isinstance(body, dict) and isinstance(body.get("message"), str):
        return body["message"]
    return str(exc)


def _about_response_format(exc: openai.APIStatusError) -> bool:
    text = f"{exc.param or ''} {_error_message(exc)}".lower()
    return "response_format" in text or "json_schema" in text or "structured" in text


def _retry_after_s(response: httpx2.Response | None) -> float | None:
    """`retry-after-ms` (OpenAI), else `retry-after` in seconds or as an HTTP date."""
    if response is None:
        return None
    headers = response.headers
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        raw = headers.get(name)
        if not raw:
            continue
        try:
            return max(0.0, float(raw) * scale)
        except ValueError:
            pass
        if name == "retry-after":
            try:
                when = email.utils.parsedate_to_datetime(raw)
            except (TypeError, ValueError):
                continue
            return max(0.0, when.timestamp() - time.time())
    return None
