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

Abort: the signal shuts the call's socket from whichever thread raises it, so the server sees
the connection close at once and the reading thread wakes from its `recv` with end-of-file. The
socket is caught as it connects (httpx's `trace` extension), so this works while waiting for
headers too; for that, each call uses a fresh connection (keep-alive off: one handshake per
section is nothing beside the generation)."""

from __future__ import annotations

import email.utils
import json
import logging
import random
import socket
import threading
import time
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Callable
from urllib.parse import urlparse

import httpx2
import openai

from ..abort import AbortSignal
from ..rate_limits import ProviderRateLimiter
from ..tokens import tokenizer_for
from .base import (CONTINUE_INSTRUCTION, CallUsage, GenerationRequest, GenerationResult, ProviderRefused,
                   ProviderUnavailable, QuotaExceeded, chat_messages)

log = logging.getLogger(__name__)

__all__ = ["CONTINUE_INSTRUCTION", "OpenAIProvider"]

RETRYABLE_STATUS = frozenset({408, 409, 429})
# Ways of asking for structured output, best first; a server that rejects one gets the next.
_RESPONSE_FORMATS = ("json_schema", "json_object", "none")

_current_call: ContextVar["_Connection | None"] = ContextVar("rtqcc_openai_call", default=None)


class _Connection:
    """The socket under one HTTP call, caught as it connects, so an abort or a stall can shut it
    from any thread without waiting for the next byte."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._shut = False

    def trace(self, event: str, info: dict[str, Any]) -> None:
        # "connection.connect_tcp.complete", "connection.start_tls.complete", and the same from
        # "proxy." when a tunnel is used: each hands over the stream the call will read from.
        if not event.endswith((".connect_tcp.complete", ".start_tls.complete")):
            return
        stream = info.get("return_value")
        sock = stream.get_extra_info("socket") if stream is not None else None
        with self._lock:
            self._sock = sock
            shut = self._shut
        if shut and sock is not None:  # the abort came while we were connecting
            _shutdown(sock)

    def shut(self) -> None:
        with self._lock:
            self._shut = True
            sock = self._sock
        if sock is not None:
            _shutdown(sock)


def _shutdown(sock: socket.socket) -> None:
    try:
        # The plain socket method, on a TLS socket too: it sends FIN and wakes a blocked recv in
        # the reading thread, without touching the SSL object that thread is using.
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass  # already closed


def _attach_trace(request: httpx2.Request) -> None:
    connection = _current_call.get()
    if connection is not None:
        request.extensions["trace"] = connection.trace


class _Watchdog:
    """Shuts the connection when the server goes quiet: `first_s` for the answer to start, then
    `idle_s` between two chunks."""

    def __init__(self, connection: _Connection, first_s: float, idle_s: float, clock: Callable[[], float]):
        self._connection = connection
        self._idle_s = idle_s
        self._clock = clock
        self._last = clock()
        self._limit = first_s
        self._done = threading.Event()
        self.fired = False
        self._thread = threading.Thread(target=self._run, name="openai-idle-watch", daemon=True)

    def __enter__(self) -> "_Watchdog":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._done.set()
        self._thread.join()

    def touch(self) -> None:
        self._last = self._clock()
        self._limit = self._idle_s

    def _run(self) -> None:
        while True:
            remaining = self._last + self._limit - self._clock()
            if remaining <= 0:
                self.fired = True
                self._connection.shut()
                return
            # Wake at least once per idle period: `touch` shortens the limit without waking us.
            if self._done.wait(min(remaining, self._idle_s)):
                return


class _AbortedEarly(Exception):
    """Stopped before the server answered: no token was generated for us, nothing to bill."""


class _Retry(Exception):
    """A call refused before its first token, worth another try after `retry_after_s`."""

    def __init__(self, reason: str, retry_after_s: float | None = None):
        super().__init__(reason)
        self.retry_after_s = retry_after_s


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
                 backoff_max_s: float = 20.0, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, limiter: ProviderRateLimiter | None = None):
        self.limiter = limiter  # the requests and tokens per minute every consumer shares (None: none)
        self.timeout_s = timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.max_retries = max_retries
        self.max_continuations = max_continuations
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self.clock = clock
        self.rng = rng or random.Random()
        self.server = base_url or "https://api.openai.com/v1"
        host = urlparse(self.server).hostname or ""
        # OpenAI's reasoning models accept only `max_completion_tokens`; many compatible servers
        # know only `max_tokens`.
        self.max_tokens_field = "max_completion_tokens" if host.endswith(("openai.com", "openai.azure.com")) else "max_tokens"
        self._formats: dict[str, str] = {}  # model -> the structured-output form its server accepts
        # The answer must start within timeout_s; the watchdog enforces it and the idle timeout,
        # so httpx's read timeout is only a backstop behind it.
        self._http = openai.DefaultHttpxClient(
            timeout=httpx2.Timeout(timeout_s, read=timeout_s + idle_timeout_s),
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=0),
            event_hooks={"request": [_attach_trace]},
        )
        self._client = openai.OpenAI(
            api_key=api_key, organization=organization, project=project, base_url=base_url,
            max_retries=0,  # ours below: the SDK's sleeps cannot be interrupted by an abort
            timeout=httpx2.Timeout(timeout_s, read=timeout_s + idle_timeout_s),
            http_client=self._http,
        )

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
        self._client.close()

    # ---- one answer ---------------------------------------------------------------------------

    def stream(self, request: GenerationRequest, abort: AbortSignal,
               on_delta: Callable[[str], None]) -> GenerationResult:
        calls: list[CallUsage] = []
        kept: list[str] = []   # this answer's text so far, after request.prefix
        refusals = cuts = 0
        while True:
            if abort.aborted:
                return _result(kept, None, calls, abort.reason or "aborted")
            try:
                call = self._call(request, request.prefix + "".join(kept), abort, on_delta)
            except _AbortedEarly as exc:
                return _result(kept, None, calls, str(exc))
            except _Retry as exc:
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
              on_delta: Callable[[str], None]) -> _Call:
        tokenizer = tokenizer_for(request.model)
        messages = chat_messages(request, prefix)
        fmt = self._formats.get(request.model, _RESPONSE_FORMATS[0]) if request.json_schema is not None else None
        params = self._params(request, messages, fmt)
        estimate = tokenizer.count_chat(messages) + (request.max_tokens or ESTIMATED_ANSWER_TOKENS)
        if self.limiter is not None:
            self.limiter.acquire(request.model, estimate, abort)
            if abort.aborted:
                raise _AbortedEarly(abort.reason or "aborted")
        connection = _Connection()
        unregister = abort.on_abort(connection.shut)
        pieces: list[str] = []
        finish: str | None = None
        usage = None
        cut: str | None = None
        stream = None
        try:
            with _Watchdog(connection, self.timeout_s, self.idle_timeout_s, self.clock) as watchdog:
                token = _current_call.set(connection)
                try:
                    stream = self._client.chat.completions.create(**params)
                except openai.APIStatusError as exc:
                    if abort.aborted:
                        raise _AbortedEarly(abort.reason or "aborted") from exc
                    self._refusal(request, exc, fmt)  # raises
                except (openai.APIConnectionError, httpx2.HTTPError) as exc:
                    if abort.aborted:
                        raise _AbortedEarly(abort.reason or "aborted") from exc
                    raise _Retry("no answer in time" if watchdog.fired else f"cannot reach {self.server}: {exc}") from exc
                finally:
                    _current_call.reset(token)
                try:
                    for chunk in stream:
                        if chunk.usage is not None:
                            usage = chunk.usage
                        for choice in chunk.choices[:1]:
                            text = choice.delta.content if choice.delta else None
                            if text:
                                pieces.append(text)
                                on_delta(text)
                            if choice.finish_reason:
                                finish = choice.finish_reason
                        # Until the first token (a bare role chunk does not count), the answer
                        # has timeout_s to start; after it, every chunk restarts the idle clock.
                        if pieces or finish is not None or usage is not None:
                            watchdog.touch()
                        if abort.aborted:
                            break
                except (openai.APIError, httpx2.HTTPError, json.JSONDecodeError, ValueError) as exc:
                    if not abort.aborted:
                        cut = "went quiet" if watchdog.fired else f"{type(exc).__name__}: {exc}"
                if cut is None and finish is None and not abort.aborted:
                    cut = "went quiet" if watchdog.fired else "ended without a finish reason"
        finally:
            unregister()
            if stream is not None:
                stream.close()
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
            cut=None if aborted else cut,
            usage=CallUsage(
                reported_prompt_tokens=usage.prompt_tokens if usage is not None else None,
                reported_completion_tokens=usage.completion_tokens if usage is not None else None,
                counted_prompt_tokens=tokenizer.count_chat(messages),
                counted_completion_tokens=tokenizer.count(text),
                finish_reason=None if aborted else finish,
                aborted=aborted,
            ),
        )

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
            if status == 429 and self.limiter is not None:
                # Every consumer holds this model back, not only this call.
                self.limiter.hold(request.model, retry_after_s if retry_after_s is not None else self.backoff_s)
            raise _Retry(f"{self.server} answered {status} {code or kind}".rstrip(), retry_after_s)
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
