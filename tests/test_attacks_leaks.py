"""Attacks that fish for internals: a job's error and its `done` event never carry the provider's
URL, credentials or upstream message, nor SQL errors; readiness says what is down, not where it
lives; metrics labels stay bounded whatever model names the database holds."""

from __future__ import annotations

import io
import json

import pytest
from conftest import METRICS_TOKEN, job_events
from test_attacks import expect_error

from rtqcc.logs import configure_logging
from rtqcc.metrics import MetricsRecorder, ModelLabels, render

pytest_plugins = ["openai_fixtures"]

OUTLINE = [{"title": "One", "brief": "the first"}]


def _with_userinfo(base_url: str) -> str:
    return base_url.replace("http://", "http://opuser:s3cr3t-pa55@")


@pytest.mark.parametrize("fault, code, upstream", [
    # Credentials in the base URL: the SDK sends them, the server refuses, the URL must not show.
    (None, "provider_refused", "401"),
    ({"kind": "insufficient_quota"}, "provider_quota_exceeded", "You exceeded your current quota"),
])
def test_a_provider_refusal_reaches_the_tenant_as_a_code_and_a_plain_message(
        api, run_consumer, make_openai_services, llm, redis_client, fault, code, upstream):
    base_url = _with_userinfo(llm.base_url) if fault is None else llm.base_url
    services = make_openai_services(OPENAI_BASE_URL=base_url)
    external_id = api.create(outline=OUTLINE)
    api.post(f"/jobs/{external_id}/start")
    if fault:
        llm.add_faults(fault)
    logs = io.StringIO()
    configure_logging(stream=logs)  # the root logger is put back after the test (conftest)
    assert run_consumer(services=services).failed == 1

    job = api.get(f"/jobs/{external_id}").json_body
    done = [e["data"] for e in job_events(redis_client, external_id) if e["event"] == "done"][-1]
    for shown in (json.dumps(job), json.dumps(done), api.get(f"/jobs/{external_id}/stream").body.decode()):
        for secret in ("s3cr3t-pa55", "opuser", "127.0.0.1", "/v1", "You exceeded your current quota", "sk-"):
            assert secret not in shown, f"{secret!r} reached the tenant: {shown[:400]}"
    assert job["status_reason"] == done["code"] == code
    assert done["error"] == job["error"]
    # The operator still learns what happened, without the password.
    assert upstream in logs.getvalue() and "s3cr3t-pa55" not in logs.getvalue()


def test_a_nul_in_the_models_outline_is_dropped_not_a_database_error(
        api, run_consumer, make_openai_services, llm, database):
    services = make_openai_services()
    external_id = api.create(section_count=2)
    api.post(f"/jobs/{external_id}/start")
    outline = {"sections": [{"title": "Zero\u0000day", "brief": "a\u0000b"}, {"title": "Two", "brief": "c"}]}
    llm.add_faults({"kind": "answer", "text": json.dumps(outline)})

    result = run_consumer(services=services)
    assert result.completed == 1 and result.failed == result.requeued == 0
    job = api.get(f"/jobs/{external_id}").json_body
    assert [s["title"] for s in job["sections"]] == ["Zeroday", "Two"]
    outline_calls = [r for r in llm.requests if r.params.get("response_format")]
    assert len(outline_calls) == 1, "the outline was paid for more than once"


def test_readiness_says_what_is_down_but_not_where_it_lives(settings, redis_client, blob_store):
    from chalice.test import Client

    from rtqcc.api import create_app
    from rtqcc.services import Services

    nowhere = "postgresql://postgres:pgpa55word@127.0.0.1:1/rtqcc"
    services = Services(settings.with_overrides(database_url=nowhere), redis=redis_client, blobs=blob_store)
    with Client(create_app(lambda: services)) as client:
        answer = client.http.get("/readyz")
    assert answer.status_code == 503
    body = answer.json_body
    assert body["checks"]["postgres"] == {"ok": False} and body["checks"]["redis"]["ok"] is True
    assert "pgpa55word" not in answer.body.decode() and "127.0.0.1" not in answer.body.decode()
    services.close()


def test_model_labels_are_bounded_whatever_the_database_holds(api, services, database, redis_client):
    api.create()  # the default model, a known one
    # A row from before the allow-list, or written by hand: free text must not become a label.
    database.run("UPDATE jobs SET model = :m", m="x" * 90 + "-attacker-chosen")
    database.run("INSERT INTO sections (job_id, idx, title, status, content_key) SELECT id, 0, 't', 'done', 'k'"
                 " FROM jobs")
    labels = ModelLabels(services.settings)
    recorder = MetricsRecorder(redis_client)
    for index in range(50):
        recorder.observe("provider_stream_seconds", 0.1, provider="fake", model=labels(f"made-up-{index}"))
    recorder.flush()
    text = render(services).decode()
    assert "attacker-chosen" not in text and "made-up-" not in text
    assert 'rtqcc_sections_completed_total{model="other"} 1.0' in text
    assert redis_client.hlen("metrics:hist:provider_stream_seconds") == 2  # one series: its bucket and sum
    answer = api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status_code == 200


def test_storage_errors_reach_the_tenant_without_the_endpoint(api, settings, redis_client, database):
    from chalice.test import Client

    from rtqcc.api import create_app
    from rtqcc.store.blobs import S3BlobStore
    from rtqcc.services import Services

    external_id = api.create(outline=OUTLINE)
    database.run("UPDATE jobs SET status = 'completed', manuscript_key = 'manuscripts/x/manuscript.md'")
    away = settings.with_overrides(s3_endpoint_url="http://s3user:s3pa55@127.0.0.1:1", s3_create_bucket=False)
    services = Services(away, redis=redis_client, db=database, blobs=S3BlobStore.from_settings(away))
    with Client(create_app(lambda: services)) as client:
        answer = client.http.get(f"/jobs/{external_id}/manuscript", headers={"Authorization": f"Bearer {api.key}"})
    error = expect_error(answer, 503, "service_unavailable")
    assert "127.0.0.1" not in error["message"] and "s3pa55" not in error["message"]
