"""Fixtures for the OpenAI provider: the local OpenAI-compatible server (uvicorn in a thread on a
free 127.0.0.1 port), providers built on the real SDK pointed at it, and settings read the way a
deployment reads them (`RTQCC_PROVIDER=openai`, `OPENAI_BASE_URL`, ...). Import the fixtures a
test module uses from here."""

from __future__ import annotations

from typing import Callable, Iterator

import pytest

from rtqcc.writing.providers.openai import OpenAIProvider
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc_emulator.openai_server import OpenAIServer

OPENAI_TEST_KEY = "sk-test-local"
# Quick retries so fault tests take milliseconds; timeouts short enough that a bug fails fast.
FAST_ENV = {
    "RTQCC_OPENAI_BACKOFF_S": "0.01",
    "RTQCC_OPENAI_BACKOFF_MAX_S": "2",
    "RTQCC_OPENAI_TIMEOUT_S": "5",
    "RTQCC_OPENAI_IDLE_TIMEOUT_S": "5",
}
_PROVIDER_FIELDS = ("provider", "openai_api_key", "openai_base_url", "openai_organization", "openai_project",
                    "openai_timeout_s", "openai_idle_timeout_s", "openai_max_retries", "openai_max_continuations",
                    "openai_backoff_s", "openai_backoff_max_s", "prices", "default_model", "provider_limits")


@pytest.fixture(scope="session")
def openai_server() -> Iterator[OpenAIServer]:
    server = OpenAIServer(api_key=OPENAI_TEST_KEY).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def llm(openai_server) -> Iterator[OpenAIServer]:
    """The local OpenAI-compatible server, with no fault queued, full speed, and a fresh log."""
    openai_server.reset()
    openai_server.set_pace(tokens_per_s=0, first_token_ms=0)
    yield openai_server
    openai_server.reset()


@pytest.fixture
def make_openai_provider(llm) -> Iterator[Callable[..., OpenAIProvider]]:
    made: list[OpenAIProvider] = []

    def make(**overrides) -> OpenAIProvider:
        options = {"api_key": OPENAI_TEST_KEY, "base_url": llm.base_url, "backoff_s": 0.01, "backoff_max_s": 2.0,
                   "timeout_s": 5.0, "idle_timeout_s": 5.0, **overrides}
        made.append(OpenAIProvider(**options))
        return made[-1]

    yield make
    for provider in made:
        provider.close()


def openai_settings(settings: Settings, base_url: str, **env: str) -> Settings:
    """The test settings, with the provider part read from the environment a user would set."""
    parsed = Settings.from_env({
        "RTQCC_PROVIDER": "openai", "OPENAI_API_KEY": OPENAI_TEST_KEY, "OPENAI_BASE_URL": base_url,
        **FAST_ENV, **env,
    })
    return settings.with_overrides(**{name: getattr(parsed, name) for name in _PROVIDER_FIELDS})


@pytest.fixture
def make_openai_services(settings, llm, database, redis_client, blob_store) -> Iterator[Callable[..., Services]]:
    """Services whose provider `make_provider` builds from RTQCC_PROVIDER=openai settings."""
    made: list[Services] = []

    def make(**env: str) -> Services:
        made.append(Services(openai_settings(settings, llm.base_url, **env), redis=redis_client, db=database,
                             blobs=blob_store))
        return made[-1]

    yield make
    for services in made:
        if "provider" in services.__dict__:
            services.provider.close()
