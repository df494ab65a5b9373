"""The streaming SSE function: like `GET /jobs/{id}/stream`, but its answer is a body iterator
that a streaming gateway (the emulator; a Lambda function URL with response streaming) sends
frame by frame as events happen, with heartbeats while idle, until `done`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Iterator

from chalice.app import CaseInsensitiveMapping

from ..services import Services
from ..streaming.stream import JobEventStream, retry_hint
from .access import SSE_HEADERS, client_address, open_job_stream
from .edge import ErrorAnswer, error_answer



@dataclass
class StreamingAnswer:
    status: int
    headers: dict[str, str]
    chunks: Iterator[bytes]


@dataclass
class OpenedStream:
    """A stream that passed auth and found its job, ready to be served."""

    stream: JobEventStream
    heartbeat_s: float
    retry_ms: int


def create_stream_opener(services_factory: Callable[[], Services]) -> Callable[[dict], OpenedStream | StreamingAnswer]:
    """Authorize and position a stream request; an error (or 204) comes back as the answer."""
    services: list[Services] = []

    def open_stream(event: dict) -> OpenedStream | StreamingAnswer:
        headers = CaseInsensitiveMapping(event.get("headers") or {})
        external_id = (event.get("pathParameters") or {}).get("external_id", "")
        try:
            if not services:
                services.append(services_factory())
            s = services[0]
            stream = open_job_stream(s, headers, event.get("queryStringParameters") or {}, external_id,
                                     client_address(event))
            if stream.seen_the_end():
                stream.close()
                return StreamingAnswer(204, {}, iter(()))
        except Exception as exc:
            return _error(error_answer(exc, f"the stream of {external_id}"))
        return OpenedStream(stream, s.settings.sse_heartbeat_s, s.settings.sse_retry_ms)

    return open_stream


def create_stream_handler(services_factory: Callable[[], Services]) -> Callable[[dict, object], StreamingAnswer]:
    open_stream = create_stream_opener(services_factory)

    def handler(event: dict, context: object) -> StreamingAnswer:
        opened = open_stream(event)
        if isinstance(opened, StreamingAnswer):
            return opened
        frames = opened.stream.frames(heartbeat_s=opened.heartbeat_s)
        return StreamingAnswer(200, dict(SSE_HEADERS), _encoded(retry_hint(opened.retry_ms), frames))

    return handler


def _encoded(first: str, frames: Iterator[str]) -> Iterator[bytes]:
    yield first.encode()
    for frame in frames:
        yield frame.encode()


def _error(answer: ErrorAnswer) -> StreamingAnswer:
    return StreamingAnswer(answer.status, {"Content-Type": "application/json", **answer.headers},
                           iter([json.dumps(answer.body).encode()]))
