"""A local OpenAI-compatible server for tests, benchmarks and the demo: `POST /v1/chat/completions`
over the real wire protocol, with deterministic text, a configurable pace, and faults that a test
queues for the next requests.

Wire protocol, as OpenAI speaks it: with `"stream": true`, Server-Sent Events `data: {chunk}`
(a role chunk, one content chunk per token-sized piece, a chunk with `finish_reason`, the usage
chunk with `"choices": []` when `stream_options.include_usage` is set) and `data: [DONE]`;
without, one `chat.completion` object. Errors are `{"error": {"message", "type", "param", "code"}}`.
`response_format` `json_schema` or `json_object` (or a prompt saying "Return JSON") is answered
with valid JSON.
Usage is counted with the real BPE tokenizer of the model's family (o200k_base for models it does
not know: the "server's own" tokenizer, which the client's count may not match).

Control API (the same in-process through methods, and over HTTP for a standalone server):
- `POST /_faults` with one fault or a list, e.g. `{"kind": "cut", "after_tokens": 5}`: each fault
  applies to one coming chat request, in order (`"times": n` for n of them). Kinds:
  `rate_limit` (429, `retry_after_s`), `server_error` (`status`, default 500),
  `insufficient_quota` (429), `cut` (close the connection after `after_tokens` pieces;
  `"mode": "end"` ends the stream cleanly instead, still without a finish reason),
  `stall` (go silent for `seconds` after `after_tokens` pieces), `no_usage`, `slow_first_token`
  (`seconds` before the first piece), `malformed` (a garbled chunk after `after_tokens` pieces),
  `reject_response_format` (400 when structured output is asked for), `answer` (send `text`
  instead of the usual answer).
- `DELETE /_faults` drops queued faults; `POST /_pace` `{"tokens_per_s", "first_token_ms"}`.
- `POST /_limits` `{"requests_per_min", "tokens_per_min"}` (null: none) enforces rate limits as
  OpenAI does: each request is counted as its prompt plus its max tokens against buckets refilled
  continuously, holding one second's worth; a request over either is a 429 `rate_limit_exceeded`
  with `retry-after(-ms)`, and every answer carries `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`.
- `GET /_requests`: every chat request seen, with what was sent, the usage reported, and when
  the client disconnected before the end (`disconnected_at`, `time.monotonic()` of this process).

In-process: `OpenAIServer(...).start()` runs uvicorn in a thread on a free 127.0.0.1 port;
`stop()` ends it. Standalone: `python -m rtqcc_emulator.openai_server --port 8400` (`--port 0`: a free
port, named in the first line it prints)."""

from __future__ import annotations

import argparse
import collections
import json
import logging
import re
import signal
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, AsyncIterator

import anyio
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from rtqcc.writing.providers.base import GenerationRequest
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.writing.tokens import Tokenizer, encoding, tokenizer_for

from .server import ServerThread

FAULT_KINDS = frozenset({
    "rate_limit", "server_error", "insufficient_quota", "cut", "stall", "no_usage", "slow_first_token",
    "malformed", "reject_response_format", "answer",
})
DEFAULT_ANSWER_TOKENS = 160
_JSON_COUNT = re.compile(r"exactly (\d+) sections")
_uvicorn_log = logging.getLogger("uvicorn.error")


class FaultInvalid(ValueError):
    pass


@dataclass(frozen=True)
class Fault:
    kind: str
    after_tokens: int = 0
    seconds: float = 0.0
    retry_after_s: float = 1.0
    status: int = 500
    mode: str = "drop"  # cut: "drop" the connection, or "end" the stream without a finish reason
    text: str = ""      # answer: the text to send instead of the usual one (a model saying something odd)

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "Fault":
        if not isinstance(raw, dict) or raw.get("kind") not in FAULT_KINDS:
            raise FaultInvalid(f"a fault needs a kind among {sorted(FAULT_KINDS)}, got {raw!r}")
        known = {k: v for k, v in raw.items() if k in cls.__dataclass_fields__}
        try:
            fault = cls(**known)
        except TypeError as exc:
            raise FaultInvalid(str(exc)) from None
        if fault.mode not in ("drop", "end"):
            raise FaultInvalid(f"cut mode must be 'drop' or 'end', got {fault.mode!r}")
        return fault


@dataclass
class RequestRecord:
    id: str
    model: str
    messages: list[dict[str, Any]]
    stream: bool
    params: dict[str, Any]
    fault: str | None
    status: int = 200
    pieces_sent: int = 0
    text_sent: str = ""
    finish_reason: str | None = None
    usage: dict[str, int] | None = None
    started_at: float = field(default_factory=time.monotonic)
    ended_at: float | None = None
    disconnected_at: float | None = None  # the client went away before the answer ended

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Cut(Exception):
    """Raised after some chunks to make uvicorn drop the connection mid-answer."""


class _QuietCuts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], _Cut))


class RateLimits:
    """Requests and tokens per minute, as token buckets refilled continuously and holding one
    second's worth (OpenAI enforces its per-minute limits in such short quanta)."""

    QUANTUM_S = 1.0

    def __init__(self, requests_per_min: float | None, tokens_per_min: float | None, clock=time.monotonic):
        self.requests_per_min, self.tokens_per_min = requests_per_min, tokens_per_min
        self._clock = clock
        self._lock = threading.Lock()
        self._requests = self._capacity(requests_per_min)
        self._tokens = self._capacity(tokens_per_min)
        self._at = clock()
        self.refused = 0

    def _capacity(self, per_min: float | None) -> float:
        return per_min * self.QUANTUM_S / 60 if per_min else 0.0

    def admit(self, tokens: int) -> Response | None:
        """None when the request fits (and is counted), else the 429 answer."""
        if not self.requests_per_min and not self.tokens_per_min:
            return None
        with self._lock:
            now = self._clock()
            elapsed, self._at = now - self._at, now
            wait_s = 0.0
            if self.requests_per_min:
                self._requests = min(self._capacity(self.requests_per_min),
                                     self._requests + elapsed * self.requests_per_min / 60)
                if self._requests < 1:
                    wait_s = max(wait_s, (1 - self._requests) * 60 / self.requests_per_min)
            if self.tokens_per_min:
                self._tokens = min(self._capacity(self.tokens_per_min), self._tokens + elapsed * self.tokens_per_min / 60)
                needed = min(tokens, self._capacity(self.tokens_per_min))
                if self._tokens < needed:
                    wait_s = max(wait_s, (needed - self._tokens) * 60 / self.tokens_per_min)
            if wait_s == 0:
                self._requests -= 1 if self.requests_per_min else 0
                self._tokens -= tokens if self.tokens_per_min else 0
                return None
            self.refused += 1
            which = "requests" if self.requests_per_min and self._requests < 1 else "tokens"
            headers = {"retry-after": f"{max(1, round(wait_s))}", "retry-after-ms": f"{max(1, int(wait_s * 1000))}",
                       **self.headers()}
        return _error(429, f"Rate limit reached for {which} per min. Please try again in {wait_s * 1000:.0f}ms.",
                      which, "rate_limit_exceeded", headers=headers)

    def headers(self) -> dict[str, str]:
        """x-ratelimit-* as OpenAI sends them (the per-minute limit, what is left now)."""
        found = {}
        for kind, per_min, left in (("requests", self.requests_per_min, self._requests),
                                    ("tokens", self.tokens_per_min, self._tokens)):
            if per_min:
                found[f"x-ratelimit-limit-{kind}"] = f"{per_min:g}"
                found[f"x-ratelimit-remaining-{kind}"] = f"{max(0, int(left))}"
                found[f"x-ratelimit-reset-{kind}"] = f"{max(0.0, (1 - min(left, 1)) * 60 / per_min):.3f}s"
        return found


class OpenAIServer:
    def __init__(self, *, tokens_per_s: float = 0.0, first_token_ms: int = 0, api_key: str | None = None,
                 host: str = "127.0.0.1", port: int | None = None,
                 requests_per_min: float | None = None, tokens_per_min: float | None = None):
        self.limits = RateLimits(requests_per_min, tokens_per_min)
        self.tokens_per_s = tokens_per_s
        self.first_token_ms = first_token_ms
        self.api_key = api_key
        self.host = host
        self.port = port
        self._lock = threading.Lock()
        self._faults: collections.deque[Fault] = collections.deque()
        self._records: list[RequestRecord] = []
        self._thread: ServerThread | None = None
        self._quiet = _QuietCuts()
        self.app = self._app()

    # ---- control ------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """What OPENAI_BASE_URL should be."""
        return f"http://{self.host}:{self.port}/v1"

    def add_faults(self, *faults: dict[str, Any]) -> int:
        parsed = []
        for raw in faults:
            fault = Fault.parse(raw)
            parsed.extend([fault] * max(1, int(raw.get("times", 1))))
        with self._lock:
            self._faults.extend(parsed)
        return len(parsed)

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def set_pace(self, *, tokens_per_s: float | None = None, first_token_ms: int | None = None) -> None:
        if tokens_per_s is not None:
            self.tokens_per_s = tokens_per_s
        if first_token_ms is not None:
            self.first_token_ms = first_token_ms

    @property
    def requests(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def reset(self) -> None:
        with self._lock:
            self._faults.clear()
            self._records.clear()
            self.limits = RateLimits(None, None)

    def start(self) -> "OpenAIServer":
        """Serve on `port`, or on a free one when it is None or 0 (bound here: see ServerThread)."""
        _uvicorn_log.addFilter(self._quiet)
        self._thread = ServerThread(self.app, port=self.port or 0, host=self.host)
        self._thread.thread.name = "openai-emulator"
        self._thread.start()
        self.port = self._thread.port
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._thread.stop()
            self._thread = None
        _uvicorn_log.removeFilter(self._quiet)

    def __enter__(self) -> "OpenAIServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    # ---- HTTP ---------------------------------------------------------------------------------

    def _app(self) -> Starlette:
        async def faults(request: Request) -> Response:
            if request.method == "DELETE":
                self.clear_faults()
                return JSONResponse({"queued": 0})
            try:
                body = await request.json()
                queued = self.add_faults(*(body if isinstance(body, list) else [body]))
            except (ValueError, FaultInvalid) as exc:
                return _error(400, str(exc), "invalid_request_error", "invalid_fault")
            return JSONResponse({"queued": queued})

        async def pace(request: Request) -> Response:
            body = await request.json()
            self.set_pace(tokens_per_s=body.get("tokens_per_s"), first_token_ms=body.get("first_token_ms"))
            return JSONResponse({"tokens_per_s": self.tokens_per_s, "first_token_ms": self.first_token_ms})

        async def requests(request: Request) -> Response:
            return JSONResponse({"requests": [record.as_dict() for record in self.requests]})

        async def limits(request: Request) -> Response:
            body = await request.json()
            self.limits = RateLimits(body.get("requests_per_min"), body.get("tokens_per_min"))
            return JSONResponse({"requests_per_min": self.limits.requests_per_min,
                                 "tokens_per_min": self.limits.tokens_per_min})

        async def models(request: Request) -> Response:
            return JSONResponse({"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model", "owned_by": "rtqcc"}]})

        return Starlette(routes=[
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", models, methods=["GET"]),
            Route("/_faults", faults, methods=["POST", "DELETE"]),
            Route("/_pace", pace, methods=["POST"]),
            Route("/_requests", requests, methods=["GET"]),
            Route("/_limits", limits, methods=["POST"]),
        ])

    async def _chat(self, request: Request):
        if self.api_key and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return _error(401, "Incorrect API key provided.", "invalid_request_error", "invalid_api_key")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "We could not parse the JSON body of your request.", "invalid_request_error", None)
        model, messages = body.get("model"), body.get("messages")
        if not isinstance(model, str) or not model:
            return _error(400, "you must provide a model parameter", "invalid_request_error", None, param="model")
        if not isinstance(messages, list) or not messages:
            return _error(400, "'messages' must be a non-empty array", "invalid_request_error", None, param="messages")
        with self._lock:
            fault = self._faults.popleft() if self._faults else None
            record = RequestRecord(
                id=f"chatcmpl-{uuid.uuid4().hex[:24]}", model=model, messages=messages, stream=bool(body.get("stream")),
                params={k: v for k, v in body.items() if k not in ("messages",)}, fault=fault.kind if fault else None)
            self._records.append(record)

        refusal = self._refusal(fault, body)
        if refusal is None:
            refusal = self.limits.admit(self._estimate(model, messages, body))
        if refusal is not None:
            record.status, record.ended_at = refusal.status_code, time.monotonic()
            return refusal
        pieces, finish = self._answer(body)
        if fault is not None and fault.kind == "answer":
            pieces, finish = re.findall(r"\S+\s*|\s+", fault.text) or [""], "stop"
        if not record.stream:
            return self._whole(record, body, pieces, finish)
        return _EventStream(self._events(record, body, pieces, finish, fault), record)

    def _refusal(self, fault: Fault | None, body: dict[str, Any]) -> Response | None:
        if fault is None:
            return None
        if fault.kind == "rate_limit":
            return _error(429, "Rate limit reached for requests. Please try again shortly.", "requests",
                          "rate_limit_exceeded", headers={"retry-after": f"{fault.retry_after_s:g}",
                                                          "retry-after-ms": f"{int(fault.retry_after_s * 1000)}"})
        if fault.kind == "server_error":
            return _error(fault.status, "The server had an error while processing your request.", "server_error", None)
        if fault.kind == "insufficient_quota":
            return _error(429, "You exceeded your current quota, please check your plan and billing details.",
                          "insufficient_quota", "insufficient_quota")
        if fault.kind == "reject_response_format" and body.get("response_format"):
            return _error(400, "Invalid parameter: 'response_format' of type 'json_schema' is not supported with this model.",
                          "invalid_request_error", None, param="response_format")
        return None

    def _estimate(self, model: str, messages: list, body: dict[str, Any]) -> int:
        """What the rate limit counts a request as before answering it: prompt plus max tokens."""
        prompt = sum(self._tokenizer(model).count(str(m.get("content") or "")) for m in messages if isinstance(m, dict))
        return prompt + int(body.get("max_completion_tokens") or body.get("max_tokens") or DEFAULT_ANSWER_TOKENS)

    # ---- answers ------------------------------------------------------------------------------

    def _tokenizer(self, model: str) -> Tokenizer:
        known = tokenizer_for(model)
        if known.exact:
            return known
        enc = encoding("o200k_base")
        return Tokenizer(enc.name, True, lambda text: len(enc.encode_ordinary(text)))

    def _answer(self, body: dict[str, Any]) -> tuple[list[str], str]:
        """The pieces still to write for this request, and how the answer ends. The text depends
        only on the model, the system and first user message and the token limit; a request whose
        messages end with an assistant turn and a user turn continues that assistant text."""
        messages = body["messages"]
        system = next((m.get("content") or "" for m in messages if m.get("role") == "system"), "")
        prompt = next((m.get("content") or "" for m in messages if m.get("role") == "user"), "")
        prefix = ""
        if len(messages) >= 2 and messages[-2].get("role") == "assistant" and messages[-1].get("role") == "user":
            prefix = messages[-2].get("content") or ""
        max_tokens = body.get("max_completion_tokens") or body.get("max_tokens")
        schema = None
        response_format = body.get("response_format") or {}
        if response_format.get("type") == "json_schema":
            schema = (response_format.get("json_schema") or {}).get("schema") or {}
        elif response_format.get("type") == "json_object" or "Return JSON" in prompt:
            count = _JSON_COUNT.search(prompt)
            schema = {"properties": {"sections": {"minItems": int(count.group(1)) if count else 5}}}
        words = max(1, (max_tokens or DEFAULT_ANSWER_TOKENS) // 2)
        full = FakeProvider().full_text(GenerationRequest(
            model=body["model"], system=system, prompt=prompt, max_tokens=words, json_schema=schema))
        remaining = full[len(prefix):] if prefix and full.startswith(prefix) else full
        pieces = _pieces(remaining)
        if not max_tokens:
            return pieces, "stop"
        tokenizer, used = self._tokenizer(body["model"]), 0
        for index, piece in enumerate(pieces):
            used += tokenizer.count(piece)
            if used > max_tokens:
                return pieces[:index], "length"
        return pieces, "stop"

    def _usage(self, body: dict[str, Any], text: str) -> dict[str, int]:
        tokenizer = self._tokenizer(body["model"])
        prompt = tokenizer.count_chat(body["messages"])
        completion = tokenizer.count(text)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _whole(self, record: RequestRecord, body: dict[str, Any], pieces: list[str], finish: str) -> Response:
        text = "".join(pieces)
        record.text_sent, record.pieces_sent, record.finish_reason = text, len(pieces), finish
        record.usage = self._usage(body, text)
        record.ended_at = time.monotonic()
        return JSONResponse({
            "id": record.id, "object": "chat.completion", "created": int(time.time()), "model": record.model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None},
                         "logprobs": None, "finish_reason": finish}],
            "usage": record.usage,
        })

    async def _events(self, record: RequestRecord, body: dict[str, Any], pieces: list[str], finish: str,
                      fault: Fault | None) -> AsyncIterator[bytes]:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        created = int(time.time())

        def chunk(delta: dict[str, Any], finish_reason: str | None = None, **extra: Any) -> bytes:
            data = {"id": record.id, "object": "chat.completion.chunk", "created": created, "model": record.model,
                    "system_fingerprint": None,
                    "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
                    **extra}
            if include_usage and "usage" not in extra:
                data["usage"] = None
            return f"data: {json.dumps(data)}\n\n".encode()

        yield chunk({"role": "assistant", "content": "", "refusal": None})
        first_wait = self.first_token_ms / 1000
        if fault and fault.kind == "slow_first_token":
            first_wait += fault.seconds
        if first_wait:
            await anyio.sleep(first_wait)
        interval = 1.0 / self.tokens_per_s if self.tokens_per_s > 0 else 0.0
        sent: list[str] = []
        for index, piece in enumerate(pieces):
            if fault and index == fault.after_tokens:
                if fault.kind == "cut":
                    record.text_sent, record.pieces_sent = "".join(sent), len(sent)
                    if fault.mode == "end":
                        return
                    raise _Cut(f"cut after {len(sent)} pieces")
                if fault.kind == "stall":
                    await anyio.sleep(fault.seconds)
                if fault.kind == "malformed":
                    yield b'data: {"id": "' + record.id.encode() + b'", "choices": [{"delta": \n\n'
            if index and interval:
                await anyio.sleep(interval)
            yield chunk({"content": piece})
            sent.append(piece)
            record.pieces_sent, record.text_sent = len(sent), "".join(sent)
        record.finish_reason = finish
        yield chunk({}, finish)
        if include_usage and not (fault and fault.kind == "no_usage"):
            record.usage = self._usage(body, "".join(sent))
            data = {"id": record.id, "object": "chat.completion.chunk", "created": created, "model": record.model,
                    "system_fingerprint": None, "choices": [], "usage": record.usage}
            yield f"data: {json.dumps(data)}\n\n".encode()
        yield b"data: [DONE]\n\n"


class _EventStream:
    """An SSE response that watches for the client going away while it writes, and notes when."""

    def __init__(self, events: AsyncIterator[bytes], record: RequestRecord):
        self.events = events
        self.record = record

    async def __call__(self, scope, receive, send) -> None:
        record, finished, cut = self.record, False, None
        async with anyio.create_task_group() as group:
            async def listen() -> None:
                while True:
                    message = await receive()
                    if message["type"] == "http.disconnect":
                        if not finished:
                            record.disconnected_at = time.monotonic()
                        group.cancel_scope.cancel()
                        return

            group.start_soon(listen)
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                (b"x-request-id", record.id.encode())]})
            try:
                async for data in self.events:
                    await send({"type": "http.response.body", "body": data, "more_body": True})
                finished = True
                await send({"type": "http.response.body", "body": b"", "more_body": False})
            except _Cut as exc:
                cut = exc
            except OSError:
                pass  # the client went away; the listener notes when
            finally:
                record.ended_at = time.monotonic()
            group.cancel_scope.cancel()
        if cut is not None:
            raise cut  # uvicorn closes the connection mid-body: the client sees a cut stream


def _error(status: int, message: str, kind: str, code: str | None, *, param: str | None = None,
           headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _pieces(text: str) -> list[str]:
    """Words with their leading whitespace: about one token each, joining back to the text."""
    return re.findall(r"\s*\S+", text) + ([text[len(text.rstrip()):]] if text[len(text.rstrip()):] else [])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rtqcc_emulator.openai_server",
                                     description="A local OpenAI-compatible server with fault injection.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8400, help="0: a free port (the first line printed names it)")
    parser.add_argument("--tokens-per-s", type=float, default=50.0, help="pace of the stream (0: as fast as possible)")
    parser.add_argument("--first-token-ms", type=int, default=200)
    parser.add_argument("--api-key", default=None, help="require this bearer key (default: accept any)")
    args = parser.parse_args(argv)
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    with OpenAIServer(tokens_per_s=args.tokens_per_s, first_token_ms=args.first_token_ms, api_key=args.api_key,
                      host=args.host, port=args.port) as server:
        print(f"OpenAI-compatible server on {server.base_url} (set OPENAI_BASE_URL to it)", flush=True)
        while not stopping.wait(1.0):
            pass


if __name__ == "__main__":
    main()
