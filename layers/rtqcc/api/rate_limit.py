"""A per-tenant request limit, a fixed window counted in Redis so every stateless handler
shares it."""

from __future__ import annotations

import logging
import time

from redis import Redis
from redis.exceptions import RedisError

from ..errors import TooManyRequests

log = logging.getLogger(__name__)


class TenantRateLimiter:
    def __init__(self, redis: Redis, *, limit: int, window_s: int = 60, clock=time.time):
        self.redis = redis
        self.limit = limit
        self.window_s = window_s
        self.clock = clock

    def check(self, tenant: str) -> None:
        """Count one request; raise TooManyRequests with Retry-After once over the limit."""
        if self.limit <= 0:
            return
        now = self.clock()
        window = int(now // self.window_s)
        key = f"ratelimit:{tenant}:{window}"
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self.window_s * 2)
            count, _ = pipe.execute()
        except RedisError as exc:
            # Limiting is protection, not correctness: without Redis, serve rather than refuse.
            log.warning("rate limit not checked, Redis unavailable: %s", exc)
            return
        if count > self.limit:
            retry_after = max(1, int((window + 1) * self.window_s - now + 0.999))
            raise TooManyRequests(
                f"Too many requests for this API key: the limit is {self.limit} per {self.window_s} s. "
                f"Try again in {retry_after} s.", headers={"Retry-After": str(retry_after)})


class FailedAuthThrottle:
    """Failed authentications per client address, a fixed window in Redis: past the limit a
    client's keys are refused without being looked up, so guessing keys costs the guesser, not
    the database."""

    def __init__(self, redis: Redis, *, limit: int, window_s: int = 60, clock=time.time):
        self.redis = redis
        self.limit = limit
        self.window_s = window_s
        self.clock = clock

    def _key(self, client: str) -> tuple[str, int]:
        window = int(self.clock() // self.window_s)
        return f"authfail:{client}:{window}", window

    def check(self, client: str) -> None:
        """Refuse a client that failed too often in this window."""
        if self.limit <= 0:
            return
        key, window = self._key(client)
        try:
            failures = int(self.redis.get(key) or 0)
        except RedisError as exc:
            log.warning("failed authentication not throttled, Redis unavailable: %s", exc)
            return
        if failures >= self.limit:
            retry_after = max(1, int((window + 1) * self.window_s - self.clock() + 0.999))
            raise TooManyRequests(
                f"Too many failed authentications from this address; try again in {retry_after} s.",
                headers={"Retry-After": str(retry_after)})

    def record_failure(self, client: str) -> None:
        if self.limit <= 0:
            return
        key, _ = self._key(client)
        try:
            pipe = self.redis.pipeline(transaction=False)
            pipe.incr(key)
            pipe.expire(key, self.window_s * 2)
            pipe.execute()
        except RedisError as exc:
            log.warning("failed authentication not counted, Redis unavailable: %s", exc)
