"""The whole life of a job through the API handlers and the consumer function."""

from __future__ import annotations

import hashlib

from rtqcc.store.blobs import manuscript_key, section_key


def test_a_job_runs_from_create_to_manuscript(api, run_consumer, blob_store):
    created = api.post("/jobs", {"title": "Durable jobs", "brief": "Why jobs must survive crashes.", "section_count": 3})
    assert created.status_code == 201
    external_id = created.json_body["externalId"]
    assert external_id.startswith("RTQCC-")
    assert created.json_body["status"] == "created"
    assert created.json_body["links"]["stream"] == f"/jobs/{external_id}/stream"

    started = api.post(f"/jobs/{external_id}/start")
    assert started.status_code == 202
    assert started.json_body["status"] == "queued"

    result = run_consumer()
    assert result.completed == 1

    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "completed"
    assert job["progress"] == {"sections_total": 3, "sections_done": 3}
    assert [s["status"] for s in job["sections"]] == ["done"] * 3
    assert all(s["usage"]["completion_tokens"] > 0 for s in job["sections"])
    # The outline step is billed too: the job total is more than the sections' sum.
    sections_total = sum(s["usage"]["total_tokens"] for s in job["sections"])
    assert job["usage"]["total_tokens"] > sections_total
    assert job["usage"]["estimated"] is False
    # The jobs list shows the same figures in one row, for a dashboard.
    listed = api.get("/jobs").json_body["jobs"]
    row = next(j for j in listed if j["externalId"] == external_id)
    assert row["progress"] == job["progress"]
    assert row["usage"] == {"total_tokens": job["usage"]["total_tokens"], "cost_usd": job["usage"]["cost_usd"]}
    assert "error" not in row and "status_reason" not in row

    manuscript = api.get(f"/jobs/{external_id}/manuscript")
    assert manuscript.status_code == 200
    assert manuscript.headers["Content-Type"].startswith("text/markdown")
    text = manuscript.body.decode()
    assert text.startswith("# Durable jobs\n")
    for section in job["sections"]:
        assert text.count(f"## {section['title']}\n") == 1
    assert blob_store.get(manuscript_key(external_id)).decode() == text


def test_section_content_is_in_s3_under_its_key_and_matches_postgres(api, run_consumer, blob_store, database):
    external_id = api.create(outline=[{"title": "One", "brief": "first"}, {"title": "Two", "brief": "second"}])
    api.post(f"/jobs/{external_id}/start")
    run_consumer()

    rows = database.rows(
        "SELECT s.idx, s.content_key, s.content_sha256 FROM sections s JOIN jobs j ON j.id = s.job_id"
        " WHERE j.external_id = :e ORDER BY s.idx", e=external_id)
    assert [row["content_key"] for row in rows] == [section_key(external_id, 0), section_key(external_id, 1)]
    for row in rows:
        body = blob_store.get(row["content_key"])
        assert hashlib.sha256(body).hexdigest() == row["content_sha256"]
        section = api.get(f"/jobs/{external_id}/sections/{row['idx']}").json_body
        assert section["content"] == body.decode()
        assert section["status"] == "done"


def test_a_given_outline_is_used_as_is(api, run_consumer):
    outline = [{"title": "Setting the scene", "brief": "context"}, {"title": "What went wrong", "brief": "failures"}]
    external_id = api.create(outline=outline)
    job = api.get(f"/jobs/{external_id}").json_body
    assert [s["title"] for s in job["sections"]] == ["Setting the scene", "What went wrong"]
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    job = api.get(f"/jobs/{external_id}").json_body
    assert [s["title"] for s in job["sections"]] == ["Setting the scene", "What went wrong"]
    assert None not in {s["usage"]["attempts"] for s in job["sections"]}
    assert job["usage"]["total_tokens"] == sum(s["usage"]["total_tokens"] for s in job["sections"])


def test_the_manuscript_is_a_409_until_the_job_completes(api):
    external_id = api.create(section_count=2)
    response = api.get(f"/jobs/{external_id}/manuscript")
    assert response.status_code == 409
    assert response.json_body["error"]["code"] == "not_ready"
    assert "created" in response.json_body["error"]["message"]


def test_a_second_start_of_a_queued_job_changes_nothing(api, run_consumer):
    external_id = api.create(section_count=1)
    first = api.post(f"/jobs/{external_id}/start")
    second = api.post(f"/jobs/{external_id}/start")
    assert (first.status_code, second.status_code) == (202, 202)
    assert second.json_body["status"] == "queued"
    result = run_consumer()
    assert result.completed == 1
    assert result.skipped == 1  # the duplicate message found nothing left to do
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"


def test_jobs_are_listed_newest_first_with_a_cursor(api):
    ids = [api.create(title=f"Job {n}") for n in range(5)]
    first = api.get("/jobs?limit=2").json_body
    assert [j["externalId"] for j in first["jobs"]] == ids[::-1][:2]
    second = api.get(f"/jobs?limit=2&cursor={first['next_cursor']}").json_body
    assert [j["externalId"] for j in second["jobs"]] == ids[::-1][2:4]
    third = api.get(f"/jobs?limit=2&cursor={second['next_cursor']}").json_body
    assert [j["externalId"] for j in third["jobs"]] == ids[:1]
    assert third["next_cursor"] is None


def test_jobs_can_be_filtered_by_status(api):
    queued = api.create()
    api.create()
    api.post(f"/jobs/{queued}/start")
    listed = api.get("/jobs?status=queued").json_body["jobs"]
    assert [j["externalId"] for j in listed] == [queued]
    assert listed[0]["progress"]["sections_done"] == 0
    assert listed[0]["usage"] == {"total_tokens": 0, "cost_usd": 0.0}
