"""Operations: the OpenAPI document matches the routes and the answers, /metrics parses and
follows a job, and logs are JSON lines carrying the job's externalId."""

from __future__ import annotations

import io
import json
import subprocess
import sys

import pytest
from conftest import METRICS_TOKEN, wait_for
from openapi_spec_validator import validate
from prometheus_client.parser import text_string_to_metric_families

from rtqcc.api import create_app
from rtqcc.api import models
from rtqcc.logs import configure_logging


def test_the_openapi_document_is_valid_and_covers_exactly_the_routes(api, services):
    document = api.get("/openapi.json").json_body
    validate(document)
    app = create_app(lambda: services)
    routed = {(path, method.lower()) for path, methods in app.routes.items() for method in methods}
    documented = {(path, method) for path, methods in document["paths"].items() for method in methods}
    assert documented == routed


def test_answers_match_the_documented_models(api, run_consumer):
    created = api.post("/jobs", {"title": "T", "brief": "B", "section_count": 2})
    models.JobCreated.model_validate(created.json_body)
    external_id = created.json_body["externalId"]
    models.JobDocument.model_validate(api.post(f"/jobs/{external_id}/start").json_body)
    run_consumer()
    models.JobDocument.model_validate(api.get(f"/jobs/{external_id}").json_body)
    models.JobPage.model_validate(api.get("/jobs").json_body)
    models.SectionDocument.model_validate(api.get(f"/jobs/{external_id}/sections/0").json_body)
    models.StreamToken.model_validate(api.post(f"/jobs/{external_id}/stream-token").json_body)
    models.ErrorBody.model_validate(api.post(f"/jobs/{external_id}/resume").json_body)
    models.Readiness.model_validate(api.get("/readyz").json_body)


def _scrape(api) -> dict:
    response = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert response.status_code == 200
    assert response.headers["Content-Type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(response.body.decode()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def test_metrics_follow_a_job_while_it_runs(api, start_consumer):
    external_id = api.create(section_count=2, params={"max_tokens_per_section": 80}, model="gpt-4o-mini")
    api.post(f"/jobs/{external_id}/start")
    before = _scrape(api)
    assert before[("rtqcc_jobs", (("status", "queued"),))] == 1
    assert before[("rtqcc_queue_length", ())] == 1
    assert before[("rtqcc_jobs_queued", (("tenant", "tenant-a"),))] == 1
    consumer = start_consumer(fake_tokens_per_s=200.0, name="consumer-metrics")
    running = wait_for(lambda: (s := _scrape(api)).get(("rtqcc_jobs", (("status", "running"),))) == 1 and s,
                       what="the job to show as running in /metrics")
    assert running[("rtqcc_queue_pending", (("group", "orchestrators"),))] == 1
    assert running[("rtqcc_jobs_in_flight", (("consumer", "consumer-metrics"),))] == 1
    consumer.join()

    after = _scrape(api)
    assert after[("rtqcc_jobs", (("status", "completed"),))] == 1
    assert after[("rtqcc_sections_completed_total", (("model", "gpt-4o-mini"),))] == 2
    assert after[("rtqcc_tokens_total", (("kind", "completion"), ("model", "gpt-4o-mini")))] > 0
    streams = after[("rtqcc_provider_stream_seconds_count", (("model", "gpt-4o-mini"), ("provider", "fake")))]
    assert streams == 3  # the outline and two sections
    assert after[("rtqcc_provider_first_token_seconds_count", (("model", "gpt-4o-mini"), ("provider", "fake")))] == 3
    assert after[("rtqcc_queue_wait_seconds_count", (("tenant", "tenant-a"),))] == 1  # its first run only
    assert ("rtqcc_jobs_in_flight", (("consumer", "consumer-metrics"),)) not in after


def test_the_queue_lag_counts_what_waits_unread_and_forgets_a_deleted_queued_job(api, run_consumer):
    """Redis 7.0's own lag of the group would keep counting the deleted job's entry for ever."""
    kept, deleted = api.create(section_count=1), api.create(section_count=1)
    for external_id in (kept, deleted):
        api.post(f"/jobs/{external_id}/start")
    lag = ("rtqcc_queue_lag", (("group", "orchestrators"),))
    assert _scrape(api)[lag] == 2
    assert api.delete(f"/jobs/{deleted}").json_body["status"] == "deleted"
    assert _scrape(api)[lag] == 1

    assert run_consumer().completed == 1
    assert _scrape(api)[lag] == 0


def test_recording_a_metric_leaves_the_exposition_library_unloaded(redis_client):
    # In a fresh interpreter: a cold API function records its first request's time, and only
    # /metrics needs prometheus_client (its import is a cold start's worth of tens of ms).
    redis_at = redis_client.connection_pool.connection_kwargs
    code = ("import sys; from redis import Redis; from rtqcc.metrics import MetricsRecorder; "
            f"recorder = MetricsRecorder(Redis(host={redis_at['host']!r}, port={redis_at['port']}, db={redis_at['db']})); "
            "recorder.observe('api_request_seconds', 0.01, method='GET', status='2xx'); "
            "print(sorted(m for m in sys.modules if m.startswith('prometheus_client')))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_abort_latency_is_measured_when_a_job_is_cancelled(api, start_consumer, redis_client):
    external_id = api.create(outline=[{"title": "Long"}], params={"max_tokens_per_section": 2000})
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(fake_tokens_per_s=100.0)
    wait_for(lambda: any(e[1]["type"] == "section.delta" for e in redis_client.xrange(f"job:{external_id}:events")),
             what="the section to stream")
    api.post(f"/jobs/{external_id}/cancel")
    consumer.join()
    samples = _scrape(api)
    # One cancel, one measurement (how long it takes is bench/abort_latency.py's to say).
    assert samples[("rtqcc_abort_latency_seconds_count", (("reason", "cancel"),))] == 1
    assert samples[("rtqcc_abort_latency_seconds_bucket", (("le", "+Inf"), ("reason", "cancel")))] == 1


@pytest.fixture
def json_logs():
    stream = io.StringIO()
    configure_logging(stream=stream)  # the root logger is put back after the test (conftest)
    return stream


def test_logs_are_json_lines_with_the_external_id(api, run_consumer, json_logs):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    records = [json.loads(line) for line in json_logs.getvalue().splitlines()]
    completed = [r for r in records if r["message"] == "job completed"]
    assert completed and completed[0]["externalId"] == external_id
    assert completed[0]["consumer"] == "consumer-1" and completed[0]["level"] == "INFO"
