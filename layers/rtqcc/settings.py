"""Typed settings, read from the environment once and passed down."""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, replace
from typing import Mapping

from .errors import ConfigError
from .redact import redact_urls
from .tracing import TracingSettings
from .writing.pricing import DEFAULT_PRICES, Price, load_prices
from .writing.rate_limits import ModelLimit, parse_limits

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
        raise ConfigError(f"{name} must be a URL starting with {' or '.join(s + '://' for s in schemes)}, "
                          f"got {redact_urls(raw)!r}")
    return raw


MIN_SECRET_BYTES = 32
_PLACEHOLDER_MARKS = ("change-me", "changeme", "change_me", "replace-me", "example", "placeholder", "secret")


def looks_like_placeholder(value: str) -> bool:
    """A value someone copied from documentation instead of generating one."""
    lowered = value.lower()
    return any(mark in lowered for mark in _PLACEHOLDER_MARKS) or value.strip(".* x") == "" or len(set(value)) < 8


def _secret(env: Mapping[str, str], name: str) -> str | None:
    """A random secret of at least 32 bytes, or None when unset; a short or placeholder value
    fails at start naming the variable, rather than weakening what it protects."""
    raw = env.get(name) or None
    if raw is None:
        return None
    hint = "generate one with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    if looks_like_placeholder(raw):
        raise ConfigError(f"{name} looks like a placeholder, not a random secret; {hint}")
    if len(raw.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"{name} must be a random secret of at least {MIN_SECRET_BYTES} bytes, "
                          f"got {len(raw.encode())}; {hint}")
    return raw


def _list(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    return tuple(filter(None, (part.strip() for part in env.get(name, "").split(","))))


_HOST_NAME = re.compile(r"(\*\.)?[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")


def _host_names(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Host names (or `*.example.com` for its subdomains, or IP addresses), without port."""
    names = []
    for item in _list(env, name):
        host = item.lower().strip("[]")
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not _HOST_NAME.fullmatch(host):
                raise ConfigError(f"{name} entries must be host names without scheme or port "
                                  f"(like api.example.com or *.example.com), got {item!r}") from None
        names.append(host)
    return tuple(names)


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """IP addresses or networks (CIDR)."""
    for item in _list(env, name):
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            raise ConfigError(f"{name} entries must be IP addresses or networks like 10.0.0.0/8, "
                              f"got {item!r}") from None
    return _list(env, name)


def _webhook_allowed_networks(env: Mapping[str, str]) -> tuple[str, ...]:
    """`RTQCC_WEBHOOK_ALLOW_PRIVATE`: true (every address), false (public ones only: the default),
    or the networks besides public ones webhooks may reach (like 127.0.0.0/8,10.1.0.0/16)."""
    raw = (env.get("RTQCC_WEBHOOK_ALLOW_PRIVATE") or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return ()
    if raw in ("1", "true", "yes", "on"):
        return ("0.0.0.0/0", "::/0")
    return _networks(env, "RTQCC_WEBHOOK_ALLOW_PRIVATE")


def _api_keys(env: Mapping[str, str]) -> tuple[dict[str, str], dict[str, str]]:
    """`RTQCC_API_KEYS` is `key:tenant[:tier],...`; `RTQCC_DEV_API_KEY` adds one key for tenant
    `dev`. The keys' tenants, and the tiers of those that name one."""
    keys: dict[str, str] = {}
    tiers: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in env.get("RTQCC_API_KEYS", "").split(","))):
        key, sep, rest = item.partition(":")
        tenant, _, tier = rest.partition(":")
        if not sep or not key or not tenant or ":" in tier:
            raise ConfigError(f"RTQCC_API_KEYS entries must look like key:tenant or key:tenant:tier, got {item!r}")
        keys[key] = tenant
        if tier:
            tiers[key] = tier
    dev_key = env.get("RTQCC_DEV_API_KEY")
    if dev_key:
        keys[dev_key] = "dev"
    return keys, tiers


def _tier_caps(env: Mapping[str, str]) -> dict[str, int]:
    """`RTQCC_TIER_MAX_RUNNING` is `tier=cap,...`: the most running jobs of a tenant whose job was
    created with a key of that tier (0: no cap)."""
    caps: dict[str, int] = {}
    for item in _list(env, "RTQCC_TIER_MAX_RUNNING"):
        tier, sep, cap = item.partition("=")
        if not sep or not tier.strip() or not cap.strip().isdigit():
            raise ConfigError(f"RTQCC_TIER_MAX_RUNNING entries must look like tier=cap (a whole number), got {item!r}")
        caps[tier.strip()] = int(cap)
    return caps


def _environment(env: Mapping[str, str]) -> str:
    value = (env.get("RTQCC_ENV") or "production").strip().lower()
    if value not in ("production", "local"):
        raise ConfigError(f"RTQCC_ENV must be 'production' or 'local', got {value!r}")
    return value


@dataclass(frozen=True)
class Settings:
    # repr=False: URLs carry passwords, and a Settings in a log line or traceback must not.
    redis_url: str = field(default=DEFAULT_REDIS_URL, repr=False)
    database_url: str = field(default=DEFAULT_DATABASE_URL, repr=False)
    db_pool_size: int = 10
    s3_endpoint_url: str | None = field(default=None, repr=False)
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
    openai_base_url: str | None = field(default=None, repr=False)
    default_model: str = "gpt-4o-mini"
    fake_tokens_per_s: float = 200.0
    # OpenTelemetry: OTEL_EXPORTER_OTLP_ENDPOINT (or ..._TRACES_ENDPOINT) and OTEL_SERVICE_NAME
    tracing: TracingSettings = TracingSettings(endpoint=None)
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
    # Requests and tokens per minute per model, shared by every consumer (writing/rate_limits.py).
    provider_limits: Mapping[str, ModelLimit] = field(default_factory=dict)

    api_keys: dict[str, str] = field(default_factory=dict)
    api_key_tiers: dict[str, str] = field(default_factory=dict, repr=False)  # key -> tier, where one is named
    tier_max_running: dict[str, int] = field(default_factory=dict)
    # "production" (the default: deployed stages) or "local" (`rtqcc up`, which makes its own secrets)
    environment: str = "production"
    # Signs stream tokens; the previous secret is still accepted, so a rotation breaks no open page.
    stream_token_secret: str | None = field(default=None, repr=False)
    stream_token_previous_secret: str | None = field(default=None, repr=False)
    metrics_token: str | None = field(default=None, repr=False)  # GET /metrics needs it; unset: off
    api_key_cache_s: float = 30.0          # how soon a revoked key (and its stream tokens) stops working
    max_sections: int = 100
    rate_limit_per_min: int = 600
    auth_failures_per_min: int = 30        # per client address; past it, keys are not even looked up
    max_streams_per_tenant: int = 200      # open SSE streams at once
    max_streams_per_key: int = 100
    idempotency_in_progress_s: float = 60.0  # a request that died mid-way frees its key after this
    max_inline_manuscript_bytes: int = 5 * 1024 * 1024  # larger: a redirect to a presigned S3 URL
    max_body_bytes: int = 256 * 1024
    # The HTTP front (`rtqcc up`, the container gateway): Host names answered besides loopback's,
    # proxies whose X-Forwarded-For is believed (none: the peer is the client), and the Redis
    # connections of the live-tail hub.
    allowed_hosts: tuple[str, ...] = ()
    trusted_proxies: tuple[str, ...] = ()
    hub_redis_connections: int = 200

    lease_ttl_s: float = 30.0
    control_poll_s: float = 1.0
    delta_flush_ms: int = 50
    events_maxlen: int = 10_000
    sse_heartbeat_s: float = 15.0
    sse_long_poll_s: float = 25.0
    sse_retry_ms: int = 1000

    # Jobs one consumer invocation runs at once (a worker thread each, waiting on the provider);
    # `rtqcc up` sets 512 for each of its consumers (emulator/stack.py: LOCAL_MAX_IN_FLIGHT).
    max_in_flight: int = 64
    # Of those, how many do their own work at once (statements, S3, events) rather than wait on a
    # stream: the rest wait their turn asleep, so the threads carrying tokens are not queued for
    # the GIL behind a hundred runs that reached a section's end together (run/busy.py).
    consumer_busy_runs: int = 8
    # Messages one read of the queue takes at most: a consumer with free slots takes a few at a
    # time, so a burst is shared among the consumers instead of landing whole on the first awake.
    consumer_read_batch: int = 8
    # Jobs one tenant runs at once across every consumer (None: no cap). Its other jobs wait aside,
    # by priority, and take its slots as they free: a tenant's batch cannot hold everyone back.
    max_running_per_tenant: int | None = 32
    consumer_idle_exit_ms: int = 1000
    consumer_safety_margin_ms: int = 2000
    # The consumer's Lambda function, where consumers run on a schedule: the API asks for an
    # invocation when it queues a job and no consumer is reading (bus/consumer_wakeup.py).
    consumer_function: str | None = None
    consumer_max_deliveries: int = 5
    # the local stack (`rtqcc up`): how often it sweeps, and how many deaths of one embedded
    # service within a window it restarts before it stops with a message naming the service
    sweep_interval_s: float = 300.0
    service_max_restarts: int = 5
    service_restart_window_s: float = 60.0
    # cost controls (see writing/quotas.py and writing/model_policy.py); None: no limit
    allowed_models: frozenset[str] | None = None  # None: every priced model, and default_model
    quota_tokens_per_day: int | None = None        # per tenant, per UTC day
    quota_cost_usd_per_day: float | None = None
    quota_active_jobs: int | None = None           # jobs queued or running at once, per tenant
    job_default_max_tokens: int | None = None      # the budget of a job that gives none
    job_default_max_cost_usd: float | None = None
    job_max_tokens: int | None = None              # the most any job's budget may be
    job_max_cost_usd: float | None = None
    # Webhooks (delivery/, run/webhook_sender.py): networks besides public ones a target may be
    # in (none: private, loopback, link-local and the like are refused), the timeout of each
    # connect, send and read, the backoff of a failed attempt (doubling from webhook_backoff_s up
    # to webhook_backoff_max_s, jittered) and how long a delivery is retried before it fails.
    webhook_allowed_networks: tuple[str, ...] = ()
    webhook_timeout_s: float = 10.0
    webhook_backoff_s: float = 5.0
    webhook_backoff_max_s: float = 3600.0
    webhook_retry_for_s: float = 24 * 3600.0
    webhook_poll_s: float = 1.0            # how often an idle sender looks for due deliveries
    webhook_concurrency: int = 8           # deliveries one consumer sends at once
    webhook_secret_grace_s: float = 24 * 3600.0  # a rotated-out secret still signs this long
    max_webhooks_per_tenant: int = 20
    # retention (run/deletion.py: prune): days a finished job is kept; None or 0: forever.
    # A tenant's own is tenant_quotas.retention_days.
    retention_days: int | None = None
    crash_at: str | None = None  # fault tests only: see run/failpoints.py

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Settings":
        env = os.environ if env is None else env
        openai_key = env.get("OPENAI_API_KEY") or None
        provider = env.get("RTQCC_PROVIDER") or ("openai" if openai_key else "fake")
        if provider not in ("fake", "openai"):
            raise ConfigError(f"RTQCC_PROVIDER must be 'fake' or 'openai', got {provider!r}")
        if provider == "openai" and not openai_key:
            raise ConfigError("RTQCC_PROVIDER is 'openai' but OPENAI_API_KEY is not set")
        keys, key_tiers = _api_keys(env)
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
            tracing=TracingSettings.from_env(env),
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
            provider_limits=parse_limits(env.get("RTQCC_PROVIDER_LIMITS", "")),
            api_keys=keys,
            api_key_tiers=key_tiers,
            tier_max_running=_tier_caps(env),
            environment=_environment(env),
            stream_token_secret=_secret(env, "RTQCC_STREAM_TOKEN_SECRET"),
            stream_token_previous_secret=_secret(env, "RTQCC_STREAM_TOKEN_PREVIOUS_SECRET"),
            metrics_token=_secret(env, "RTQCC_METRICS_TOKEN"),
            api_key_cache_s=_float(env, "RTQCC_API_KEY_CACHE_S", 30.0),
            max_sections=_int(env, "RTQCC_MAX_SECTIONS", 100, minimum=1),
            rate_limit_per_min=_int(env, "RTQCC_RATE_LIMIT_PER_MIN", 600),
            auth_failures_per_min=_int(env, "RTQCC_AUTH_FAILURES_PER_MIN", 30),
            max_streams_per_tenant=_int(env, "RTQCC_MAX_STREAMS_PER_TENANT", 200, minimum=1),
            max_streams_per_key=_int(env, "RTQCC_MAX_STREAMS_PER_KEY", 100, minimum=1),
            idempotency_in_progress_s=_float(env, "RTQCC_IDEMPOTENCY_IN_PROGRESS_S", 60.0, minimum=1.0),
            max_inline_manuscript_bytes=_int(env, "RTQCC_MAX_INLINE_MANUSCRIPT_BYTES", 5 * 1024 * 1024,
                                             minimum=1024),
            max_body_bytes=_int(env, "RTQCC_MAX_BODY_BYTES", 256 * 1024, minimum=1024),
            allowed_hosts=_host_names(env, "RTQCC_ALLOWED_HOSTS"),
            trusted_proxies=_networks(env, "RTQCC_TRUSTED_PROXIES"),
            hub_redis_connections=_int(env, "RTQCC_HUB_REDIS_CONNECTIONS", 200, minimum=4),
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
            max_in_flight=_int(env, "RTQCC_MAX_IN_FLIGHT", 64, minimum=1),
            consumer_busy_runs=_int(env, "RTQCC_CONSUMER_BUSY_RUNS", 8, minimum=1),
            consumer_read_batch=_int(env, "RTQCC_CONSUMER_READ_BATCH", 8, minimum=1),
            max_running_per_tenant=_int(env, "RTQCC_MAX_RUNNING_PER_TENANT", 32) or None,
            consumer_idle_exit_ms=_int(env, "RTQCC_CONSUMER_IDLE_EXIT_MS", 1000),
            consumer_safety_margin_ms=_int(env, "RTQCC_CONSUMER_SAFETY_MARGIN_MS", 2000),
            consumer_function=(env.get("RTQCC_CONSUMER_FUNCTION") or "").strip() or None,
            consumer_max_deliveries=_int(env, "RTQCC_CONSUMER_MAX_DELIVERIES", 5, minimum=1),
            sweep_interval_s=_float(env, "RTQCC_SWEEP_INTERVAL_S", 300.0, minimum=1.0),
            service_max_restarts=_int(env, "RTQCC_SERVICE_MAX_RESTARTS", 5, minimum=1),
            service_restart_window_s=_float(env, "RTQCC_SERVICE_RESTART_WINDOW_S", 60.0, minimum=1.0),
            # cost controls
            allowed_models=frozenset(m.strip() for m in env.get("RTQCC_ALLOWED_MODELS", "").split(",")
                                     if m.strip()) or None,
            quota_tokens_per_day=_int(env, "RTQCC_QUOTA_TOKENS_PER_DAY", None, minimum=0),
            quota_cost_usd_per_day=_float(env, "RTQCC_QUOTA_COST_USD_PER_DAY", None, minimum=0.0),
            quota_active_jobs=_int(env, "RTQCC_QUOTA_ACTIVE_JOBS", None, minimum=0),
            job_default_max_tokens=_int(env, "RTQCC_JOB_DEFAULT_MAX_TOKENS", None, minimum=1),
            job_default_max_cost_usd=_float(env, "RTQCC_JOB_DEFAULT_MAX_COST_USD", None, minimum=0.0),
            job_max_tokens=_int(env, "RTQCC_JOB_MAX_TOKENS", None, minimum=1),
            job_max_cost_usd=_float(env, "RTQCC_JOB_MAX_COST_USD", None, minimum=0.0),
            webhook_allowed_networks=_webhook_allowed_networks(env),
            webhook_timeout_s=_float(env, "RTQCC_WEBHOOK_TIMEOUT_S", 10.0, minimum=0.05, maximum=60.0),
            webhook_backoff_s=_float(env, "RTQCC_WEBHOOK_BACKOFF_S", 5.0),
            webhook_backoff_max_s=_float(env, "RTQCC_WEBHOOK_BACKOFF_MAX_S", 3600.0),
            webhook_retry_for_s=_float(env, "RTQCC_WEBHOOK_RETRY_FOR_S", 24 * 3600.0),
            webhook_poll_s=_float(env, "RTQCC_WEBHOOK_POLL_S", 1.0, minimum=0.01),
            webhook_concurrency=_int(env, "RTQCC_WEBHOOK_CONCURRENCY", 8, minimum=1),
            webhook_secret_grace_s=_float(env, "RTQCC_WEBHOOK_SECRET_GRACE_S", 24 * 3600.0),
            max_webhooks_per_tenant=_int(env, "RTQCC_MAX_WEBHOOKS_PER_TENANT", 20, minimum=1),
            retention_days=_int(env, "RTQCC_RETENTION_DAYS", None, minimum=0),
            crash_at=env.get("RTQCC_CRASH_AT") or None,
        )

    @property
    def is_local(self) -> bool:
        return self.environment == "local"

    def check_serving(self) -> None:
        """What an API or streaming function needs before it serves anyone: called at start, so a
        deployment missing a secret fails at once, naming the variable, instead of at first use."""
        if not self.stream_token_secret:
            raise ConfigError("RTQCC_STREAM_TOKEN_SECRET must be set: a random secret of at least "
                              f"{MIN_SECRET_BYTES} bytes that signs stream tokens (`rtqcc up` makes its own)")
        if self.environment == "production":
            dev_keys = [key for key, tenant in self.api_keys.items() if tenant == "dev"]
            if dev_keys:
                raise ConfigError("RTQCC_DEV_API_KEY is for the local stack; in production create keys with "
                                  "`rtqcc keys create` or set RTQCC_API_KEYS (or set RTQCC_ENV=local)")
            weak = [tenant for key, tenant in self.api_keys.items() if looks_like_placeholder(key)]
            if weak:
                raise ConfigError(f"RTQCC_API_KEYS holds a placeholder key (tenant {weak[0]!r}); "
                                  "replace it with a random key")

    def running_cap(self, tier: str | None) -> int | None:
        """The most jobs a tenant runs at once, for a job created with a key of `tier` (None: no cap).
        A tier RTQCC_TIER_MAX_RUNNING does not name gets the tenant default."""
        if tier is not None and tier in self.tier_max_running:
            return self.tier_max_running[tier] or None
        return self.max_running_per_tenant

    @property
    def caps_running(self) -> bool:
        """Whether any job runs under a cap of its tenant's running jobs."""
        return self.max_running_per_tenant is not None or any(self.tier_max_running.values())

    @property
    def widest_running_cap(self) -> int | None:
        """The largest cap any job may run under (None: some run uncapped)."""
        caps = [self.max_running_per_tenant, *(cap or None for cap in self.tier_max_running.values())]
        return None if None in caps else max(caps)

    def with_overrides(self, **changes: object) -> "Settings":
        return replace(self, **changes)
