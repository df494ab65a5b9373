"""Typed settings, read from the environment once and passed down."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Mapping

from .errors import ConfigError
from .pricing import DEFAULT_PRICES, Price, load_prices

DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
DEFAULT_DATABASE_URL = "postgresql://postgres@127.0.0.1:5432/rtqcc"


def _int(env: Mapping[str, str], name: str, default: int, minimum: int = 0) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a whole number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    return value


def _float(env: Mapping[str, str], name: str, default: float, minimum: float = 0.0,
           maximum: float | None = None) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigError(f"{name} must be a number, got {raw!r}") from None
    if value < minimum:
        raise ConfigError(f"{name} must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{name} must be at most {maximum}, got {value}")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    lowered = raw.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be true or false, got {raw!r}")


def _url(env: Mapping[str, str], name: str, default: str | None, schemes: tuple[str, ...]) -> str | None:
    raw = env.get(name) or default
    if raw is None:
        return None
    scheme = raw.split("://", 1)[0] if "://" in raw else ""
    if scheme not in schemes:
        raise ConfigError(f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)}, got {raw!r}")
    return raw


def _api_keys(env: Mapping[str, str]) -> dict[str, str]:
    """`RTQCC_API_KEYS` is `key:tenant,key:tenant`; `RTQCC_DEV_API_KEY` adds one key for tenant `dev`."""
    keys: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in env.get("RTQCC_API_KEYS", "").split(","))):
        key, sep, tenant = item.partition(":")
        if not sep or not key or not tenant:
            raise ConfigError(f"RTQCC_API_KEYS entries must look like key:tenant, got {item!r}")
        keys[key] = tenant
    dev_key = env.get("RTQCC_DEV_API_KEY")
    if dev_key:
        keys[dev_key] = "dev"
    return keys


@dataclass(frozen=True)
class Settings:
    redis_url: str = DEFAULT_REDIS_URL
    database_url: str = DEFAULT_DATABASE_URL
    db_pool_size: int = 10
    s3_endpoint_url: str | None = None
    s3_bucket: str = "rtqcc"
    s3_region: str = "us-east-1"
    s3_create_bucket: bool = False
    localstack_host: str | None = None  # S3 through LocalStack (localstack-client) when no endpoint is set
    # Unset: boto3's own credential chain (instance role, profile, ...).
    aws_access_key_id: str | None = field(default=None, repr=False)
    aws_secret_access_key: str | None = field(default=None, repr=False)
    aws_session_token: str | None = field(default=None, repr=False)

    provider: str = "fake"
    openai_api_key: str | None = field(default=None, repr=False)
    openai_base_url: str | None = None
    default_model: str = "gpt-4o-mini"
    fake_tokens_per_s: float = 200.0
    fake_first_token_ms: int = 0
    openai_organization: str | None = None
    openai_project: str | None = None
    openai_timeout_s: float = 60.0         # connect, send, and wait for the answer to start
    openai_idle_timeout_s: float = 30.0    # longest silence inside a stream before it counts as cut
    openai_max_retries: int = 4            # refused calls (429, 5xx, no connection) retried per answer
    openai_max_continuations: int = 2      # cut streams continued from their text per answer
    openai_backoff_s: float = 0.5          # first retry delay; doubles, with full jitter
    openai_backoff_max_s: float = 20.0
    prices: Mapping[str, Price] = field(default_factory=lambda: dict(DEFAULT_PRICES))

    api_keys: dict[str, str] = field(default_factory=dict)
    stream_token_secret: str | None = None
    max_sections: int = 100
    rate_limit_per_min: int = 600
    max_body_bytes: int = 256 * 1024

    lease_ttl_s: float = 30.0
    control_poll_s: float = 1.0
    delta_flush_ms: int = 50
    events_maxlen: int = 10_000
    sse_heartbeat_s: float = 15.0
    sse_long_poll_s: float = 25.0
    sse_retry_ms: int = 1000

    # One at a time: a consumer works its jobs in turn, so a larger batch would only hold jobs
    # back from idle consumers.
    consumer_batch_size: int = 1
    consumer_idle_exit_ms: int = 1000
    consumer_safety_margin_ms: int = 2000
    consumer_max_deliveries: int = 5
    crash_at: str | None = None  # fault tests only: see failpoints.py

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        openai_key = env.get("OPENAI_API_KEY") or None
        provider = env.get("RTQCC_PROVIDER") or ("openai" if openai_key else "fake")
        if provider not in ("fake", "openai"):
            raise ConfigError(f"RTQCC_PROVIDER must be 'fake' or 'openai', got {provider!r}")
        if provider == "openai" and not openai_key:
            raise ConfigError("RTQCC_PROVIDER is 'openai' but OPENAI_API_KEY is not set")
        return cls(
            redis_url=_url(env, "REDIS_URL", DEFAULT_REDIS_URL, ("redis", "rediss", "unix")),
            database_url=_url(env, "DATABASE_URL", DEFAULT_DATABASE_URL, ("postgresql", "postgres")),
            db_pool_size=_int(env, "RTQCC_DB_POOL_SIZE", 10, minimum=1),
            s3_endpoint_url=_url(env, "S3_ENDPOINT_URL", None, ("http", "https")),
            s3_bucket=env.get("S3_BUCKET") or "rtqcc",
            s3_region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or "us-east-1",
            s3_create_bucket=_bool(env, "S3_CREATE_BUCKET", bool(env.get("S3_ENDPOINT_URL") or env.get("LOCALSTACK_HOST"))),
            localstack_host=env.get("LOCALSTACK_HOST") or None,
            aws_access_key_id=env.get("AWS_ACCESS_KEY_ID") or None,
            aws_secret_access_key=env.get("AWS_SECRET_ACCESS_KEY") or None,
            aws_session_token=env.get("AWS_SESSION_TOKEN") or None,
            provider=provider,
            openai_api_key=openai_key,
            openai_base_url=_url(env, "OPENAI_BASE_URL", None, ("http", "https")),
            default_model=env.get("RTQCC_DEFAULT_MODEL") or "gpt-4o-mini",
            fake_tokens_per_s=_float(env, "RTQCC_FAKE_TOKENS_PER_S", 200.0),
            fake_first_token_ms=_int(env, "RTQCC_FAKE_FIRST_TOKEN_MS", 0),
            openai_organization=env.get("OPENAI_ORGANIZATION") or env.get("OPENAI_ORG_ID") or None,
            openai_project=env.get("OPENAI_PROJECT") or env.get("OPENAI_PROJECT_ID") or None,
            openai_timeout_s=_float(env, "RTQCC_OPENAI_TIMEOUT_S", 60.0, minimum=0.1),
            openai_idle_timeout_s=_float(env, "RTQCC_OPENAI_IDLE_TIMEOUT_S", 30.0, minimum=0.1),
            openai_max_retries=_int(env, "RTQCC_OPENAI_MAX_RETRIES", 4),
            openai_max_continuations=_int(env, "RTQCC_OPENAI_MAX_CONTINUATIONS", 2),
            openai_backoff_s=_float(env, "RTQCC_OPENAI_BACKOFF_S", 0.5),
            openai_backoff_max_s=_float(env, "RTQCC_OPENAI_BACKOFF_MAX_S", 20.0),
            prices=load_prices(env),
            api_keys=_api_keys(env),
            stream_token_secret=env.get("RTQCC_STREAM_TOKEN_SECRET") or None,
            max_sections=_int(env, "RTQCC_MAX_SECTIONS", 100, minimum=1),
            rate_limit_per_min=_int(env, "RTQCC_RATE_LIMIT_PER_MIN", 600),
            max_body_bytes=_int(env, "RTQCC_MAX_BODY_BYTES", 256 * 1024, minimum=1024),
            # Blocking Redis reads last up to lease_ttl/2 and the heartbeat: keep both under the
            # client's socket timeout (services.REDIS_SOCKET_TIMEOUT_S).
            lease_ttl_s=_float(env, "RTQCC_LEASE_TTL_S", 30.0, minimum=0.2, maximum=100.0),
            control_poll_s=_float(env, "RTQCC_CONTROL_POLL_S", 1.0, minimum=0.05),
            delta_flush_ms=_int(env, "RTQCC_DELTA_FLUSH_MS", 50),
            events_maxlen=_int(env, "RTQCC_EVENTS_MAXLEN", 10_000, minimum=100),
            sse_heartbeat_s=_float(env, "RTQCC_SSE_HEARTBEAT_S", 15.0, minimum=0.1, maximum=50.0),
            # Under API Gateway's 29 s integration timeout, with room to answer.
            sse_long_poll_s=_float(env, "RTQCC_SSE_LONG_POLL_S", 25.0, minimum=0.1, maximum=27.0),
            sse_retry_ms=_int(env, "RTQCC_SSE_RETRY_MS", 1000),
            consumer_batch_size=_int(env, "RTQCC_CONSUMER_BATCH_SIZE", 1, minimum=1),
            consumer_idle_exit_ms=_int(env, "RTQCC_CONSUMER_IDLE_EXIT_MS", 1000),
            consumer_safety_margin_ms=_int(env, "RTQCC_CONSUMER_SAFETY_MARGIN_MS", 2000),
            consumer_max_deliveries=_int(env, "RTQCC_CONSUMER_MAX_DELIVERIES", 5, minimum=1),
            crash_at=env.get("RTQCC_CRASH_AT") or None,
        )

    def with_overrides(self, **changes: object) -> "Settings":
        return replace(self, **changes)
