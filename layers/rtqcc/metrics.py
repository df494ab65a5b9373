"""Prometheus metrics for stateless functions: gauges and counters derived from Postgres and
Redis at scrape time, and latency histograms that consumers accumulate in Redis hashes.

prometheus_client is imported where metrics are exposed (`render`), not where they are recorded:
its import (24 ms here, most of it its HTTP exposition's) was paid by every cold API function
at its first request, which records the request's time."""

from __future__ import annotations

import bisect
import json
import logging
import threading
import time
from typing import TYPE_CHECKING, Callable, Iterable

from redis import Redis

from .bus.work_queue import DEAD_LETTERS
from .writing.abort import AbortSignal
from .store.stats import Stats
from .writing.model_policy import allowed_models
from .writing.providers.base import GenerationRequest, GenerationResult, OnWait, Provider

if TYPE_CHECKING:
    from prometheus_client.core import HistogramMetricFamily

log = logging.getLogger(__name__)

BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
HISTOGRAMS = {
    "provider_first_token_seconds": ("Time from request to the provider's first token", ("provider", "model")),
    "provider_stream_seconds": ("Duration of one provider stream", ("provider", "model")),
    "abort_latency_seconds": ("Time from an abort signal to the provider stream stopping", ("reason",)),
    "provider_limiter_wait_seconds": ("Time a provider call waited for the shared rate limits (or a 429's hold)",
                                      ("provider", "model")),
    "provider_429_retry_after_seconds": ("The wait each 429 of the provider asked for (its count: the 429s)",
                                         ("provider", "model")),
    "queue_wait_seconds": ("From a job's creation to its first run", ("tenant",)),
    "provider_error_seconds": ("Duration of provider streams that ended in an error (its count: the errors)",
                               ("provider", "model")),
    "api_request_seconds": ("Time the API took to answer, by method and status class (2xx, 4xx, 5xx)",
                            ("method", "status")),
}
_KEY = "metrics:hist:{}"
LAG_COUNTED_UP_TO = 10_000


class MetricsRecorder:
    """Histograms kept in Redis hashes. Observations are added up in memory and written at most
    once per `flush_interval_s` (and at `flush()`), one pipeline for all: a consumer running many
    sections a second would otherwise pay a Redis round trip for each. A crash loses at most the
    last interval's observations, never generation."""

    def __init__(self, redis: Redis, *, flush_interval_s: float = 1.0, clock: Callable[[], float] = time.monotonic):
        self.redis = redis
        self._interval = flush_interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[tuple[str, str], float] = {}  # (hash, field) -> increment
        self._last_flush = clock()

    def observe(self, name: str, value_s: float, **labels: str) -> None:
        """Add one observation; never raises (metrics must not break generation)."""
        series = json.dumps(labels, sort_keys=True)
        bucket = bisect.bisect_left(BUCKETS_S, value_s)
        key = _KEY.format(name)
        with self._lock:
            for field, increment in ((f"{series}|b{bucket}", 1), (f"{series}|sum", value_s)):
                self._pending[key, field] = self._pending.get((key, field), 0) + increment
            due = self._clock() - self._last_flush >= self._interval
        if due:
            self.flush()

    def flush(self) -> None:
        """Write what was observed since the last flush; never raises (kept for the next one)."""
        with self._lock:
            pending, self._pending = self._pending, {}
            self._last_flush = self._clock()
        if not pending:
            return
        try:
            pipe = self.redis.pipeline(transaction=False)
            for (key, field), increment in pending.items():
                if field.endswith("|sum"):
                    pipe.hincrbyfloat(key, field, increment)
                else:
                    pipe.hincrby(key, field, int(increment))
            pipe.execute()
        except Exception as exc:
            log.warning("could not record %d metric increments: %s", len(pending), exc)
            with self._lock:
                for entry, increment in pending.items():
                    self._pending[entry] = self._pending.get(entry, 0) + increment

    def histograms(self) -> Iterable["HistogramMetricFamily"]:
        from prometheus_client.core import HistogramMetricFamily

        pipe = self.redis.pipeline(transaction=False)
        for name in HISTOGRAMS:
            pipe.hgetall(_KEY.format(name))
        for (name, (doc, label_names)), fields in zip(HISTOGRAMS.items(), pipe.execute()):
            family = HistogramMetricFamily(f"rtqcc_{name}", doc, labels=label_names)
            per_series: dict[str, dict[str, float]] = {}
            for field, value in fields.items():
                series, _, part = field.rpartition("|")
                per_series.setdefault(series, {})[part] = float(value)
            for series, parts in per_series.items():
                labels = json.loads(series)
                cumulative, buckets = 0.0, []
                for index, bound in enumerate(BUCKETS_S):
                    cumulative += parts.get(f"b{index}", 0.0)
                    buckets.append((repr(bound), cumulative))
                cumulative += parts.get(f"b{len(BUCKETS_S)}", 0.0)
                buckets.append(("+Inf", cumulative))
                family.add_metric([labels.get(label, "") for label in label_names], buckets,
                                  sum_value=parts.get("sum", 0.0))
            yield family


OTHER_MODEL = "other"


class ModelLabels:
    """Model names as label values: the models this deployment names (allowed or priced, and the
    default), every other as `other` (dated snapshots too, which a tenant could vary without
    end), so no one can grow the series or the Redis hashes behind them."""

    def __init__(self, settings):
        self.known = frozenset(allowed_models(settings))

    def __call__(self, model: str | None) -> str:
        return model if model in self.known else OTHER_MODEL


class MeasuredProvider:
    """Wraps a provider to time its first token, its whole stream, and how fast it stops on abort."""

    def __init__(self, inner: Provider, recorder: MetricsRecorder, clock: Callable[[], float] = time.monotonic,
                 *, model_label: Callable[[str], str] = lambda model: model):
        self.inner = inner
        self.name = inner.name
        self.recorder = recorder
        self.clock = clock
        self.model_label = model_label

    def stream(self, request: GenerationRequest, abort: AbortSignal,
               on_delta: Callable[[str], None], on_wait: OnWait | None = None) -> GenerationResult:
        started = self.clock()
        first: list[float] = []

        def tap(text: str) -> None:
            if not first:
                first.append(self.clock())
            on_delta(text)

        labels = {"provider": self.name, "model": self.model_label(request.model)}
        try:
            result = self.inner.stream(request, abort, tap, on_wait)
        except Exception:
            self.recorder.observe("provider_error_seconds", self.clock() - started, **labels)
            raise
        ended = self.clock()
        if first:
            self.recorder.observe("provider_first_token_seconds", first[0] - started, **labels)
        self.recorder.observe("provider_stream_seconds", ended - started, **labels)
        if result.aborted and abort.aborted_at is not None:
            self.recorder.observe("abort_latency_seconds", max(0.0, ended - abort.aborted_at), reason=result.aborted)
        return result


class _Collector:
    def __init__(self, services):
        self.services = services

    def collect(self):
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s = self.services
        label = ModelLabels(s.settings)
        stats = Stats(s.db)
        jobs = GaugeMetricFamily("rtqcc_jobs", "Jobs by status", labels=["status"])
        for status, count in stats.jobs_by_status().items():
            jobs.add_metric([status], count)
        yield jobs

        sections = CounterMetricFamily("rtqcc_sections_completed", "Sections stored, by model", labels=["model"])
        per_model: dict[str, int] = {}
        for model, count in stats.sections_done_by_model().items():
            per_model[label(model)] = per_model.get(label(model), 0) + count
        for model, count in per_model.items():
            sections.add_metric([model], count)
        yield sections

        tokens = CounterMetricFamily("rtqcc_tokens", "Billed tokens, by model and kind", labels=["model", "kind"])
        per_kind: dict[tuple[str, str], int] = {}
        for model, billed in stats.billed_tokens_by_model().items():
            for kind, count in zip(("prompt", "completion"), billed):
                per_kind[(label(model), kind)] = per_kind.get((label(model), kind), 0) + count
        for (model, kind), count in per_kind.items():
            tokens.add_metric([model, kind], count)
        yield tokens

        in_flight = GaugeMetricFamily("rtqcc_jobs_in_flight", "Jobs each consumer runs now", labels=["consumer"])
        for consumer, count in stats.running_by_consumer().items():
            in_flight.add_metric([consumer], count)
        yield in_flight
        queued = GaugeMetricFamily("rtqcc_jobs_queued", "Queued jobs by tenant, those waiting for its cap included",
                                   labels=["tenant"])
        for tenant, count in stats.waiting_by_tenant().items():
            queued.add_metric([tenant], count)
        yield queued

        queue = s.queue
        yield GaugeMetricFamily("rtqcc_queue_length", "Entries in jobs:pending", value=s.redis.xlen(queue.stream))
        pending = GaugeMetricFamily("rtqcc_queue_pending", "Delivered but unacknowledged entries", labels=["group"])
        if s.redis.exists(queue.stream):
            for group in s.redis.xinfo_groups(queue.stream):
                pending.add_metric([group["name"]], group["pending"])
        yield pending
        # Counted, not Redis's own `lag` of the group: Redis 7.0 keeps counting a deleted queued
        # job's entry as unread for ever, which would hold the lag alert up after enough deletions.
        lag = GaugeMetricFamily("rtqcc_queue_lag", f"Entries no consumer has read yet (counted up to"
                                f" {LAG_COUNTED_UP_TO:,})", labels=["group"])
        lag.add_metric([queue.group], queue.unread(LAG_COUNTED_UP_TO))
        yield lag
        yield GaugeMetricFamily("rtqcc_dead_letters", "Entries in jobs:dead: jobs parked after too many failed runs",
                                value=s.redis.xlen(DEAD_LETTERS))
        checkpoint = GaugeMetricFamily("rtqcc_consumer_checkpoint_age_seconds",
                                       "Seconds since any consumer last checkpointed (the end of an invocation)")
        age_s = stats.checkpoint_age_s()
        if age_s is not None:
            checkpoint.add_metric([], age_s)
        yield checkpoint
        yield from MetricsRecorder(s.redis).histograms()


def render(services) -> bytes:
    from prometheus_client import CollectorRegistry, generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(services))
    return generate_latest(registry)
