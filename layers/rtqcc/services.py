"""The clients a function needs, built once per warm container and injectable for tests."""

from __future__ import annotations

from functools import cached_property
from typing import TYPE_CHECKING

from redis import Redis

from .store.api_keys import ApiKeyStore
from .store.blobs import BlobStore, S3BlobStore
from .store.db import Database
from .errors import ConfigError
from .bus.consumer_wakeup import ConsumerWakeup
from .bus.events import EventLog
from .store.jobs import JobStore
from .writing.providers.base import Provider
from .api.rate_limit import FailedAuthThrottle, TenantRateLimiter
from .settings import Settings
from .streaming.slots import StreamSlots
from .bus.work_queue import WorkQueue

if TYPE_CHECKING:
    from .api.auth import Authenticator
    from .metrics import MetricsRecorder
    from .store.revisions import RevisionStore
    from .store.versions import VersionStore
    from .store.webhooks import WebhookStore
    from .writing.provider_waits import ProviderWaitBoard


REDIS_SOCKET_TIMEOUT_S = 60.0
REDIS_MAX_CONNECTIONS = 5000


def make_provider(settings: Settings, redis: Redis | None = None, metrics: "MetricsRecorder | None" = None) -> Provider:
    """The configured provider; with `redis`, its calls share the configured rate limits (and the
    holds a 429 sets) with every other consumer, their waits and 429s observed in `metrics`."""
    if settings.provider == "fake":
        from .writing.providers.fake import FakeProvider

        return FakeProvider(tokens_per_s=settings.fake_tokens_per_s, first_token_ms=settings.fake_first_token_ms)
    if settings.provider == "openai":
        from .writing.providers.openai import OpenAIProvider  # the SDK is heavy: only where it is used

        limiter = None
        if redis is not None:
            from .metrics import ModelLabels
            from .writing.rate_limits import ProviderRateLimiter

            label = ModelLabels(settings)

            def observe(name: str, model: str, seconds: float) -> None:
                if metrics is not None:
                    metrics.observe(name, seconds, provider="openai", model=label(model))

            limiter = ProviderRateLimiter(redis, "openai", settings.provider_limits, observe=observe)
        return OpenAIProvider.from_settings(settings, limiter=limiter)
    raise ConfigError(f"RTQCC_PROVIDER must be 'fake' or 'openai', got {settings.provider!r}")


class Services:
    def __init__(self, settings: Settings, *, redis: Redis | None = None, db: Database | None = None,
                 blobs: BlobStore | None = None, provider: Provider | None = None):
        self.settings = settings
        if redis is not None:
            self.redis = redis
        if db is not None:
            self.db = db
        if blobs is not None:
            self.blobs = blobs
        if provider is not None:
            self.provider = provider

    @cached_property
    def redis(self) -> Redis:
        # Blocking reads (XREAD for SSE, XREADGROUP for consumers) wait up to ~30 s: the socket
        # timeout must be longer, or an idle wait would be cut as an error (redis-py's default is 5 s).
        return Redis.from_url(self.settings.redis_url, decode_responses=True, socket_connect_timeout=3,
                              socket_timeout=REDIS_SOCKET_TIMEOUT_S, health_check_interval=30,
                              # each open SSE stream holds one connection in a blocking read
                              max_connections=REDIS_MAX_CONNECTIONS)

    @cached_property
    def db(self) -> Database:
        return Database(self.settings.database_url, max_size=self.settings.db_pool_size)

    @cached_property
    def blobs(self) -> BlobStore:
        return S3BlobStore.from_settings(self.settings)

    @cached_property
    def provider(self) -> Provider:
        return make_provider(self.settings, self.redis, self.metrics)

    @cached_property
    def metrics(self) -> "MetricsRecorder":
        """The histograms this process observes (provider latency, limiter waits), written to Redis
        once a second."""
        from .metrics import MetricsRecorder

        return MetricsRecorder(self.redis)

    @cached_property
    def jobs(self) -> JobStore:
        return JobStore(self.db)

    @cached_property
    def versions(self) -> "VersionStore":
        from .store.versions import VersionStore

        return VersionStore(self.db, self.blobs)

    @cached_property
    def revisions(self) -> "RevisionStore":
        from .store.revisions import RevisionStore

        return RevisionStore(self.db, self.jobs, self.blobs)

    @cached_property
    def webhooks(self) -> "WebhookStore":
        from .store.webhooks import WebhookStore

        return WebhookStore(self.db)

    @cached_property
    def events(self) -> EventLog:
        return EventLog(self.redis, maxlen=self.settings.events_maxlen)

    @cached_property
    def api_keys(self) -> ApiKeyStore:
        return ApiKeyStore(self.db, cache_ttl_s=self.settings.api_key_cache_s)

    @cached_property
    def auth(self) -> "Authenticator":
        from .api.auth import Authenticator

        throttle = FailedAuthThrottle(self.redis, limit=self.settings.auth_failures_per_min)
        return Authenticator(self.settings.api_keys, self.api_keys, throttle, self.settings.api_key_tiers)

    @cached_property
    def rate_limiter(self) -> TenantRateLimiter:
        return TenantRateLimiter(self.redis, limit=self.settings.rate_limit_per_min)

    @cached_property
    def stream_slots(self) -> StreamSlots:
        return StreamSlots(self.redis, per_tenant=self.settings.max_streams_per_tenant,
                           per_key=self.settings.max_streams_per_key)

    @cached_property
    def queue(self) -> WorkQueue:
        return WorkQueue(self.redis)

    @cached_property
    def consumer_wakeup(self) -> ConsumerWakeup:
        return ConsumerWakeup.for_function(self.redis, self.settings.consumer_function, self.settings.s3_region)

    @cached_property
    def provider_waits(self) -> "ProviderWaitBoard":
        from .writing.provider_waits import ProviderWaitBoard

        return ProviderWaitBoard(self.redis)

    def close(self) -> None:
        if "metrics" in self.__dict__:
            self.metrics.flush()
        close_provider = getattr(self.__dict__.get("provider"), "close", None)
        if close_provider is not None:
            close_provider()
        if "db" in self.__dict__:
            self.db.close()
        if "redis" in self.__dict__:
            self.redis.close()
