"""GET /usage: a tenant's usage per UTC day or model, the sum of its jobs' own figures, with
parameters checked (clear 400s) and other tenants' usage never in it."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from conftest import OTHER_KEY

from rtqcc.api import models


def _today() -> str:
    return datetime.now(timezone.utc).date().isoformat()


def test_usage_sums_exactly_what_the_jobs_report(api, run_consumer, start_consumer, redis_client):
    ids = [api.create(section_count=2), api.create(section_count=3, model="gpt-4o"), api.create(section_count=1)]
    for external_id in ids:
        api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 3
    other = api.as_key(OTHER_KEY).create(section_count=2)
    api.as_key(OTHER_KEY).post(f"/jobs/{other}/start")
    assert run_consumer().completed == 1

    jobs = [api.get(f"/jobs/{external_id}").json_body for external_id in ids]
    report = api.get(f"/usage?from={_today()}&to={_today()}&group_by=day")
    assert report.status_code == 200
    body = models.UsageReport.model_validate(report.json_body).model_dump(by_alias=True)
    assert body["from"] == body["to"] == _today()
    total = body["total"]
    for field in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert total[field] == sum(job["usage"][field] for job in jobs), field
    for source in ("reported", "counted"):
        for field in ("prompt_tokens", "completion_tokens"):
            assert total[source][field] == sum(job["usage"][source][field] or 0 for job in jobs), (source, field)
    assert total["cost_usd"] == pytest.approx(sum(job["usage"]["cost_usd"] for job in jobs))
    assert total["jobs"] == 3 and total["deleted_jobs"] == 0
    assert [group["day"] for group in body["groups"]] == [_today()]
    assert body["groups"][0]["total_tokens"] == total["total_tokens"]

    by_model = api.get("/usage?group_by=model").json_body
    assert {group["model"]: group["jobs"] for group in by_model["groups"]} == {"gpt-4o": 1, "gpt-4o-mini": 2}
    gpt4o = next(group for group in by_model["groups"] if group["model"] == "gpt-4o")
    assert gpt4o["total_tokens"] == jobs[1]["usage"]["total_tokens"]
    assert sum(group["total_tokens"] for group in by_model["groups"]) == total["total_tokens"]


def test_an_empty_range_is_zeros_not_an_error(api):
    body = api.get("/usage?from=2020-01-01&to=2020-01-31").json_body
    assert body["groups"] == []
    assert body["total"]["total_tokens"] == 0 and body["total"]["cost_usd"] == 0.0 and body["total"]["jobs"] == 0


@pytest.mark.parametrize(("query", "says"), [
    ("from=yesterday", "from must be an ISO 8601 date"),
    ("to=2026-13-01", "to must be an ISO 8601 date"),
    ("from=2026-12-02&to=2026-12-01", "from (2026-12-02) is after to (2026-12-01)"),
    ("from=2024-01-01&to=2025-12-31", "ask for at most 366"),
    ("group_by=hour", "group_by must be day or model"),
])
def test_bad_parameters_are_clear_400s(api, query, says):
    refused = api.get(f"/usage?{query}")
    assert refused.status_code == 400
    assert refused.json_body["error"]["code"] == "bad_request"
    assert says in refused.json_body["error"]["message"]


def test_a_year_is_allowed_and_the_default_is_the_last_thirty_days(api):
    assert api.get("/usage?from=2024-01-01&to=2024-12-31").status_code == 200  # 366 days: a leap year
    body = api.get("/usage").json_body
    assert body["to"] == _today()
    assert body["from"] == (datetime.now(timezone.utc).date() - timedelta(days=29)).isoformat()
    assert body["group_by"] == "day"


def test_usage_needs_a_key(api):
    assert api.as_key("not-a-key").get("/usage").status_code == 401
