"""A cap on the SSE streams open at once, per tenant and per API key, shared by every gateway.

Each open stream holds a slot: a member of two sorted sets in Redis (the tenant's and the key's)
scored by when it expires. A live stream refreshes its slot; one whose gateway crashed simply
expires, so nothing leaks. Expiry is judged by the Redis server's clock, which every gateway shares."""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from redis import Redis

from ..errors import TooManyRequests

SLOT_TTL_S = 60.0
REFRESH_S = SLOT_TTL_S / 3
RETRY_AFTER_S = 5

_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[4])
for i, key in ipairs(KEYS) do
  redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
  if redis.call('ZCARD', key) >= tonumber(ARGV[i + 1]) then
    return i
  end
end
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""

_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[2])
for _, key in ipairs(KEYS) do
  redis.call('ZADD', key, now + ttl, ARGV[1])
  redis.call('PEXPIRE', key, ttl)
end
return 0
"""


@dataclass
class StreamSlot:
    slots: "StreamSlots"
    keys: tuple[str, str]
    member: str
    released: bool = False

    def refresh(self) -> None:
        if not self.released:
            self.slots._refresh(keys=list(self.keys), args=[self.member, int(SLOT_TTL_S * 1000)])

    def release(self) -> None:
        if not self.released:
            self.released = True
            pipe = self.slots.redis.pipeline(transaction=False)
            for key in self.keys:
                pipe.zrem(key, self.member)
            pipe.execute()


class StreamSlots:
    def __init__(self, redis: Redis, *, per_tenant: int, per_key: int):
        self.redis = redis
        self.per_tenant = per_tenant
        self.per_key = per_key
        self._acquire = redis.register_script(_ACQUIRE)
        self._refresh = redis.register_script(_REFRESH)

    def acquire(self, tenant: str, key_ref: str) -> StreamSlot:
        """A slot for one more stream; TooManyRequests (with Retry-After) when either cap is full."""
        keys = (f"streams:open:tenant:{tenant}", f"streams:open:key:{key_ref}")
        member = secrets.token_hex(8)
        full = self._acquire(keys=list(keys), args=[member, self.per_tenant, self.per_key, int(SLOT_TTL_S * 1000)])
        if full:
            whose, cap = ("this account", self.per_tenant) if full == 1 else ("this API key", self.per_key)
            raise TooManyRequests(
                f"Too many open streams for {whose}: the limit is {cap} at once. Close one, or try again "
                f"in {RETRY_AFTER_S} s.", headers={"Retry-After": str(RETRY_AFTER_S)})
        return StreamSlot(self, keys, member)
