"""Requests and tokens per minute for each model of a provider, shared by every consumer through
Redis, so a fleet of consumers stays inside the limits of one API key.

Each (provider, model) has a bucket of requests and one of tokens in a Redis hash, refilled
continuously at the configured rate and holding a quarter second's worth (of requests, at least
one): providers enforce per-minute limits in short quanta (a minute's allowance spent in one burst
would be refused), and calls granted here reach the provider with the jitter of threads and
sockets, which a bucket smaller than the provider's absorbs. A call is counted before it starts as
its prompt plus its max tokens, as providers count it against their limit; one that used more (a
provider counting differently) takes the difference after.
A 429 sets a hold on the model for its `retry-after`: every consumer waits it out, not only the one
that was refused. Redis away: calls go ahead unlimited (the provider's own 429s, retried with
backoff, are the backstop), and the failure is logged.

    RTQCC_PROVIDER_LIMITS="gpt-4o-mini=500/200000,gpt-4o=60/30000,*=100/"   # model=RPM/TPM, * = any other
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Mapping

from ..errors import ConfigError
from .abort import AbortSignal
from .providers.base import OnWait, ProviderWait, WaitReason

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

ANY_MODEL = "*"
QUANTUM_S = 0.25  # the burst a bucket holds: a quarter second's worth of the per-minute rate


@dataclass(frozen=True)
class ModelLimit:
    requests_per_min: float | None
    tokens_per_min: float | None


def parse_limits(raw: str, *, variable: str = "RTQCC_PROVIDER_LIMITS") -> dict[str, ModelLimit]:
    """`model=RPM/TPM` entries separated by commas; either side may be empty (no limit)."""
    limits: dict[str, ModelLimit] = {}
    for entry in filter(None, (part.strip() for part in raw.split(","))):
        model, equals, rates = entry.partition("=")
        rpm, slash, tpm = rates.partition("/")
        try:
            parsed = ModelLimit(_rate(rpm), _rate(tpm))
        except ValueError:
            parsed = None
        if not model.strip() or not equals or not slash or parsed is None:
            raise ConfigError(f"{variable}: {entry!r} is not model=REQUESTS_PER_MIN/TOKENS_PER_MIN "
                              "(e.g. gpt-4o-mini=500/200000; leave a side empty for no limit, * for any model)")
        limits[model.strip()] = parsed
    return limits


def _rate(text: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    value = float(text)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(text)
    return value


# KEYS: bucket hash, hold key. ARGV: requests/min (0: none), tokens/min (0: none), tokens
# wanted, the bucket's quantum in seconds. Returns {0, 0} when granted (taken from the buckets),
# else {the ms to wait, why: 1 a hold, 2 requests, 3 tokens}. Time is Redis's own: every consumer's
# calls are counted on one clock, which never runs backwards between two of them (a client's clock
# read before a delayed call could).
_ACQUIRE = """
local hold = redis.call('PTTL', KEYS[2])
if hold > 0 then return {hold, 1} end
local clock = redis.call('TIME')
local now = tonumber(clock[1]) * 1000 + tonumber(clock[2]) / 1000
local rpm, tpm, want, quantum = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if rpm == 0 and tpm == 0 then return {0, 0} end
-- a quantum's worth of requests, but at least one: under 240 a minute a quantum holds less than
-- one, and a call would wait for a request the bucket can never hold
local r_cap, t_cap = math.max(1, rpm * quantum / 60), tpm * quantum / 60
local b = redis.call('HMGET', KEYS[1], 'r', 't', 'ts')
local r, t, ts = tonumber(b[1]) or r_cap, tonumber(b[2]) or t_cap, tonumber(b[3]) or now
local elapsed = math.max(0, now - ts)
r = math.min(r_cap, r + elapsed * rpm / 60000)
t = math.min(t_cap, t + elapsed * tpm / 60000)
local wait, why = 0, 0
if rpm > 0 and r < 1 then wait, why = (1 - r) * 60000 / rpm, 2 end
-- a call larger than the bucket goes once the bucket is full, and leaves it in debt
if tpm > 0 and t < math.min(want, t_cap) then
  local tokens_wait = (math.min(want, t_cap) - t) * 60000 / tpm
  if tokens_wait > wait then wait, why = tokens_wait, 3 end
end
if wait == 0 then
  if rpm > 0 then r = r - 1 end
  if tpm > 0 then t = t - want end
end
redis.call('HSET', KEYS[1], 'r', tostring(r), 't', tostring(t), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], 120000)
return {math.ceil(wait), why}
"""
_WAIT_REASONS = {1: WaitReason.RATE_LIMITED, 2: WaitReason.REQUESTS_PER_MIN, 3: WaitReason.TOKENS_PER_MIN}

# KEYS: bucket hash. ARGV: tokens to give back (negative: to take), tokens/min.
_SETTLE = """
local t = tonumber(redis.call('HGET', KEYS[1], 't'))
if t == nil then return 0 end
local t_cap = tonumber(ARGV[2]) * tonumber(ARGV[3]) / 60
redis.call('HSET', KEYS[1], 't', tostring(math.min(t_cap, t + tonumber(ARGV[1]))))
return 1
"""

# KEYS: hold key. ARGV: ms. Lengthens a hold, never shortens one.
_HOLD = """
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[1]) then redis.call('SET', KEYS[1], '1', 'PX', ARGV[1]) end
return 1
"""


class ProviderRateLimiter:
    def __init__(self, redis: "Redis", provider: str, limits: Mapping[str, ModelLimit], *,
                 observe: Callable[[str, str, float], None] | None = None):
        self.redis = redis
        self.provider = provider
        self.limits = dict(limits)
        self._observe = observe  # (histogram, model, seconds)
        self._acquire = redis.register_script(_ACQUIRE)
        self._settle = redis.register_script(_SETTLE)
        self._hold = redis.register_script(_HOLD)

    def limit_for(self, model: str) -> ModelLimit | None:
        return self.limits.get(model) or self.limits.get(ANY_MODEL)

    def _keys(self, model: str) -> tuple[str, str]:
        base = f"ratelimit:{self.provider}:{model}"
        return base, f"{base}:hold"

    def acquire(self, model: str, tokens: int, abort: AbortSignal, on_wait: OnWait | None = None) -> float:
        """Wait until the model's buckets allow a call of `tokens` (prompt + max output), then
        take them; returns early when `abort` is raised. The seconds waited, each wait told to
        `on_wait` as it begins. A model without configured limits still waits out a hold that a
        429 set."""
        limit = self.limit_for(model) or ModelLimit(None, None)
        started = time.monotonic()
        while not abort.aborted:
            try:
                wait_ms, why = self._acquire(keys=self._keys(model), args=[
                    limit.requests_per_min or 0, limit.tokens_per_min or 0, max(0, tokens), QUANTUM_S])
            except Exception as exc:
                log.warning("the rate limits of %s are unavailable, calling unlimited: %s", model, exc)
                break
            if wait_ms <= 0:
                break
            if on_wait is not None:
                on_wait(ProviderWait(model, _WAIT_REASONS[int(why)], time.time() + wait_ms / 1000))
            if abort.wait(wait_ms / 1000):
                break
        waited = time.monotonic() - started
        if self._observe is not None:
            self._observe("provider_limiter_wait_seconds", model, waited)
        return waited

    def settle(self, model: str, *, estimated: int, used: int) -> None:
        """Take what a call used beyond its estimate. What it did not use is not given back: the
        provider counted the estimate (prompt plus max tokens) against its own limit too."""
        limit = self.limit_for(model)
        if limit is None or not limit.tokens_per_min or used <= estimated:
            return
        try:
            self._settle(keys=[self._keys(model)[0]], args=[estimated - used, limit.tokens_per_min, QUANTUM_S])
        except Exception as exc:
            log.warning("could not settle the tokens of a %s call: %s", model, exc)

    def hold(self, model: str, retry_after_s: float) -> None:
        """The provider said to wait: every consumer holds its calls to this model that long."""
        if self._observe is not None:
            self._observe("provider_429_retry_after_seconds", model, retry_after_s)
        try:
            self._hold(keys=[self._keys(model)[1]], args=[max(1, int(retry_after_s * 1000))])
        except Exception as exc:
            log.warning("could not hold calls to %s: %s", model, exc)
