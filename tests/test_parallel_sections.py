"""Sections written at once (`params.parallel_sections`): several streams of one job in flight,
each stored exactly once, the manuscript in outline order; pause keeps every partial text and
resume continues each; a crash mid-way is finished by the next consumer. Real Postgres, Redis
and S3, the fake provider, the real consumer."""

from __future__ import annotations


from conftest import job_events, wait_for
from fault_oracle import check_job

from rtqcc.writing.providers.fake import FakeProvider

OUTLINE = [{"title": f"Part {n}", "brief": f"what part {n} covers"} for n in range(6)]


def _section_rows(database, external_id):
    return database.rows("SELECT s.idx, s.status, s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id"
                         " WHERE j.external_id = :e ORDER BY s.idx", e=external_id)


def _most_streaming_at_once(events) -> int:
    streaming, most = set(), 0
    for event in events:
        if event["event"] == "section.started":
            streaming.add(event["data"]["index"])
        elif event["event"] == "section.completed":
            streaming.discard(event["data"]["index"])
        most = max(most, len(streaming))
    return most


def test_a_job_writes_its_sections_several_at_once_each_exactly_once(
        api, run_consumer, make_services, database, redis_client, blob_store):
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 60, "parallel_sections": 3})
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer(services=make_services(fake_tokens_per_s=300.0)).completed == 1

    events = job_events(redis_client, external_id)
    assert _most_streaming_at_once(events) == 3
    completed = [e["data"]["index"] for e in events if e["event"] == "section.completed"]
    assert sorted(completed) == list(range(6))
    manuscript = api.get(f"/jobs/{external_id}/manuscript").body.decode()
    assert [line for line in manuscript.splitlines() if line.startswith("## ")] == [f"## Part {n}" for n in range(6)]
    verdict = check_job(external_id, db=database, blobs=blob_store, redis=redis_client, provider=FakeProvider())
    assert verdict.ok, verdict
    # Each prompt names the sections around it instead of quoting the one before.
    job = api.get(f"/jobs/{external_id}").json_body
    assert job["progress"] == {"sections_total": 6, "sections_done": 6}


def test_pause_stops_every_section_in_flight_keeping_each_partial_text_and_resume_continues_each(
        api, start_consumer, run_consumer, make_services, database, redis_client, blob_store):
    external_id = api.create(outline=OUTLINE[:3], params={"max_tokens_per_section": 120, "parallel_sections": 3})
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(fake_tokens_per_s=40.0)
    wait_for(lambda: sum(1 for e in job_events(redis_client, external_id) if e["event"] == "section.delta") >= 6,
             timeout_s=20, what="every section to be streaming")
    assert api.post(f"/jobs/{external_id}/pause").status_code == 202
    assert consumer.join().stopped == 1

    rows = _section_rows(database, external_id)
    assert [row["status"] for row in rows] == ["pending"] * 3
    assert all(row["partial_text"] for row in rows), "a section in flight lost its partial text"

    assert api.post(f"/jobs/{external_id}/resume").status_code == 202
    assert run_consumer(services=make_services(fake_tokens_per_s=0.0)).completed == 1
    verdict = check_job(external_id, db=database, blobs=blob_store, redis=redis_client, provider=FakeProvider())
    assert verdict.ok, verdict  # each continued from its partial text: the text of one uninterrupted run
