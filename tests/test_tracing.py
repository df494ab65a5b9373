"""Traces: one trace from the request that starts a job to the provider calls that write it,
exported over OTLP/HTTP to a real endpoint the test runs; and no cost when no endpoint is set."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from rtqcc import tracing
from rtqcc.logs import _ContextFilter

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]
# A caller that traces its own requests: the job's spans join its trace.
CALLER_TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
CALLER_TRACEPARENT = f"00-{CALLER_TRACE_ID}-00f067aa0ba902b7-01"


class Collector(BaseHTTPRequestHandler):
    """An OTLP/HTTP traces endpoint: keeps every span it is sent."""

    spans: list = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        assert self.path == "/v1/traces" and self.headers["Content-Type"] == "application/x-protobuf"
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            for scope in resource.scope_spans:
                type(self).spans.extend(scope.spans)
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def collector():
    Collector.spans = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    tracing.shut_down()
    assert tracing.configure(tracing.TracingSettings(endpoint=f"http://127.0.0.1:{server.server_port}/v1/traces"))
    try:
        yield Collector
    finally:
        tracing.shut_down()
        server.shutdown()
        server.server_close()


def _attributes(span) -> dict:
    def value(v):
        kind = v.WhichOneof("value")
        return [value(x) for x in v.array_value.values] if kind == "array_value" else getattr(v, kind)
    return {a.key: value(a.value) for a in span.attributes}


def test_a_job_is_one_trace_from_the_request_that_started_it_to_each_provider_call(api, run_consumer, collector):
    external_id = api.create(outline=OUTLINE)
    assert api.post(f"/jobs/{external_id}/start", headers={"traceparent": CALLER_TRACEPARENT}).status_code == 202
    assert run_consumer().completed == 1
    tracing.flush()

    trace = [s for s in collector.spans if s.trace_id.hex() == CALLER_TRACE_ID]
    by_name: dict[str, list] = {}
    for span in trace:
        by_name.setdefault(span.name, []).append(span)
    [request] = by_name["POST /jobs/{external_id}/start"]
    assert request.parent_span_id.hex() == "00f067aa0ba902b7"  # the caller's span
    assert _attributes(request)["http.response.status_code"] == 202
    [wait] = by_name["job.queue_wait"]
    [run] = by_name["job.run"]
    assert wait.parent_span_id == run.parent_span_id == request.span_id
    assert wait.start_time_unix_nano <= wait.end_time_unix_nano <= run.start_time_unix_nano

    sections = by_name["section.write"]
    assert sorted(_attributes(s)["rtqcc.section.index"] for s in sections) == [0, 1]
    assert all(s.parent_span_id == run.span_id for s in sections)
    model = api.get(f"/jobs/{external_id}").json_body["model"]
    calls = by_name[f"chat {model}"]  # the GenAI conventions' name: operation, then model
    assert {c.parent_span_id for c in calls} == {s.span_id for s in sections}
    for call in calls:
        attributes = _attributes(call)
        assert attributes["gen_ai.operation.name"] == "chat" and attributes["gen_ai.request.model"] == model
        assert attributes["gen_ai.provider.name"] == "fake"
        assert attributes["gen_ai.usage.input_tokens"] > 0 and attributes["gen_ai.usage.output_tokens"] > 0
        assert attributes["gen_ai.response.finish_reasons"] == ["stop"]

    # The job's billed tokens are the calls' tokens, as the spans say.
    usage = api.get(f"/jobs/{external_id}").json_body["usage"]
    assert sum(_attributes(c)["gen_ai.usage.input_tokens"] + _attributes(c)["gen_ai.usage.output_tokens"]
               for c in calls) == usage["total_tokens"]


def test_a_request_without_a_trace_starts_one(api, collector):
    assert api.get("/jobs").status_code == 200
    tracing.flush()
    [listing] = [s for s in collector.spans if s.name == "GET /jobs"]
    assert not listing.parent_span_id


def test_log_lines_written_inside_a_span_carry_its_trace_and_span_ids(collector):
    record = logging.LogRecord("rtqcc.test", logging.INFO, __file__, 1, "inside", None, None)
    with tracing.span("some work"):
        _ContextFilter().filter(record)
    tracing.flush()
    [work] = [s for s in collector.spans if s.name == "some work"]
    assert (record.trace_id, record.span_id) == (work.trace_id.hex(), work.span_id.hex())


def test_with_no_endpoint_the_tracing_sdk_and_its_exporter_are_never_imported():
    """The functions' modules loaded as Lambda loads them: no tracer provider, no exporter. (The
    OpenTelemetry API's own modules may be there: redis-py imports some where the package is
    installed, which is why the Lambda layer ships without it; see README, Traces.)"""
    code = ("import sys; sys.path.insert(0, 'functions/api'); import app; import rtqcc.run.consumer;"
            "print(sorted(m for m in sys.modules if m.startswith(('opentelemetry.sdk.trace', 'opentelemetry.exporter'))))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == "[]"
