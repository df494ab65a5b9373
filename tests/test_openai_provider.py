"""The OpenAI provider through the real SDK, over real HTTP, against the local OpenAI-compatible
server: streaming and usage, continuation, every fault the server can inject, and abort."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import threading

import httpx
import pytest
from conftest import wait_for

from rtqcc.writing.abort import AbortSignal
from rtqcc.writing.prompts import outline_schema, parse_outline
from rtqcc.writing.providers.base import GenerationRequest, ProviderRefused, ProviderUnavailable, QuotaExceeded
from rtqcc.writing.providers.openai import CONTINUE_INSTRUCTION
from rtqcc.writing.tokens import count_chat_tokens, count_tokens

REQUEST = GenerationRequest(model="gpt-4o-mini", system="You write.", prompt="Write about durable queues.",
                            max_tokens=120)

pytest_plugins = ["openai_fixtures"]  # the local OpenAI-compatible server and its providers


def _run(provider, request=REQUEST, abort=None):
    deltas: list[str] = []
    result = provider.stream(request, abort or AbortSignal(), deltas.append)
    return result, deltas


class _Background:
    """`provider.stream` on another thread, noting the deltas it passes on as they come."""

    def __init__(self, provider, request, abort):
        self.deltas: list[str] = []
        self.result = None
        self.error = None
        self._thread = threading.Thread(target=self._run, args=(provider, request, abort), daemon=True)
        self._thread.start()

    def _run(self, provider, request, abort):
        try:
            self.result = provider.stream(request, abort, self.deltas.append)
        except BaseException as exc:
            self.error = exc

    def join(self, timeout_s=5.0):
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the provider did not return in time"
        if self.error:
            raise self.error
        return self.result


# ---- streaming, usage, continuation -------------------------------------------------------------

def test_streams_deltas_and_takes_usage_from_the_final_chunk(llm, make_openai_provider):
    result, deltas = _run(make_openai_provider())

    assert result.finish_reason == "stop" and result.aborted is None
    assert len(deltas) > 10 and "".join(deltas) == result.text
    (sent,) = llm.requests
    assert sent.stream and sent.params["stream_options"] == {"include_usage": True}
    assert sent.params["max_tokens"] == 120 and sent.text_sent == result.text
    (call,) = result.calls
    assert (call.reported_prompt_tokens, call.reported_completion_tokens) == (
        sent.usage["prompt_tokens"], sent.usage["completion_tokens"])
    # Our count of an OpenAI model is exact: it matches what the server reported.
    assert (call.counted_prompt_tokens, call.counted_completion_tokens) == (
        call.reported_prompt_tokens, call.reported_completion_tokens)
    assert call.counted_prompt_tokens == count_chat_tokens(sent.messages, "gpt-4o-mini")


def test_a_prefix_is_continued_without_repeating_it(llm, make_openai_provider):
    provider = make_openai_provider()
    whole, _ = _run(provider)
    cut_at = len(whole.text) // 3
    prefix = whole.text[:cut_at]

    result, deltas = _run(provider, GenerationRequest(**{**REQUEST.__dict__, "prefix": prefix}))

    assert result.text == whole.text[cut_at:] == "".join(deltas)
    messages = llm.requests[-1].messages
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == prefix and messages[3]["content"] == CONTINUE_INSTRUCTION


def test_structured_output_asks_for_json_schema_and_falls_back_when_the_server_rejects_it(llm, make_openai_provider):
    provider = make_openai_provider()
    request = GenerationRequest(model="gpt-4o-mini", system="s", prompt="Return JSON with exactly 3 sections.",
                                json_schema=outline_schema(3))
    first, _ = _run(provider, request)
    assert llm.requests[-1].params["response_format"]["type"] == "json_schema"
    assert llm.requests[-1].params["response_format"]["json_schema"]["strict"] is True
    assert len(parse_outline(first.text, 3)) == 3

    llm.add_faults({"kind": "reject_response_format"})
    other = make_openai_provider()
    second, _ = _run(other, request)
    rejected, accepted = llm.requests[-2:]
    assert rejected.status == 400 and accepted.params["response_format"] == {"type": "json_object"}
    assert len(parse_outline(second.text, 3)) == 3  # validated either way
    assert len(second.calls) == 1  # the rejected call generated nothing and is not billed


# ---- failures before the first token ------------------------------------------------------------

def test_a_429_is_retried_after_the_wait_retry_after_asks_for(llm, make_openai_provider):
    llm.add_faults({"kind": "rate_limit", "retry_after_s": 0.3})
    result, _ = _run(make_openai_provider())

    assert result.finish_reason == "stop"
    assert [r.status for r in llm.requests] == [429, 200]
    # The behaviour asked for is a wait: the server saw the retry no sooner than it asked (a lower
    # bound, which a slow machine only widens).
    assert llm.requests[1].started_at - llm.requests[0].ended_at >= 0.3
    assert len(result.calls) == 1


def test_5xx_are_retried_with_backoff_then_the_job_is_handed_back(llm, make_openai_provider):
    llm.add_faults({"kind": "server_error", "status": 503, "times": 2})
    result, _ = _run(make_openai_provider(max_retries=2))
    assert result.finish_reason == "stop"
    assert [r.status for r in llm.requests] == [503, 503, 200]

    llm.reset()
    llm.add_faults({"kind": "server_error", "times": 3})
    with pytest.raises(ProviderUnavailable, match="refused 3 calls"):
        _run(make_openai_provider(max_retries=2))
    assert [r.status for r in llm.requests] == [500, 500, 500]


def test_insufficient_quota_fails_at_once_with_a_clear_reason(llm, make_openai_provider):
    llm.add_faults({"kind": "insufficient_quota"})
    with pytest.raises(QuotaExceeded, match="insufficient_quota") as raised:
        _run(make_openai_provider())
    assert isinstance(raised.value, ProviderRefused)
    assert "billing" in str(raised.value)
    assert len(llm.requests) == 1  # not retried


def test_a_bad_key_is_refused_not_retried(llm, make_openai_provider):
    with pytest.raises(ProviderRefused, match="401 invalid_api_key"):
        _run(make_openai_provider(api_key="sk-wrong"))
    assert len(llm.requests) == 0  # refused before it was logged as a chat request


# ---- streams cut mid-way --------------------------------------------------------------------------

@pytest.mark.parametrize("fault", [
    {"kind": "cut", "after_tokens": 7},
    {"kind": "cut", "after_tokens": 7, "mode": "end"},
    {"kind": "malformed", "after_tokens": 7},
], ids=["connection-dropped", "ended-without-finish", "malformed-chunk"])
def test_a_cut_stream_is_continued_from_its_text_and_each_call_billed(llm, make_openai_provider, fault):
    provider = make_openai_provider()
    whole, _ = _run(provider)
    llm.reset()
    llm.add_faults(fault)

    result, deltas = _run(provider)

    assert result.finish_reason == "stop" and result.text == whole.text == "".join(deltas)
    cut, continued = llm.requests
    kept = "".join(re.findall(r"\s*\S+", whole.text)[:7])  # the 7 pieces that arrived whole
    assert continued.messages[2] == {"role": "assistant", "content": kept}
    assert cut.usage is None or fault["kind"] == "malformed"
    first, second = result.calls
    assert first.finish_reason is None and first.reported_completion_tokens is None  # billed by our count
    assert first.counted_completion_tokens == count_tokens(kept, "gpt-4o-mini")
    assert second.finish_reason == "stop"
    assert second.reported_prompt_tokens == continued.usage["prompt_tokens"] > first.counted_prompt_tokens


def test_cuts_beyond_the_limit_return_the_text_without_a_finish_reason(llm, make_openai_provider):
    provider = make_openai_provider(max_continuations=1)
    whole, _ = _run(provider)
    llm.reset()
    llm.add_faults({"kind": "cut", "after_tokens": 4}, {"kind": "cut", "after_tokens": 4})

    result, _ = _run(provider)

    assert result.finish_reason is None and result.aborted is None
    assert len(result.calls) == 2 and len(llm.requests) == 2
    assert result.text and whole.text.startswith(result.text)
    assert result.text == llm.requests[0].text_sent + llm.requests[1].text_sent


def test_a_stall_longer_than_the_idle_timeout_is_a_cut(llm, make_openai_provider):
    provider = make_openai_provider(idle_timeout_s=0.3)
    whole, _ = _run(provider)
    llm.reset()
    llm.add_faults({"kind": "stall", "after_tokens": 5, "seconds": 30})

    result, _ = _run(provider)

    assert result.finish_reason == "stop" and result.text == whole.text
    stalled, continued = llm.requests
    # The client hung up during the 30 s silence: the server never sent the stalled answer's 6th piece.
    wait_for(lambda: stalled.disconnected_at, timeout_s=5, what="the stalled request's connection to close")
    assert stalled.pieces_sent == 5 and stalled.finish_reason is None
    assert continued.finish_reason == "stop"
    assert result.calls[0].finish_reason is None


def test_a_slow_first_token_within_the_timeout_is_not_a_stall(llm, make_openai_provider):
    llm.add_faults({"kind": "slow_first_token", "seconds": 0.5})
    result, _ = _run(make_openai_provider(timeout_s=3, idle_timeout_s=0.2))
    assert result.finish_reason == "stop" and len(llm.requests) == 1


def test_no_usage_chunk_leaves_reported_empty_and_our_count_stands(llm, make_openai_provider):
    llm.add_faults({"kind": "no_usage"})
    result, _ = _run(make_openai_provider())
    assert result.finish_reason == "stop"
    (call,) = result.calls
    assert call.reported_prompt_tokens is None and call.reported_completion_tokens is None
    assert result.reported_completion_tokens is None
    assert call.counted_completion_tokens == count_tokens(result.text, "gpt-4o-mini") > 0


# ---- abort --------------------------------------------------------------------------------------

def test_abort_closes_the_connection_at_once_even_while_no_token_comes_and_returns_the_partial_text(
        llm, make_openai_provider):
    # The server goes silent for a minute after 5 pieces: a provider that noticed the abort only
    # when the next chunk came would hang on; closing the socket wakes it at once.
    llm.add_faults({"kind": "stall", "after_tokens": 5, "seconds": 60})
    abort = AbortSignal()
    provider = make_openai_provider(timeout_s=120, idle_timeout_s=120)  # no watchdog cuts the silence
    running = _Background(provider, GenerationRequest(**{**REQUEST.__dict__, "max_tokens": 4000}), abort)
    (sent,) = wait_for(lambda: llm.requests, timeout_s=5, what="the request to reach the server")
    wait_for(lambda: len(running.deltas) == 5, timeout_s=5, what="the 5 pieces before the silence to arrive")

    abort.abort("cancel")
    result = running.join(10)

    wait_for(lambda: sent.disconnected_at, timeout_s=5, what="the server to see the client go")
    assert sent.pieces_sent == 5 and sent.finish_reason is None  # closed during the silence
    assert result.aborted == "cancel" and result.finish_reason is None
    assert result.text == "".join(running.deltas) == sent.text_sent
    (call,) = result.calls
    assert call.aborted == "cancel" and call.reported_completion_tokens is None
    assert call.counted_completion_tokens == count_tokens(result.text, "gpt-4o-mini")


def test_abort_while_waiting_for_the_first_token(llm, make_openai_provider):
    llm.add_faults({"kind": "slow_first_token", "seconds": 30})
    abort = AbortSignal()
    running = _Background(make_openai_provider(timeout_s=60), REQUEST, abort)
    wait_for(lambda: llm.requests, timeout_s=5, what="the request to reach the server")

    abort.abort("pause")
    result = running.join(10)  # well before the first token, 30 s away

    assert result.aborted == "pause" and result.text == ""
    wait_for(lambda: llm.requests[0].disconnected_at, timeout_s=5, what="the server to see the client go")
    assert llm.requests[0].pieces_sent == 0 and llm.requests[0].finish_reason is None


def test_abort_during_a_retry_wait_returns_at_once(llm, make_openai_provider):
    llm.add_faults({"kind": "rate_limit", "retry_after_s": 60})
    abort = AbortSignal()
    running = _Background(make_openai_provider(backoff_max_s=120), REQUEST, abort)  # it waits the 60 s asked
    wait_for(lambda: llm.requests and llm.requests[0].ended_at, timeout_s=5, what="the 429")

    abort.abort("cancel")
    result = running.join(10)  # well within the minute it would otherwise wait

    assert result.aborted == "cancel" and result.calls == []
    assert len(llm.requests) == 1  # it did not retry


# ---- the server's control API over HTTP, and standalone -----------------------------------------

def test_faults_queued_over_http_apply_to_the_next_requests(llm, make_openai_provider):
    with httpx.Client(base_url=llm.base_url.removesuffix("/v1"), timeout=5) as control:
        assert control.post("/_faults", json=[{"kind": "server_error"}, {"kind": "no_usage"}]).json() == {"queued": 2}
        assert control.post("/_faults", json={"kind": "nonsense"}).status_code == 400
        result, _ = _run(make_openai_provider())
        seen = control.get("/_requests").json()["requests"]
    assert result.finish_reason == "stop"
    assert [(r["status"], r["fault"]) for r in seen] == [(500, "server_error"), (200, "no_usage")]
    assert seen[1]["usage"] is None


def test_errors_have_the_openai_shape(llm):
    with httpx.Client(base_url=llm.base_url, timeout=5) as client:
        llm.add_faults({"kind": "insufficient_quota"})
        answer = client.post("/chat/completions", headers={"Authorization": f"Bearer {llm.api_key}"},
                             json={"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]})
    assert answer.status_code == 429
    assert answer.json() == {"error": {"message": answer.json()["error"]["message"], "type": "insufficient_quota",
                                       "param": None, "code": "insufficient_quota"}}


def test_the_server_runs_standalone(tmp_path):
    process = subprocess.Popen([sys.executable, "-m", "rtqcc_emulator.openai_server", "--port", "0",
                                "--tokens-per-s", "0", "--first-token-ms", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # It binds a free port itself and names it in its first line, once it listens.
        readable, _, _ = select.select([process.stdout], [], [], 30)
        first_line = process.stdout.readline() if readable else ""
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", first_line)
        assert found, f"the standalone server did not say where it listens: {first_line!r}"
        port = int(found.group(1))
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=5).status_code == 200
        from rtqcc.writing.providers.openai import OpenAIProvider

        provider = OpenAIProvider(api_key="anything", base_url=f"http://127.0.0.1:{port}/v1", timeout_s=5)
        try:
            result, _ = _run(provider)
        finally:
            provider.close()
        assert result.finish_reason == "stop" and result.calls[0].reported_completion_tokens > 0
        seen = httpx.get(f"http://127.0.0.1:{port}/_requests", timeout=5).json()["requests"]
        assert json.dumps(seen[0]["messages"]).count("durable queues") == 1
    finally:
        process.terminate()
        process.wait(10)
