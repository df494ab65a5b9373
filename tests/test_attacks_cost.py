"""Attacks on cost controls (issue 10, item 7): a free-text model that nobody priced, a cost budget
that cannot be enforced, a tenant spending without end, a job without a budget, a budget above
the cap, and concurrent starts racing past the queued-jobs quota. Real Postgres, Redis and S3,
the fake provider, the real handlers and consumer."""

from __future__ import annotations

import threading

from conftest import API_KEY, OTHER_KEY, ApiClient, job_events

from rtqcc.settings import Settings

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]
PARAMS = {"max_tokens_per_section": 200}


def expect_error(response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.body[:500])
    body = response.json_body
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["code"] == code, body
    return body["error"]


def _job_count(database) -> int:
    return database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"]


def _billed_today(database, tenant: str) -> int:
    row = database.row(
        "SELECT SUM(COALESCE(reported_prompt_tokens, counted_prompt_tokens)"
        " + COALESCE(reported_completion_tokens, counted_completion_tokens))::int AS n"
        " FROM generation_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.tenant = :t"
        " AND a.created_at >= date_trunc('day', now() AT TIME ZONE 'UTC') AT TIME ZONE 'UTC'", t=tenant)
    return row["n"] or 0


def _status(database, external_id: str) -> tuple[str, str | None]:
    row = database.row("SELECT status, status_reason FROM jobs WHERE external_id = :e", e=external_id)
    return row["status"], row["status_reason"]


# ---- the model allow-list -----------------------------------------------------------------------

def test_a_model_outside_the_allow_list_is_refused_naming_the_allowed_ones(api, database):
    error = expect_error(api.post("/jobs", {"title": "T", "brief": "B", "model": "free-text-model"}),
                         422, "validation_failed")
    assert "free-text-model" in error["message"] and "not allowed" in error["message"]
    assert "gpt-4o-mini" in error["message"] and "gpt-4.1" in error["message"]  # the priced ones, by name
    assert _job_count(database) == 0
    # Priced models, their dated snapshots, and the default (no model) are allowed.
    api.create(model="gpt-4o")
    api.create(model="gpt-4o-mini-2024-07-18")
    api.create()


def test_a_configured_allow_list_is_exactly_those_models_and_the_default(make_api, database):
    parsed = Settings.from_env({"RTQCC_ALLOWED_MODELS": " llama3.1:8b, qwen2.5 ,,"})
    assert parsed.allowed_models == {"llama3.1:8b", "qwen2.5"}
    api, _ = make_api(allowed_models=frozenset({"llama3.1:8b"}))
    api.create(model="llama3.1:8b")
    api.create()  # the default model, gpt-4o-mini here, is always allowed
    error = expect_error(api.post("/jobs", {"title": "T", "brief": "B", "model": "gpt-4o"}), 422, "validation_failed")
    assert "'gpt-4o'" in error["message"] and "llama3.1:8b" in error["message"]
    assert _job_count(database) == 2


# ---- cost limits that cannot be enforced --------------------------------------------------------

def test_a_cost_budget_on_a_model_without_a_price_is_refused(make_api, database):
    api, _ = make_api(allowed_models=frozenset({"llama3.1:8b"}))
    body = {"title": "T", "brief": "B", "model": "llama3.1:8b", "budget": {"max_cost_usd": 0.0001}}
    error = expect_error(api.post("/jobs", body), 422, "validation_failed")
    assert "max_cost_usd cannot be enforced" in error["message"] and "llama3.1:8b" in error["message"]
    assert _job_count(database) == 0
    api.create(model="llama3.1:8b", budget={"max_tokens": 500})  # a token budget works on any model

    # A daily cost quota or a per-job cost default cannot be held to an unpriced model either.
    for overrides in ({"quota_cost_usd_per_day": 1.0}, {"job_default_max_cost_usd": 0.5}):
        strict, _ = make_api(allowed_models=frozenset({"llama3.1:8b"}), **overrides)
        error = expect_error(strict.post("/jobs", {"title": "T", "brief": "B", "model": "llama3.1:8b"}),
                             422, "validation_failed")
        assert "cannot be enforced" in error["message"]


def test_a_cost_budget_that_lost_its_price_stops_the_run_instead_of_being_ignored(api, run_consumer, database):
    # A job accepted under a price that is gone by the time it runs (the price table changed):
    # the cost limit fails closed, no provider call is made.
    external_id = api.create(outline=OUTLINE, params=PARAMS, budget={"max_cost_usd": 0.0001})
    database.run("UPDATE jobs SET model = 'unpriced-model' WHERE external_id = :e", e=external_id)
    api.post(f"/jobs/{external_id}/start")

    assert run_consumer().stopped == 1

    assert _status(database, external_id) == ("paused", "budget_exceeded")
    assert _billed_today(database, "tenant-a") == 0


# ---- per-tenant daily quota, before enqueue and live ------------------------------------------------

def test_a_tenant_over_its_daily_token_quota_is_paused_live_and_cannot_enqueue_more(
        make_api, api, run_consumer, database, redis_client):
    # What the job costs in full, measured on tenant B (the quota below counts tenant A's spend only).
    reference = api.as_key(OTHER_KEY).create(outline=OUTLINE, params=PARAMS)
    api.as_key(OTHER_KEY).post(f"/jobs/{reference}/start")
    assert run_consumer().completed == 1
    full_cost = _billed_today(database, "tenant-b")
    database.run("UPDATE generation_attempts SET created_at = created_at - interval '1 day'")  # yesterday's

    quota = full_cost - 100  # runs out 100 tokens before the end, inside the last section's stream
    limited, services = make_api(quota_tokens_per_day=quota)
    created = limited.post("/jobs", {"title": "A field guide", "brief": "Explain durable job systems.",
                                     "outline": OUTLINE, "params": PARAMS})
    assert created.status_code == 201, created.body
    assert created.json_body["quota"]["tokens_per_day"] == {"limit": quota, "used": 0}
    external_id = created.json_body["externalId"]
    assert limited.post(f"/jobs/{external_id}/start").status_code == 202

    assert run_consumer(services=services).stopped == 1

    assert _status(database, external_id) == ("paused", "quota_exceeded")
    spent = _billed_today(database, "tenant-a")
    assert 0 < spent <= quota  # stopped at the quota, mid-job, not after it
    aborted = database.rows("SELECT a.aborted FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
                            " WHERE j.external_id = :e AND a.aborted IS NOT NULL", e=external_id)
    assert [row["aborted"] for row in aborted] == ["quota_exceeded"]  # a live stream was cut
    paused = [e["data"] for e in job_events(redis_client, external_id) if e["event"] == "status"][-1]
    assert paused["reason"] == "quota_exceeded" and paused["quota"]["tokens_per_day"]["limit"] == quota

    # Nothing more is enqueued today: no new job, no resume; the answer says which quota and when.
    for response in (limited.post("/jobs", {"title": "T", "brief": "B"}),
                     limited.post(f"/jobs/{external_id}/resume")):
        error = expect_error(response, 429, "quota_exceeded")
        assert "daily token quota" in error["message"] and f"{quota:,}" in error["message"]
        assert "resets at" in error["message"]
        assert 0 < int(response.headers["Retry-After"]) <= 86_400
    assert _status(database, external_id) == ("paused", "quota_exceeded")
    # Another tenant is not affected.
    other = limited.as_key(OTHER_KEY)
    assert other.post(f"/jobs/{other.create(outline=OUTLINE[:1], params=PARAMS)}/start").status_code == 202

    # A per-tenant override (tenant_quotas) raises the quota: the job resumes and completes.
    database.run("INSERT INTO tenant_quotas (tenant, tokens_per_day) VALUES ('tenant-a', :n)", n=full_cost * 10)
    assert limited.post(f"/jobs/{external_id}/resume").status_code == 202
    assert run_consumer(services=services).completed == 2  # tenant A's job and tenant B's new one
    assert _status(database, external_id) == ("completed", None)


def test_spend_from_yesterday_does_not_count_against_today(make_api, run_consumer, database):
    limited, services = make_api(quota_tokens_per_day=100)
    database.run("INSERT INTO tenant_quotas (tenant, tokens_per_day) VALUES ('tenant-a', 1000000)")
    first = limited.create(outline=OUTLINE[:1], params=PARAMS)
    limited.post(f"/jobs/{first}/start")
    assert run_consumer(services=services).completed == 1
    database.run("DELETE FROM tenant_quotas")
    expect_error(limited.post("/jobs", {"title": "T", "brief": "B"}), 429, "quota_exceeded")

    database.run("UPDATE generation_attempts SET created_at = created_at - interval '1 day'")
    assert limited.post("/jobs", {"title": "T", "brief": "B"}).status_code == 201


# ---- a job's default budget and its cap -------------------------------------------------------------

def test_a_job_without_a_budget_gets_the_tenants_default(make_api, run_consumer, database):
    api, services = make_api(job_default_max_tokens=150)
    created = api.post("/jobs", {"title": "T", "brief": "B", "outline": OUTLINE, "params": PARAMS})
    assert created.status_code == 201 and created.json_body["budget"] == {"max_tokens": 150}
    external_id = created.json_body["externalId"]
    row = database.row("SELECT budget FROM jobs WHERE external_id = :e", e=external_id)
    assert row["budget"] == {"max_tokens": 150}
    api.post(f"/jobs/{external_id}/start")

    assert run_consumer(services=services).stopped == 1

    assert _status(database, external_id) == ("paused", "budget_exceeded")
    assert _billed_today(database, "tenant-a") <= 150

    # A job's own budget stands (there is no cap here), and a tenant's override replaces the default.
    assert api.post("/jobs", {"title": "T", "brief": "B", "budget": {"max_tokens": 99_999}}).json_body["budget"] == {
        "max_tokens": 99_999}
    database.run("INSERT INTO tenant_quotas (tenant, job_default_max_tokens) VALUES ('tenant-b', 5000)")
    assert api.as_key(OTHER_KEY).post("/jobs", {"title": "T", "brief": "B"}).json_body["budget"] == {
        "max_tokens": 5000}


def test_a_job_budget_above_the_cap_is_refused_and_a_missing_one_gets_the_cap(make_api, database):
    # Refused rather than lowered: a job quietly given less than it asked for would pause where its
    # client did not plan; the 422 names the cap so the client can ask again within it.
    api, _ = make_api(job_max_tokens=1000, job_max_cost_usd=0.01)
    error = expect_error(api.post("/jobs", {"title": "T", "brief": "B", "budget": {"max_tokens": 5000}}),
                         422, "validation_failed")
    assert "budget.max_tokens" in error["message"] and "1000" in error["message"]
    error = expect_error(api.post("/jobs", {"title": "T", "brief": "B", "budget": {"max_cost_usd": 1.0}}),
                         422, "validation_failed")
    assert "budget.max_cost_usd" in error["message"] and "0.01" in error["message"]
    assert _job_count(database) == 0

    def budget_of(body: dict) -> dict:
        created = api.post("/jobs", {"title": "T", "brief": "B", **body})
        assert created.status_code == 201, created.body
        return created.json_body["budget"]

    assert budget_of({}) == {"max_tokens": 1000, "max_cost_usd": 0.01}
    assert budget_of({"budget": {"max_tokens": 500}}) == {"max_tokens": 500, "max_cost_usd": 0.01}
    # The 40-sections-at-32,000-tokens job of the report: its budget is the cap, whatever it asks.
    big = {"section_count": 40, "params": {"max_tokens_per_section": 32_000}}
    assert budget_of(big)["max_tokens"] == 1000


# ---- jobs queued or running at once, under concurrency ---------------------------------------------

def test_the_active_jobs_quota_holds_under_concurrent_starts(make_services, database, redis_client):
    from chalice.test import Client

    from rtqcc.api import create_app

    services = make_services(quota_active_jobs=2, rate_limit_per_min=0)
    clients = [Client(create_app(lambda: services)) for _ in range(8)]
    apis = [ApiClient(client.__enter__(), API_KEY) for client in clients]
    try:
        ids = [apis[0].create(outline=OUTLINE[:1]) for _ in range(8)]
        barrier = threading.Barrier(len(ids))
        answers: dict[str, object] = {}

        def start(api, external_id):
            barrier.wait()
            answers[external_id] = api.post(f"/jobs/{external_id}/start")

        threads = [threading.Thread(target=start, args=pair) for pair in zip(apis, ids)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)

        statuses = sorted(answer.status_code for answer in answers.values())
        assert statuses == [202, 202] + [429] * 6, statuses
        for answer in answers.values():
            if answer.status_code == 429:
                error = expect_error(answer, 429, "quota_exceeded")
                assert "queued or running" in error["message"] and "(2)" in error["message"]
        queued = database.row("SELECT COUNT(*)::int AS n FROM jobs WHERE status IN ('queued', 'running')")["n"]
        assert queued == 2 and redis_client.xlen("jobs:pending") == 2

        # A repeated start of a queued job is still a no-op, not a refusal; pausing one frees a place.
        admitted = [external_id for external_id, answer in answers.items() if answer.status_code == 202]
        waiting = [external_id for external_id in ids if external_id not in admitted]
        assert apis[0].post(f"/jobs/{admitted[0]}/start").status_code == 202
        expect_error(apis[0].post(f"/jobs/{waiting[0]}/start"), 429, "quota_exceeded")
        assert apis[0].post(f"/jobs/{admitted[0]}/pause").status_code == 202
        assert apis[0].post(f"/jobs/{waiting[0]}/start").status_code == 202
        expect_error(apis[0].post(f"/jobs/{admitted[0]}/resume"), 429, "quota_exceeded")
        # Another tenant has places of its own.
        other = apis[0].as_key(OTHER_KEY)
        assert other.post(f"/jobs/{other.create()}/start").status_code == 202
    finally:
        for client in clients:
            client.__exit__(None, None, None)


def test_quotas_are_shown_with_their_use_when_a_job_is_created(make_api, api, run_consumer, database):
    job = api.create(outline=OUTLINE[:1], params=PARAMS)
    api.post(f"/jobs/{job}/start")
    run_consumer()
    limited, _ = make_api(quota_tokens_per_day=1_000_000, quota_cost_usd_per_day=5.0, quota_active_jobs=3)
    quota = limited.post("/jobs", {"title": "T", "brief": "B"}).json_body["quota"]
    assert quota["tokens_per_day"] == {"limit": 1_000_000, "used": _billed_today(database, "tenant-a")}
    assert quota["cost_usd_per_day"]["limit"] == 5.0 and quota["cost_usd_per_day"]["used"] > 0
    assert quota["active_jobs"] == {"limit": 3, "used": 0}
    assert quota["resets_at"].endswith("T00:00:00Z")
