"""The webhook sender: the consumer side's one place that sends webhooks (an API handler never
does). It claims due deliveries from the outbox, sends each (delivery/webhook_post.py), and
records the attempt: delivered, due again after a jittered exponential backoff, or failed once
the retry window (24 h by default) has closed."""

from __future__ import annotations

import logging
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

from ..delivery.targets import Resolver, TargetPolicy, resolve
from ..delivery.webhook_post import AttemptResult, post_delivery
from ..settings import Settings
from ..store.webhooks import DueDelivery, WebhookStore
from .failures import OUTAGE_ERRORS

log = logging.getLogger(__name__)

# Woken by a run's end, the sender waits this long before it looks, so that the runs ending
# meanwhile are served by the same look: a consumer ending 25 runs a second otherwise made a
# statement of each (about one in twelve of a job's), whether or not it wrote any delivery.
WAKE_GATHER_S = 0.2


class WebhookSender:
    def __init__(self, store: WebhookStore, settings: Settings, *, resolver: Resolver = resolve,
                 jitter: Callable[[], float] = random.random, clock: Callable[[], float] = time.monotonic):
        self.store = store
        self.settings = settings
        self.policy = TargetPolicy(settings.webhook_allowed_networks)
        self.resolver = resolver
        self.jitter = jitter
        self.clock = clock
        self._wake = threading.Event()

    def backoff_s(self, attempt: int) -> float:
        """After failed attempt `attempt` (1, 2, ...): doubling from the base up to the cap, each
        between half and all of it, so receivers that failed together are not retried together."""
        s = self.settings
        return min(s.webhook_backoff_max_s, s.webhook_backoff_s * 2 ** min(attempt - 1, 30)) * (0.5 + 0.5 * self.jitter())

    @property
    def _claim_hold_s(self) -> float:
        # connect, send and read may each take the timeout; past this the claim lapses and the
        # delivery is due again (a sender that died mid-attempt loses nothing).
        return self.settings.webhook_timeout_s * 3 + 5

    def wake(self) -> None:
        """Look for due deliveries now (a run just ended and may have written some)."""
        self._wake.set()

    def deliver_due(self, pool: ThreadPoolExecutor) -> int:
        """Send one batch of due deliveries at once; how many were attempted."""
        due = self.store.claim_due(self.settings.webhook_concurrency, self._claim_hold_s)
        for _ in pool.map(self._attempt, due):
            pass
        return len(due)

    def _attempt(self, delivery: DueDelivery) -> None:
        self._record(delivery, post_delivery(delivery, self.policy, self.settings.webhook_timeout_s, self.resolver))

    def _record(self, delivery: DueDelivery, result: AttemptResult) -> None:
        status = self.store.record_attempt(
            delivery.id, delivered=result.delivered, status_code=result.status_code, error=result.error,
            response=result.answer, retry_in_s=self.backoff_s(delivery.attempt),
            retry_for_s=self.settings.webhook_retry_for_s)
        if not result.delivered:
            log.info("webhook %s attempt %d failed (%s): %s", delivery.public_id, delivery.attempt, status, result.error)

    def run(self, deadline: float, finishing: threading.Event) -> int:
        """Send due deliveries until `deadline` (on `clock`), waiting `webhook_poll_s` (or a wake)
        between empty looks; once `finishing` is set, send what is due now and return. No batch
        is claimed with less than one timeout left. How many attempts were made."""
        s, attempted = self.settings, 0
        with ThreadPoolExecutor(s.webhook_concurrency, thread_name_prefix="webhook") as pool:
            while self.clock() + s.webhook_timeout_s < deadline:
                self._wake.clear()
                try:
                    sent = self.deliver_due(pool)
                except (*OUTAGE_ERRORS, OSError) as exc:  # Postgres away: again after a pause, within the budget
                    log.warning("webhook sender could not reach Postgres: %s", exc)
                    sent = 0
                attempted += sent
                if sent:
                    continue
                if finishing.is_set():
                    return attempted
                if self._wake.wait(min(s.webhook_poll_s, max(0.0, deadline - self.clock()))):
                    finishing.wait(WAKE_GATHER_S)  # cut short when the drain ends
        return attempted


class SenderThread:
    """A sender beside a consumer's drain: started with it, finished when the drain ends."""

    def __init__(self, sender: WebhookSender, deadline: float):
        self.sender = sender
        self.finishing = threading.Event()
        self.attempted = 0
        self._thread = threading.Thread(target=self._run, args=(deadline,), name="webhook-sender", daemon=True)
        self._thread.start()

    def _run(self, deadline: float) -> None:
        try:
            self.attempted = self.sender.run(deadline, self.finishing)
        except Exception:
            log.exception("the webhook sender stopped")

    def finish(self) -> int:
        """Send what is due now, then stop; the attempts made."""
        self.finishing.set()
        self.sender.wake()
        self._thread.join()
        return self.attempted
