"""OpenTelemetry traces: a span for each API request, a job's wait in the queue, each consumer
run, each section and each provider call, one trace from the request that started a job to the
calls that wrote it (the W3C trace context travels inside the queue message).

Off unless `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set, and then free: the
SDK is imported only by `configure`, and every helper here is a check of one module variable.
Spans go out over OTLP/HTTP in batches from a thread of the SDK's, never on a request's path."""

from __future__ import annotations

import logging
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Mapping

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger(__name__)

TRACEPARENT = "traceparent"  # the W3C header, and the queue message's field of the same name


@dataclass(frozen=True)
class TracingSettings:
    endpoint: str | None  # the OTLP/HTTP traces URL; None: tracing off
    service_name: str = "rtqcc"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> "TracingSettings":
        """The standard OpenTelemetry variables: a traces endpoint as given, or the base endpoint
        with the signal's path; OTEL_SERVICE_NAME."""
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or None
        base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint is None and base:
            endpoint = base.rstrip("/") + "/v1/traces"
        return cls(endpoint=endpoint, service_name=env.get("OTEL_SERVICE_NAME") or cls.service_name)


class _Tracing:
    def __init__(self, provider: "TracerProvider"):
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self.provider = provider
        self.tracer = provider.get_tracer("rtqcc")
        self.propagator = TraceContextTextMapPropagator()


_tracing: _Tracing | None = None


def configure(settings: TracingSettings) -> bool:
    """Export spans as `settings` says (once per process; later calls change nothing). True when on."""
    global _tracing
    if _tracing is not None or not settings.endpoint:
        return _tracing is not None
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError as exc:  # a trimmed install: say what to add, and run untraced
        log.error("OTEL_EXPORTER_OTLP_ENDPOINT is set but OpenTelemetry is not installed (%s): "
                  "pip install 'opentelemetry-sdk' 'opentelemetry-exporter-otlp-proto-http'", exc)
        return False
    provider = TracerProvider(resource=Resource.create({"service.name": settings.service_name}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.endpoint, timeout=5)))
    _tracing = _Tracing(provider)
    return True


def shut_down() -> None:
    """Send what is buffered and stop (a process's end; tests between configurations)."""
    global _tracing
    tracing, _tracing = _tracing, None
    if tracing is not None:
        tracing.provider.shutdown()


def flush() -> None:
    if _tracing is not None:
        _tracing.provider.force_flush()


class _NoSpan:
    def set_attribute(self, key: str, value: Any) -> None:
        pass

    def set_attributes(self, attributes: Mapping[str, Any]) -> None:
        pass


NO_SPAN = _NoSpan()


@contextmanager
def span(name: str, *, kind: str = "internal", attributes: Mapping[str, Any] | None = None,
         parent: Mapping[str, str] | None = None, start_ns: int | None = None) -> Iterator[Any]:
    """A span around the block, child of the current one, or of the `parent` carrier (a queue
    message's trace context) when given. `kind`: internal, server, client, consumer, producer.
    An exception leaving the block marks the span as an error. Off: yields a span that ignores all."""
    tracing = _tracing
    if tracing is None:
        yield NO_SPAN
        return
    from opentelemetry.trace import SpanKind

    context = tracing.propagator.extract(parent) if parent is not None else None
    with tracing.tracer.start_as_current_span(name, context=context, kind=getattr(SpanKind, kind.upper()),
                                              attributes=dict(attributes or {}), start_time=start_ns) as current:
        yield current


def record_span(name: str, *, start_ns: int, end_ns: int, parent: Mapping[str, str] | None,
                attributes: Mapping[str, Any] | None = None) -> None:
    """A span for something that already happened (a job's wait in the queue, from the time in
    its message's stream id to the run that took it)."""
    tracing = _tracing
    if tracing is None:
        return
    context = tracing.propagator.extract(parent) if parent is not None else None
    tracing.tracer.start_span(name, context=context, attributes=dict(attributes or {}),
                              start_time=start_ns).end(end_time=end_ns)


def carrier() -> dict[str, str]:
    """The current trace context as W3C fields (`traceparent`), to send with a message; empty when off."""
    tracing = _tracing
    if tracing is None:
        return {}
    fields: dict[str, str] = {}
    tracing.propagator.inject(fields)
    return fields


def current_ids() -> tuple[str, str] | None:
    """The current trace and span ids in hex, for log lines; None when off or outside a span."""
    if _tracing is None:
        return None
    from opentelemetry import trace

    context = trace.get_current_span().get_span_context()
    if not context.is_valid:
        return None
    return f"{context.trace_id:032x}", f"{context.span_id:016x}"
