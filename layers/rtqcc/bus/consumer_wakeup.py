"""Asking for a consumer invocation when a job is queued and no consumer would take it soon.

Where consumers are invocations on a schedule (Lambda: once a minute, each ending a second after
the queue runs dry), a job started while none runs would wait for the next one: up to a minute
before its first token. So a consumer about to read the queue with a slot free says so in Redis
(`listening`, a mark that lapses soon after its read would end, removed when it stops), and the
API, having queued a job, finds no such mark and asks for one invocation (`job_queued`), at most
once per KICK_INTERVAL_MS however many jobs are started meanwhile. A consumer whose slots are all
busy asks the same way for invocations of its own function, as many as would take the messages
waiting unread (`slots_full`). Where consumers are always running (`rtqcc up`, Kubernetes,
compose) no invoker is configured and nothing is asked for.

A failed request for an invocation loses nothing: the job is queued, and the next scheduled
invocation takes it."""

from __future__ import annotations

import json
import logging
import math
import time
from datetime import datetime, timezone
from typing import Callable

from redis import Redis
from redis.exceptions import RedisError

log = logging.getLogger(__name__)

# A sorted set: each consumer reading the queue, scored by when that lapses (ms since the epoch) if
# it does not say so again; it leaves when it stops reading. Lapsed entries (a consumer that died)
# are dropped by whoever counts them.
LISTENING_KEY = "consumers:listening"
# Set for an interval by a request for invocations: one for jobs queued (by the API, the sweeper),
# one for consumers with every slot busy, so that a burst's first request does not hold back the
# consumers' ask for more once they know how many jobs wait.
KICK_KEY = "consumers:kicked"
FULL_ASK_KEY = "consumers:asked"
# How long past its current read a consumer counts as listening: room for the clocks of two hosts
# and for the loop between reads. It says so again before a read that would outlast it.
LISTENING_SLACK_MS = 3_000
# One request for an invocation per interval: a kicked consumer starts within it (a cold start is
# about a second) and is then listening.
KICK_INTERVAL_MS = 5_000
# A consumer with every slot busy asks for at most this many invocations at a time; Lambda holds
# back those past the function's reserved concurrency (and drops them after a minute).
MAX_ASKED_AT_ONCE = 10


def _now_ms() -> int:
    return int(time.time() * 1000)


class InvocationFailed(Exception):
    """Lambda did not take the request for an invocation."""


class ConsumerWakeup:
    def __init__(self, redis: Redis, invoke: Callable[[], None] | None,
                 clock: Callable[[], float] = time.monotonic):
        self.redis = redis
        self.invoke = invoke  # asks for one consumer invocation; None: consumers are always running
        self.clock = clock
        self._listening_until: dict[str, float] = {}  # by consumer, on `clock`
        self._full_looked_at = float("-inf")

    @classmethod
    def for_function(cls, redis: Redis, function: str | None, region: str) -> "ConsumerWakeup":
        """Asking Lambda for invocations of `function`; with none, asking for nothing."""
        return cls(redis, lambda_invoker(function, region) if function else None)

    def listening(self, consumer: str, read_ms: int) -> None:
        """`consumer` is about to read the queue for up to `read_ms` with a slot free. Cheap before
        every read: it writes only when its mark would lapse before the read ends."""
        now = self.clock()
        if now + read_ms / 1000 < self._listening_until.get(consumer, 0.0) - LISTENING_SLACK_MS / 2000:
            return
        now_ms = _now_ms()
        pipe = self.redis.pipeline(transaction=False)
        pipe.zremrangebyscore(LISTENING_KEY, "-inf", now_ms)  # consumers that died listening
        pipe.zadd(LISTENING_KEY, {consumer: now_ms + read_ms + LISTENING_SLACK_MS})
        pipe.execute()
        self._listening_until[consumer] = now + (read_ms + LISTENING_SLACK_MS) / 1000

    def stopped_listening(self, consumer: str) -> None:
        if self._listening_until.pop(consumer, None) is not None:  # else: not marked, or unmarked already
            self.redis.zrem(LISTENING_KEY, consumer)

    def job_queued(self) -> bool:
        """After a job went on the queue: ask for a consumer invocation if none is reading it and
        none was asked for within the interval. Whether one was asked for; never raises."""
        return self._ask(KICK_KEY, lambda: 1) == 1

    def slots_full(self, consumer: str, slots: int, unread: Callable[[int], int]) -> int:
        """`consumer` has every one of its `slots` busy. If messages wait that no other consumer
        reads (`unread(limit)` counts them), ask for as many invocations as would take them (up to
        MAX_ASKED_AT_ONCE), looking at most once per interval. How many were asked for; never
        raises. So a burst of jobs brings up its consumers in seconds, where the schedule adds one
        a minute. (Its own mark is left to lapse, not removed: a consumer at its limit fills up and
        frees a slot at every run's end, and two writes a run cost more than the few seconds a job
        started meanwhile may wait for this consumer's next look.)"""
        now = self.clock()
        if self.invoke is None or now - self._full_looked_at < KICK_INTERVAL_MS / 1000:
            return 0
        self._full_looked_at = now
        return self._ask(FULL_ASK_KEY, lambda: math.ceil(unread(MAX_ASKED_AT_ONCE * slots) / slots), ignoring=consumer)

    def _ask(self, key: str, wanted: Callable[[], int], ignoring: str | None = None) -> int:
        """Ask for `wanted()` invocations, unless a consumer (other than `ignoring`) is reading the
        queue or `key` says some were asked for within the interval; how many were."""
        if self.invoke is None:
            return 0
        try:
            count = wanted()
            if count <= 0:
                return 0
            pipe = self.redis.pipeline(transaction=False)
            pipe.zremrangebyscore(LISTENING_KEY, "-inf", _now_ms())
            pipe.zcard(LISTENING_KEY)
            pipe.zscore(LISTENING_KEY, ignoring or "")
            _, listening, own = pipe.execute()
            if listening - (own is not None) or not self.redis.set(key, "1", nx=True, px=KICK_INTERVAL_MS):
                return 0
            for _ in range(count):
                self.invoke()
            why = "a job was queued with no consumer reading" if key == KICK_KEY else "jobs wait behind full consumers"
            log.info("asked for %d consumer invocation(s): %s", count, why)
        except (RedisError, OSError, InvocationFailed) as exc:
            log.warning("could not ask for a consumer invocation; the next scheduled one takes the job: %s", exc)
            return 0
        return count


def scheduled_event() -> dict:
    """The payload of an asked-for invocation: shaped as EventBridge's scheduled event, which the
    consumer's handler (a Chalice schedule) expects."""
    return {"version": "0", "id": f"rtqcc-kick-{time.time_ns()}", "detail-type": "Scheduled Event",
            "source": "rtqcc.wakeup", "account": "", "region": "", "resources": [], "detail": {},
            "time": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}


def lambda_invoker(function_name: str, region: str, **client_options) -> Callable[[], None]:
    """Asks Lambda for one asynchronous invocation of `function_name`, within a few seconds and
    without retries: it is on an API request's path. The client is built at the first request,
    so an API container that never queues a job never builds it."""
    clients: list = []

    def invoke() -> None:
        import botocore.exceptions

        if not clients:
            import boto3
            from botocore.config import Config

            config = Config(connect_timeout=2, read_timeout=3, retries={"total_max_attempts": 1})
            clients.append(boto3.client("lambda", region_name=region, config=config, **client_options))
        try:
            clients[0].invoke(FunctionName=function_name, InvocationType="Event",
                              Payload=json.dumps(scheduled_event()).encode())
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise InvocationFailed(f"Lambda did not invoke {function_name}: {exc}") from exc

    return invoke
