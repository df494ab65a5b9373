"""Where a running job's calls to the provider are held back (the shared rate limits, a 429's hold,
a retry's backoff), kept in Redis so that `GET /jobs/{id}` can say why a job writes nothing and
for how long, whichever consumer runs it.

One hash a job, `job:{externalId}:provider_waits`, with a field for each call that waits (its
section's index, or `outline`). A run writes only when a wait begins or ends, so a call that is
never held back costs nothing here. An entry left by a consumer that died while it waited is
past its time: it is not shown, and the key expires."""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING

from .providers.base import OnWait, ProviderWait

if TYPE_CHECKING:
    from redis import Redis

log = logging.getLogger(__name__)

# Longer than any wait lasts (a retry's backoff is capped, and a longer retry-after fails the call).
_KEEP_S = 600
# A wait is told again with each new estimate: one just past its time may be about to be renewed.
_GRACE_S = 1.0


def provider_waits_key(external_id: str) -> str:
    return f"job:{external_id}:provider_waits"


class ProviderWaitBoard:
    def __init__(self, redis: "Redis"):
        self.redis = redis

    def reporter(self, external_id: str, idx: int | None) -> OnWait:
        """The `on_wait` of one call, for section `idx` of the job (None: its outline): records
        each wait, and clears it once the call goes out (told None). Best effort: without Redis
        the job runs on, and only its readers miss the detail."""
        key, field = provider_waits_key(external_id), "outline" if idx is None else str(idx)
        shown = False  # a call never held back writes nothing, however often it is told None

        def report(wait: ProviderWait | None) -> None:
            nonlocal shown
            if wait is None and not shown:
                return
            try:
                if wait is None:
                    shown = False
                    self.redis.hdel(key, field)
                    return
                shown = True
                entry = {"model": wait.model, "reason": wait.reason.value, "until": round(wait.until, 3)}
                with self.redis.pipeline(transaction=False) as pipe:
                    pipe.hset(key, field, json.dumps(entry))
                    pipe.expire(key, _KEEP_S)
                    pipe.execute()
            except Exception as exc:
                log.warning("could not record that a call of %s waits: %s", external_id, exc)

        return report

    def of(self, external_id: str) -> list[dict]:
        """The job's waiting calls, as the API shows them: section (None: the outline), model,
        reason, and the seconds left as estimated now."""
        now = time.time()
        waits = []
        for field, raw in self.redis.hgetall(provider_waits_key(external_id)).items():
            entry = json.loads(raw)
            if entry["until"] < now - _GRACE_S:
                continue
            waits.append({"section": None if field == "outline" else int(field), "model": entry["model"],
                          "reason": entry["reason"], "remaining_s": round(max(0.0, entry["until"] - now), 1)})
        return sorted(waits, key=lambda wait: (wait["section"] is not None, wait["section"] or 0))
