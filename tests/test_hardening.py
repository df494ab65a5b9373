"""Poison work, retries, idempotency, stored API keys, rate limits and unstorable text."""

from __future__ import annotations

import json
import threading

import pytest
from conftest import API_KEY, ApiClient

from rtqcc.store.api_keys import ApiKeyStore, hash_key
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc.bus.work_queue import DEAD_LETTERS

BODY = {"title": "T", "brief": "B", "section_count": 1}


class BrokenProvider:
    """A provider whose every call fails like a flaky network would."""

    name = "broken"

    def stream(self, request, abort, on_delta, on_wait=None):
        raise ConnectionResetError("the provider hung up")


def test_a_job_that_keeps_failing_is_dead_lettered_and_failed_with_its_reason(api, make_services, run_consumer,
                                                                              redis_client, caplog):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    # Each failed run is retried when its message is reclaimed, a lease's length later.
    broken = make_services(provider=BrokenProvider(), consumer_max_deliveries=3, lease_ttl_s=0.3,
                           consumer_idle_exit_ms=0)
    result = run_consumer(services=broken, budget_s=4)
    assert (result.requeued, result.failed) == (3, 1)

    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "failed"
    assert job["status_reason"] == "gave_up"
    assert "Gave up after 3 failed runs" in job["error"] and "connection was lost" in job["error"]
    # What the exception said is for the operator: in the log, not in the tenant's job.
    assert "the provider hung up" not in job["error"]
    assert "the provider hung up" in caplog.text
    [(_, dead)] = redis_client.xrange(DEAD_LETTERS)
    assert dead["externalId"] == external_id
    assert [j["externalId"] for j in api.get("/jobs?status=failed").json_body["jobs"]] == [external_id]

    retried = api.post(f"/jobs/{external_id}/retry")
    assert retried.status_code == 202 and retried.json_body["status"] == "queued"
    assert "error" not in retried.json_body
    assert run_consumer().completed == 1  # a working provider now
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"


def test_only_a_failed_job_can_be_retried(api):
    external_id = api.create()
    response = api.post(f"/jobs/{external_id}/retry")
    assert response.status_code == 409
    assert "only a failed job can be retried" in response.json_body["error"]["message"]


def test_the_same_idempotency_key_and_body_get_the_stored_answer(api, database):
    first = api.post("/jobs", BODY, headers={"Idempotency-Key": "k-1"})
    again = api.post("/jobs", BODY, headers={"Idempotency-Key": "k-1"})
    assert first.status_code == again.status_code == 201
    assert again.json_body == first.json_body
    assert again.headers["Idempotent-Replayed"] == "true"
    assert database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"] == 1


def test_the_same_key_with_another_body_is_422(api):
    api.post("/jobs", BODY, headers={"Idempotency-Key": "k-2"})
    other = api.post("/jobs", {**BODY, "title": "Other"}, headers={"Idempotency-Key": "k-2"})
    assert other.status_code == 422
    assert "different request" in other.json_body["error"]["message"]


def test_a_refused_request_does_not_use_up_its_key(api):
    assert api.post("/jobs", {"title": "no brief"}, headers={"Idempotency-Key": "k-3"}).status_code == 422
    assert api.post("/jobs", {"title": "no brief"}, headers={"Idempotency-Key": "k-3"}).status_code == 422


def test_concurrent_duplicates_create_one_job(services, database):
    from chalice.test import Client

    from rtqcc.api import create_app

    app = create_app(lambda: services)
    statuses, bodies = [], []

    def post():
        with Client(app) as client:
            response = ApiClient(client, API_KEY).post("/jobs", BODY, headers={"Idempotency-Key": "k-race"})
            statuses.append(response.status_code)
            bodies.append(response.json_body)

    threads = [threading.Thread(target=post) for _ in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(20)
    assert statuses == [201] * 6
    assert len({body["externalId"] for body in bodies}) == 1
    assert database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"] == 1


def test_start_with_an_idempotency_key_is_replayed(api, redis_client):
    external_id = api.create()
    first = api.post(f"/jobs/{external_id}/start", headers={"Idempotency-Key": "s-1"})
    again = api.post(f"/jobs/{external_id}/start", headers={"Idempotency-Key": "s-1"})
    assert again.json_body == first.json_body and again.headers["Idempotent-Replayed"] == "true"
    assert redis_client.xlen("jobs:pending") == 1  # the replay enqueued nothing


def test_keys_created_for_a_tenant_are_stored_hashed_and_can_be_revoked(api, services, database):
    issued = ApiKeyStore(services.db).create("tenant-c", "ci")
    stored = database.rows("SELECT key_hash, tenant FROM api_keys")
    assert stored == [{"key_hash": hash_key(issued.key), "tenant": "tenant-c"}]
    assert issued.key not in json.dumps(stored)

    tenant_c = api.as_key(issued.key)
    external_id = tenant_c.create()
    assert tenant_c.get(f"/jobs/{external_id}").status_code == 200
    assert api.get(f"/jobs/{external_id}").status_code == 404  # tenant A cannot see it

    ApiKeyStore(services.db).revoke(issued.key_hash[:12])
    services.api_keys._cache.clear()  # revocation is seen when the warm cache expires
    assert tenant_c.get(f"/jobs/{external_id}").status_code == 401


def test_a_tenant_over_its_rate_limit_gets_429_with_retry_after(make_services):
    from chalice.test import Client

    from rtqcc.api import create_app

    services = make_services(rate_limit_per_min=5)
    with Client(create_app(lambda: services)) as client:
        api = ApiClient(client, API_KEY)
        statuses = [api.get("/jobs").status_code for _ in range(7)]
        assert statuses == [200] * 5 + [429] * 2
        limited = api.get("/jobs")
        assert 1 <= int(limited.headers["Retry-After"]) <= 60
        assert limited.json_body["error"]["code"] == "rate_limited"


@pytest.mark.parametrize("field, value", [("title", "a\u0000b"), ("brief", "x\ud800y"),
                                          ("metadata", {"k\u0000": "v"})])
def test_nul_and_lone_surrogates_are_refused(api, database, field, value):
    response = api.post("/jobs", {**BODY, field: value})
    assert response.status_code == 422
    assert "NUL characters or unpaired surrogates" in response.json_body["error"]["message"]
    assert database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"] == 0


class DirtyProvider(FakeProvider):
    """Emits text with NULs and a lone surrogate, as a misbehaving server might."""

    def stream(self, request, abort, on_delta, on_wait=None):
        result = super().stream(request, abort, lambda _text: None)
        if request.json_schema is not None:
            return result
        dirty = "Bad\u0000 bytes \ud83d here. " + result.text
        on_delta(dirty)
        return type(result)(text=dirty, finish_reason="stop", reported_prompt_tokens=1, reported_completion_tokens=1)


def test_unstorable_provider_output_is_stripped_before_it_is_stored(api, make_services, run_consumer):
    external_id = api.create(section_count=1)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer(services=make_services(provider=DirtyProvider())).completed == 1
    content = api.get(f"/jobs/{external_id}/sections/0").json_body["content"]
    assert content.startswith("Bad bytes  here. ")
    assert api.get(f"/jobs/{external_id}/manuscript").status_code == 200
