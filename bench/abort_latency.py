"""Abort latency of a provider stream: from the abort signal to the connection closed as the
server sees it, and to the provider call returning, with the real OpenAI SDK over real HTTP
against the local OpenAI-compatible server; beside the same signal stopping the fake provider.

Each sample starts a long answer on a worker thread, waits for its first token, raises the
abort signal (as the job watcher does on pause or cancel) and times what follows. The server
runs in this process, so its `time.monotonic()` and the signal's are the same clock."""

from __future__ import annotations

import threading
import time

from rtqcc.writing.abort import AbortSignal
from rtqcc.writing.providers.base import GenerationRequest
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.writing.providers.openai import OpenAIProvider
from rtqcc_emulator.openai_server import OpenAIServer

from .stack import summary_ms

SAMPLES = 200
PACE_TOKENS_PER_S = 200.0
REQUEST = GenerationRequest(model="gpt-4o-mini", system="You write.", prompt="Write at length about queues.",
                            max_tokens=4000)


def _one(provider, abort: AbortSignal, request: GenerationRequest) -> tuple[float, object]:
    """Abort `provider.stream` after its first token; (seconds from signal to return, result)."""
    first_token = threading.Event()
    done: dict = {}

    def work():
        try:
            done["result"] = provider.stream(request, abort, lambda _text: first_token.set())
        finally:
            done["at"] = time.monotonic()

    worker = threading.Thread(target=work, daemon=True)
    worker.start()
    if not first_token.wait(10):
        abort.abort("bench-timeout")
        worker.join(10)
        raise RuntimeError("no first token within 10 s")
    abort.abort("cancel")
    worker.join(10)
    if worker.is_alive() or "result" not in done:
        raise RuntimeError("the provider did not return within 10 s of the abort")
    if done["result"].aborted != "cancel":
        raise RuntimeError(f"the stream was not aborted: {done['result']}")
    return done["at"] - abort.aborted_at, done["result"]


def openai_sdk(samples: int) -> dict:
    to_close: list[float] = []
    to_return: list[float] = []
    not_seen = 0
    with OpenAIServer(tokens_per_s=PACE_TOKENS_PER_S) as server:
        provider = OpenAIProvider(api_key="bench", base_url=server.base_url, timeout_s=10, idle_timeout_s=10)
        try:
            for _ in range(samples):
                before = len(server.requests)
                abort = AbortSignal()
                returned_s, _result = _one(provider, abort, REQUEST)
                to_return.append(returned_s)
                record = server.requests[before]
                deadline = time.monotonic() + 2
                while record.disconnected_at is None and time.monotonic() < deadline:
                    time.sleep(0.0005)
                if record.disconnected_at is None:
                    not_seen += 1
                else:
                    to_close.append(record.disconnected_at - abort.aborted_at)
        finally:
            provider.close()
    return {"signal_to_server_saw_close": summary_ms(to_close), "signal_to_provider_returned": summary_ms(to_return),
            "closes_not_seen_by_server": not_seen}


def fake(samples: int) -> dict:
    provider = FakeProvider(tokens_per_s=PACE_TOKENS_PER_S)
    to_return = [_one(provider, AbortSignal(), REQUEST)[0] for _ in range(samples)]
    return {"signal_to_provider_returned": summary_ms(to_return)}


def run(settings, *, samples: int = SAMPLES) -> dict:
    """`settings` is unused: nothing here touches Redis, Postgres or S3."""
    return {"samples": samples, "pace_tokens_per_s": PACE_TOKENS_PER_S,
            "openai_sdk": openai_sdk(samples), "fake": fake(samples)}
