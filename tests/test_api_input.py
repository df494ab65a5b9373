"""Bad input gets a clear 4xx JSON error, and nothing is written."""

from __future__ import annotations

import json

import pytest
from conftest import OTHER_KEY

VALID = {"title": "T", "brief": "B"}


def _error(response):
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json_body["error"]
    assert set(error) == {"code", "message"}
    assert "Traceback" not in error["message"]
    return error


@pytest.mark.parametrize("body, field", [
    ({"brief": "B"}, "title"),
    ({"title": "T"}, "brief"),
    ({**VALID, "title": ""}, "title"),
    ({**VALID, "section_count": 0}, "section_count"),
    ({**VALID, "section_count": "3"}, "section_count"),
    ({**VALID, "outline": []}, "outline"),
    ({**VALID, "outline": [{"brief": "no title"}]}, "outline.0.title"),
    ({**VALID, "params": {"temperature": 7}}, "params.temperature"),
    ({**VALID, "params": {"max_tokens_per_section": -1}}, "params.max_tokens_per_section"),
    ({**VALID, "budget": {"max_tokens": 0}}, "budget.max_tokens"),
    ({**VALID, "metadata": {"team": 5}}, "metadata.team"),
    ({**VALID, "status": "completed"}, "status"),
    ({**VALID, "usage": {"total_tokens": 0}}, "usage"),
    ({**VALID, "tenant": "someone-else"}, "tenant"),
])
def test_invalid_job_bodies_are_422_naming_the_field(api, database, body, field):
    response = api.post("/jobs", body)
    assert response.status_code == 422
    error = _error(response)
    assert error["code"] == "validation_failed"
    assert f"{field}:" in error["message"]
    assert database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"] == 0


def test_server_owned_fields_are_called_out_as_such(api):
    message = _error(api.post("/jobs", {**VALID, "status": "completed"}))["message"]
    assert "set by the server" in message


def test_too_many_sections_is_422(api, settings):
    response = api.post("/jobs", {**VALID, "section_count": settings.max_sections + 1})
    assert response.status_code == 422
    assert f"at most {settings.max_sections} sections" in _error(response)["message"]


def test_outline_and_section_count_must_agree(api):
    response = api.post("/jobs", {**VALID, "outline": [{"title": "a"}], "section_count": 2})
    assert response.status_code == 422
    assert "make them agree" in _error(response)["message"]


@pytest.mark.parametrize("raw, status, code", [
    ("{not json", 400, "bad_request"),
    ("", 400, "bad_request"),
    ("[1, 2]", 422, "validation_failed"),
    ('"a string"', 422, "validation_failed"),
])
def test_malformed_bodies(api, raw, status, code):
    response = api.post("/jobs", raw=raw)
    assert response.status_code == status
    assert _error(response)["code"] == code


def test_a_non_json_content_type_is_415(api):
    response = api.client.http.post("/jobs", body=json.dumps(VALID), headers={
        "Authorization": f"Bearer {api.key}", "Content-Type": "text/plain"})
    assert response.status_code == 415
    assert "application/json" in _error(response)["message"]


def test_an_oversize_body_is_413(api, settings):
    response = api.post("/jobs", {**VALID, "brief": "x" * (settings.max_body_bytes + 10)})
    assert response.status_code == 413
    assert _error(response)["code"] == "payload_too_large"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic abc"}])
def test_requests_without_a_valid_key_are_401(api, headers):
    response = api.client.http.get("/jobs", headers=headers)
    assert response.status_code == 401
    assert _error(response)["code"] == "unauthorized"
    assert response.headers.get("WWW-Authenticate") == "Bearer"


def test_another_tenants_job_is_404_on_every_route(api):
    external_id = api.create()
    other = api.as_key(OTHER_KEY)
    for path in ("", "/stream", "/manuscript", "/sections/0"):
        response = other.get(f"/jobs/{external_id}{path}")
        assert response.status_code == 404, path
        assert _error(response)["code"] == "job_not_found"
    for verb in ("start", "pause", "resume", "cancel"):
        assert other.post(f"/jobs/{external_id}/{verb}").status_code == 404
    assert other.get("/jobs").json_body["jobs"] == []
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "created"


def test_unknown_and_malformed_job_ids_are_404(api):
    assert _error(api.get("/jobs/RTQCC-01HZZZZZZZZZZZZZZZZZZZZZZZ"))["code"] == "job_not_found"
    assert "not a job id" in _error(api.get("/jobs/not-a-job"))["message"]


@pytest.mark.parametrize("query", ["limit=0", "limit=1000", "limit=abc", "status=finished", "cursor=xyz"])
def test_bad_list_parameters_are_400(api, query):
    response = api.get(f"/jobs?{query}")
    assert response.status_code == 400
    assert _error(response)["code"] == "bad_request"


def test_a_section_index_must_exist(api):
    external_id = api.create(outline=[{"title": "only"}])
    assert api.get(f"/jobs/{external_id}/sections/3").status_code == 404
    assert api.get(f"/jobs/{external_id}/sections/x").status_code == 400


def test_a_field_given_twice_is_refused(api, database):
    response = api.post("/jobs", raw='{"title": "T", "brief": "B", "title": "Other"}')
    assert response.status_code == 400
    assert "'title' twice" in response.json_body["error"]["message"]
    assert database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"] == 0
