"""Token counts (offline BPE for OpenAI models, a heuristic for others), prices, and the settings
that configure the OpenAI provider."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from rtqcc.errors import ConfigError
from rtqcc.writing.pricing import DEFAULT_PRICES, Price, cost_usd, load_prices, price_for
from rtqcc.settings import Settings
from rtqcc.writing.tokens import (REMEMBERED_FROM_CHARS, Tokenizer, count_chat_tokens, count_tokens, encoding,
                                  estimate_tokens, tokenizer_for)


def test_openai_models_are_counted_exactly_with_their_encoding():
    # Token ids published for these encodings (the same as tiktoken's and OpenAI's tokenizer page).
    assert encoding("o200k_base").encode_ordinary("hello world") == [24912, 2375]
    assert encoding("cl100k_base").encode_ordinary("hello world") == [15339, 1917]
    assert count_tokens("hello world", "gpt-4o-mini") == 2
    text = "Don't stop: 12345 numbers, émigré café!\n\n  indented\tline\r\nnext"
    assert count_tokens(text, "gpt-4o") == 19
    assert count_tokens(text, "gpt-4") == 21
    assert count_tokens("", "gpt-4o") == 0
    # Special-token strings are plain text to a model reading them.
    assert count_tokens("<|endoftext|>", "gpt-4o") > 1


def test_a_long_text_counted_again_is_tokenized_once_and_short_ones_each_time():
    tokenized: list[str] = []

    def count(text: str) -> int:
        tokenized.append(text)
        return len(text.split())

    tokenizer = Tokenizer("words", False, count)
    prompt = "a word " * REMEMBERED_FROM_CHARS
    # the provider counts what it sent, then the run counts it for its ledger: an equal, new string
    assert tokenizer.count(prompt) == tokenizer.count("".join(["a word "] * REMEMBERED_FROM_CHARS)) == 2 * REMEMBERED_FROM_CHARS
    assert tokenizer.count("a delta") == tokenizer.count("a delta") == 2
    assert tokenizer.count("") == 0
    assert tokenized == [prompt, "a delta", "a delta"]


@pytest.mark.parametrize("model, name", [
    ("gpt-4o-mini", "o200k_base"),
    ("gpt-4o-mini-2024-07-18", "o200k_base"),
    ("ft:gpt-4o-mini-2024-07-18:acme::abc123", "o200k_base"),
    ("openai/gpt-4.1", "o200k_base"),
    ("gpt-5", "o200k_base"),
    ("o3-mini", "o200k_base"),
    ("gpt-4", "cl100k_base"),
    ("gpt-3.5-turbo", "cl100k_base"),
])
def test_models_map_to_the_encoding_of_their_family(model, name):
    tokenizer = tokenizer_for(model)
    assert (tokenizer.name, tokenizer.exact) == (name, True)


@pytest.mark.parametrize("model", ["llama3.1:8b", "Qwen/Qwen2.5-7B-Instruct", "mistral-large", "text-davinci-003"])
def test_unknown_models_fall_back_to_the_heuristic(model):
    tokenizer = tokenizer_for(model)
    assert (tokenizer.name, tokenizer.exact) == ("heuristic", False)
    prose = "The consumer drains the queue in timed batches, then checkpoints."
    assert count_tokens(prose, model) == estimate_tokens(prose)
    # Close to a real BPE tokenizer on English prose, erring high.
    assert count_tokens(prose, "gpt-4o") <= estimate_tokens(prose) <= 1.1 * count_tokens(prose, "gpt-4o")


def test_chat_prompts_count_the_framing_openai_bills():
    messages = [{"role": "system", "content": "You write."}, {"role": "user", "content": "hello world"}]
    # Each message: 3 tokens of framing + its role + its content; 3 more prime the reply.
    assert count_chat_tokens(messages, "gpt-4o") == (3 + 1 + 3) + (3 + 1 + 2) + 3


def test_the_tokenizer_never_touches_the_network(tmp_path):
    """In a fresh interpreter whose every attempt to resolve or connect is refused (an audit hook)
    and whose tiktoken cache is an empty folder, counting works and nothing was attempted."""
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    script = textwrap.dedent("""
        import json, sys
        attempts = []
        def guard(event, args):
            if event in ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname", "urllib.Request"):
                attempts.append(event)
                raise RuntimeError(f"network attempted: {event}")
        sys.addaudithook(guard)
        from rtqcc.writing.tokens import count_tokens, tokenizer_for
        counts = {m: count_tokens("hello world, offline", m) for m in ("gpt-4o-mini", "gpt-4", "gpt-5")}
        print(json.dumps({"counts": counts, "names": [tokenizer_for(m).name for m in counts], "attempts": attempts}))
    """)
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache)}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["attempts"] == []
    assert report["names"] == ["o200k_base", "cl100k_base", "o200k_base"]
    assert report["counts"] == {"gpt-4o-mini": 4, "gpt-4": 4, "gpt-5": 4}
    assert list(cache.iterdir()) == []


# ---- prices -------------------------------------------------------------------------------------

def test_prices_apply_to_dated_snapshots_and_unknown_models_have_none():
    assert price_for("gpt-4o-mini-2024-07-18", DEFAULT_PRICES) == DEFAULT_PRICES["gpt-4o-mini"]
    assert price_for("llama3.1:8b", DEFAULT_PRICES) is None
    assert cost_usd("gpt-4o-mini", 1_000_000, 1_000_000, DEFAULT_PRICES) == pytest.approx(0.15 + 0.60)
    assert cost_usd("llama3.1:8b", 10, 10, DEFAULT_PRICES) is None


def test_a_price_file_and_inline_prices_override_the_defaults(tmp_path):
    path = tmp_path / "prices.json"
    path.write_text(json.dumps({"llama3.1:8b": {"input_per_1m": 0, "output_per_1m": 0},
                                "gpt-4o": {"input_per_1m": 2.0, "output_per_1m": 8.0}}))
    prices = load_prices({"RTQCC_PRICES_FILE": str(path),
                          "RTQCC_PRICES": '{"gpt-4o": {"input_per_1m": 1, "output_per_1m": 4}}'})
    assert prices["llama3.1:8b"] == Price(0.0, 0.0)
    assert prices["gpt-4o"] == Price(1.0, 4.0)  # inline wins over the file
    assert prices["gpt-4o-mini"] == DEFAULT_PRICES["gpt-4o-mini"]
    assert Settings.from_env({"RTQCC_PRICES_FILE": str(path)}).prices["llama3.1:8b"] == Price(0.0, 0.0)


@pytest.mark.parametrize("env, message", [
    ({"RTQCC_PRICES_FILE": "/nonexistent/prices.json"}, "RTQCC_PRICES_FILE: cannot read"),
    ({"RTQCC_PRICES": "{not json"}, "RTQCC_PRICES is not valid JSON"),
    ({"RTQCC_PRICES": '{"m": {"input_per_1m": -1, "output_per_1m": 1}}'}, "m.input_per_1m must be a number"),
    ({"RTQCC_PRICES": '{"m": 3}'}, "the price of 'm' must be an object"),
])
def test_bad_price_tables_are_refused_naming_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


# ---- provider settings --------------------------------------------------------------------------

def test_openai_settings_are_read_from_the_environment():
    settings = Settings.from_env({
        "RTQCC_PROVIDER": "openai", "OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://127.0.0.1:8400/v1",
        "OPENAI_ORGANIZATION": "org-1", "OPENAI_PROJECT": "proj-1", "RTQCC_OPENAI_TIMEOUT_S": "12.5",
        "RTQCC_OPENAI_IDLE_TIMEOUT_S": "3", "RTQCC_OPENAI_MAX_RETRIES": "7", "RTQCC_OPENAI_MAX_CONTINUATIONS": "1",
        "RTQCC_OPENAI_BACKOFF_S": "0.25", "RTQCC_OPENAI_BACKOFF_MAX_S": "9",
    })
    assert (settings.provider, settings.openai_base_url, settings.openai_organization, settings.openai_project) == (
        "openai", "http://127.0.0.1:8400/v1", "org-1", "proj-1")
    assert (settings.openai_timeout_s, settings.openai_idle_timeout_s, settings.openai_max_retries,
            settings.openai_max_continuations, settings.openai_backoff_s, settings.openai_backoff_max_s) == (
        12.5, 3.0, 7, 1, 0.25, 9.0)
    assert "sk-x" not in repr(settings)


@pytest.mark.parametrize("env, message", [
    ({"RTQCC_OPENAI_TIMEOUT_S": "soon"}, "RTQCC_OPENAI_TIMEOUT_S must be a number"),
    ({"RTQCC_OPENAI_IDLE_TIMEOUT_S": "0"}, "RTQCC_OPENAI_IDLE_TIMEOUT_S must be at least"),
    ({"RTQCC_OPENAI_MAX_RETRIES": "2.5"}, "RTQCC_OPENAI_MAX_RETRIES must be a whole number"),
    ({"RTQCC_PROVIDER": "openai"}, "OPENAI_API_KEY is not set"),
])
def test_bad_provider_settings_name_the_variable(env, message):
    with pytest.raises(ConfigError, match=message):
        Settings.from_env(env)


def test_make_provider_builds_the_openai_provider_from_settings():
    from rtqcc.writing.providers.openai import OpenAIProvider
    from rtqcc.services import make_provider

    provider = make_provider(Settings.from_env({"RTQCC_PROVIDER": "openai", "OPENAI_API_KEY": "sk-x",
                                                "OPENAI_BASE_URL": "http://127.0.0.1:9/v1",
                                                "RTQCC_OPENAI_MAX_RETRIES": "1"}))
    try:
        assert isinstance(provider, OpenAIProvider)
        assert (provider.server, provider.max_retries, provider.max_tokens_field) == (
            "http://127.0.0.1:9/v1", 1, "max_tokens")
    finally:
        provider.close()
    official = make_provider(Settings.from_env({"OPENAI_API_KEY": "sk-x"}))
    try:
        assert official.max_tokens_field == "max_completion_tokens"  # OpenAI's own API
    finally:
        official.close()
