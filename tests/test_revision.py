"""Revision, over the real API and a real consumer: the outline reviewed and replaced before any
section is written, sections regenerated (alone or in cascade, around a locked one), edited by
hand under If-Match, restored from an earlier version, and a job forked from section n without
paying again for what it shares; a section short of its target length continued; a running
summary in every prompt."""

from __future__ import annotations

import json
import threading

import httpx
from conftest import BackgroundConsumer, job_events, parse_sse, section_texts, wait_for

from rtqcc.bus.events import stream_id_tuple
from rtqcc.run.consumer import Consumer
from rtqcc.run.failpoints import POINTS, Failpoints
from rtqcc.store.manuscripts import assemble
from rtqcc.writing.prompts import SUMMARY_SYSTEM

pytest_plugins = ["openai_fixtures"]  # the local OpenAI-compatible server, which records what it is sent

FOUR = [{"title": f"Part {n}", "brief": f"What part {n} covers."} for n in range(4)]
SMALL = {"params": {"max_tokens_per_section": 40}}


def completed_job(api, run_consumer, outline=FOUR, **fields) -> str:
    external_id = api.create(outline=outline, **{**SMALL, **fields})
    assert api.post(f"/jobs/{external_id}/start").status_code == 202
    run_consumer()
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"
    return external_id


def manuscript(api, external_id: str) -> str:
    response = api.get(f"/jobs/{external_id}/manuscript")
    assert response.status_code == 200, response.body
    return response.body.decode() if isinstance(response.body, bytes) else response.body


def versions(api, external_id: str, idx: int) -> list[dict]:
    response = api.get(f"/jobs/{external_id}/sections/{idx}/versions")
    assert response.status_code == 200, response.body
    return response.json_body["versions"]


def section(api, external_id: str, idx: int):
    response = api.get(f"/jobs/{external_id}/sections/{idx}")
    assert response.status_code == 200, response.body
    return response


def billed(database, external_id: str) -> dict:
    """Calls recorded per section index (None: the outline)."""
    rows = database.rows("SELECT a.section_idx, COUNT(*)::int AS n FROM generation_attempts a JOIN jobs j"
                         " ON j.id = a.job_id WHERE j.external_id = :e GROUP BY a.section_idx", e=external_id)
    return {row["section_idx"]: row["n"] for row in rows}


# ---- outline review ---------------------------------------------------------------------------

def test_a_drafted_outline_waits_for_review_is_replaced_then_approved(api, run_consumer, redis_client):
    external_id = api.create(section_count=3, review={"outline": True}, **SMALL)
    api.post(f"/jobs/{external_id}/start")
    run_consumer()
    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "awaiting_review"
    assert len(job["sections"]) == 3 and all(s["status"] == "pending" for s in job["sections"])
    assert {"status": "awaiting_review"} in [e["data"] for e in job_events(redis_client, external_id)
                                             if e["event"] == "status"]

    replaced = api.put(f"/jobs/{external_id}/outline", {"outline": [{"title": "Opening"}, {"title": "Closing"}]})
    assert replaced.status_code == 200, replaced.body
    assert [s["title"] for s in replaced.json_body["sections"]] == ["Opening", "Closing"]
    assert api.post(f"/jobs/{external_id}/approve").status_code == 202
    run_consumer()

    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "completed"
    assert [s["title"] for s in job["sections"]] == ["Opening", "Closing"]
    assert "## Opening" in manuscript(api, external_id) and "## Closing" in manuscript(api, external_id)
    late = api.put(f"/jobs/{external_id}/outline", {"outline": [{"title": "Too late"}]})
    assert late.status_code == 409 and "awaiting review" in late.json_body["error"]["message"]


def test_a_run_that_died_after_drafting_the_outline_still_stops_for_review(api, services, database, run_consumer):
    from rtqcc.store.sections import OutlineItem

    external_id = api.create(section_count=2, review={"outline": True}, **SMALL)
    api.post(f"/jobs/{external_id}/start")
    dead = services.jobs.take_for_run(external_id, "consumer-that-died", ttl_s=5)[1]
    services.jobs.save_outline(dead, [OutlineItem("Drafted"), OutlineItem("Before the crash")])
    database.run("UPDATE jobs SET lease_expires_at = now() - interval '1 second' WHERE external_id = :e", e=external_id)
    run_consumer()
    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "awaiting_review" and job["progress"]["sections_done"] == 0
    assert billed(database, external_id) == {}  # nothing written, nothing drafted again


def test_a_given_outline_is_reviewed_at_start_without_a_consumer(api, run_consumer):
    external_id = api.create(outline=FOUR[:2], review={"outline": True}, **SMALL)
    started = api.post(f"/jobs/{external_id}/start")
    assert started.status_code == 202 and started.json_body["status"] == "awaiting_review"
    assert run_consumer().processed == 0  # nothing was queued
    assert api.post(f"/jobs/{external_id}/approve").status_code == 202
    assert api.post(f"/jobs/{external_id}/approve").status_code == 409  # once
    run_consumer()
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"


def test_an_outline_is_validated_like_a_clients(api):
    external_id = api.create(outline=FOUR[:2], review={"outline": True})
    for bad in ({"outline": []}, {"outline": [{"title": ""}]}, {"outline": [{"title": "x", "extra": 1}]}, [1]):
        answer = api.put(f"/jobs/{external_id}/outline", bad)
        assert answer.status_code == 422, (bad, answer.body)
        assert answer.json_body["error"]["message"].startswith(("Invalid outline", "The body"))


# ---- regenerate, cascade, lock ------------------------------------------------------------

def test_regenerating_with_instructions_writes_a_second_version_and_reassembles(api, run_consumer, redis_client):
    external_id = completed_job(api, run_consumer)
    before = section_texts(api, external_id)

    answer = api.post(f"/jobs/{external_id}/sections/1/regenerate", {"instructions": "More about leases."})
    assert answer.status_code == 202, answer.body
    assert answer.json_body["status"] == "queued"
    assert answer.json_body["revision"] == {"section": 1, "cascade": False, "sections": [1],
                                            "instructions": "More about leases."}
    assert section(api, external_id, 1).json_body["content"] == before[1]  # current until the new one is stored
    run_consumer()

    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "completed" and "revision" not in job
    assert [s["version"] for s in job["sections"]] == [1, 2, 1, 1]
    after = section_texts(api, external_id)
    assert after[1] != before[1] and after[0::2] == before[0::2] and after[3] == before[3]
    text = manuscript(api, external_id)
    assert after[1].strip() in text and before[1].strip() not in text

    listed = versions(api, external_id, 1)
    assert [(v["version"], v["maker"], v["current"]) for v in listed] == [(1, "model", False), (2, "model", True)]
    assert listed[1]["made_with"]["instructions"] == "More about leases."
    assert listed[1]["made_with"]["kind"] == "regeneration" and listed[1]["usage"]["total_tokens"] > 0
    old = api.get(f"/jobs/{external_id}/sections/1/versions/1")
    assert old.json_body["content"] == before[1] and old.headers["ETag"] == '"v1"'
    revision_events = [e for e in job_events(redis_client, external_id) if e["event"].startswith("section.")
                       and e["data"].get("version") == 2]
    assert {e["event"] for e in revision_events} == {"section.started", "section.delta", "section.completed"}
    assert all(e["data"]["index"] == 1 for e in revision_events)

    # The text depends on the instructions: others give another version 3.
    api.post(f"/jobs/{external_id}/sections/1/regenerate", {"instructions": "Shorter, please."})
    run_consumer()
    assert section(api, external_id, 1).json_body["content"] not in (before[1], after[1])


def test_a_watcher_that_saw_the_first_draft_end_replays_the_revision_from_its_last_event_id(api, run_consumer,
                                                                                             redis_client):
    external_id = completed_job(api, run_consumer, outline=FOUR[:2])
    first_done = job_events(redis_client, external_id)[-1]
    assert first_done["event"] == "done"
    api.post(f"/jobs/{external_id}/sections/1/regenerate", {"instructions": "Again."})
    run_consumer()

    replay = parse_sse(api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": first_done["id"]}).body.decode())
    published = [e for e in job_events(redis_client, external_id)
                 if stream_id_tuple(e["id"]) > stream_id_tuple(first_done["id"])]
    assert [(e["id"], e["event"]) for e in replay] == [(e["id"], e["event"]) for e in published]
    # queued (with the revision), running, the last done section announced again (a no-op), the rewrite, the end
    assert [e["event"] for e in replay if not e["event"] == "section.delta"] == [
        "status", "status", "section.completed", "section.started", "section.completed", "usage", "status", "done"]
    assert replay[0]["data"]["revision"]["sections"] == [1] and replay[1]["data"]["status"] == "running"
    text = "".join(e["data"]["text"] for e in replay if e["event"] == "section.delta" and e["data"]["version"] == 2)
    assert text == section(api, external_id, 1).json_body["content"]
    # Seen to the end: a reconnect is told there is nothing more.
    assert api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": replay[-1]["id"]}).status_code == 204


def test_a_cascade_rewrites_every_later_section_but_a_locked_one(api, run_consumer):
    external_id = completed_job(api, run_consumer)
    before = section_texts(api, external_id)
    locked = api.post(f"/jobs/{external_id}/sections/2/lock")
    assert locked.status_code == 200 and locked.json_body == {"index": 2, "locked": True, "version": 1}
    refused = api.post(f"/jobs/{external_id}/sections/2/regenerate", {})
    assert refused.status_code == 409 and refused.json_body["error"]["code"] == "section_locked"

    answer = api.post(f"/jobs/{external_id}/sections/1/regenerate", {"cascade": True})
    assert answer.json_body["revision"]["sections"] == [1, 3]
    run_consumer()

    job = api.get(f"/jobs/{external_id}").json_body
    assert [(s["version"], s["locked"]) for s in job["sections"]] == [(1, False), (2, False), (1, True), (2, False)]
    after = section_texts(api, external_id)
    assert after[0] == before[0] and after[2] == before[2]
    assert after[1] != before[1] and after[3] != before[3]
    assert versions(api, external_id, 3)[1]["made_with"]["kind"] == "cascade"
    assert api.post(f"/jobs/{external_id}/sections/2/unlock").json_body["locked"] is False


def test_a_regeneration_is_refused_while_the_job_runs_or_before_a_section_exists(api, run_consumer):
    external_id = api.create(outline=FOUR[:2], **SMALL)
    early = api.post(f"/jobs/{external_id}/sections/0/regenerate", {})
    assert early.status_code == 409 and "completed or paused" in early.json_body["error"]["message"]
    missing = api.post(f"/jobs/{completed_job(api, run_consumer)}/sections/9/regenerate", {})
    assert missing.status_code == 404


def test_a_paused_revision_resumes_and_a_cancelled_one_keeps_the_versions_it_had(api, run_consumer, start_consumer):
    external_id = completed_job(api, run_consumer)
    before, text_before = section_texts(api, external_id), manuscript(api, external_id)

    api.post(f"/jobs/{external_id}/sections/0/regenerate", {"cascade": True})
    slow = start_consumer(fake_tokens_per_s=40.0)
    wait_for(lambda: api.get(f"/jobs/{external_id}/sections/0").json_body.get("partial") is not None
             and api.get(f"/jobs/{external_id}").json_body["status"] == "running", what="the revision to run")
    assert api.post(f"/jobs/{external_id}/pause").status_code == 202
    slow.consumer.shut_down()
    slow.join()
    paused = api.get(f"/jobs/{external_id}").json_body
    assert paused["status"] == "paused" and paused["revision"]["sections"] == [0, 1, 2, 3]
    assert section_texts(api, external_id) == before  # nothing half-written became current

    api.post(f"/jobs/{external_id}/resume")
    slow = start_consumer(fake_tokens_per_s=40.0)
    wait_for(lambda: api.get(f"/jobs/{external_id}").json_body["status"] == "running", what="the revision to resume")
    cancelled = api.post(f"/jobs/{external_id}/cancel")
    assert cancelled.status_code == 202
    assert cancelled.json_body["status"] == "completed" and cancelled.json_body["status_reason"] == "revision_cancelled"
    slow.consumer.shut_down()
    slow.join()
    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "completed" and all(s["status"] == "done" for s in job["sections"])
    # Sections stored before the cancel are current; the rest kept their earlier version.
    now = section_texts(api, external_id)
    for idx, section_now in enumerate(job["sections"]):
        assert (now[idx] == before[idx]) == (section_now["version"] == 1)
    assert manuscript(api, external_id) == assemble(job["title"], [(s["title"], now[s["index"]]) for s in job["sections"]])
    if all(s["version"] == 1 for s in job["sections"]):
        assert manuscript(api, external_id) == text_before


class HoldAt(Failpoints):
    """Holds the run that passes `point` (instead of killing it) until `release()`."""

    def __init__(self, point: str):
        super().__init__()
        assert point in POINTS
        self.point = point
        self.reached = threading.Event()
        self._released = threading.Event()

    def hit(self, name: str) -> None:
        if name == self.point and not self.reached.is_set():
            self.reached.set()
            assert self._released.wait(30), "the held run was never released"

    def release(self) -> None:
        self._released.set()


def test_a_revision_cancelled_as_its_last_section_is_stored_keeps_the_manuscript_of_its_current_versions(
        api, run_consumer, make_services, redis_client):
    external_id = completed_job(api, run_consumer)
    text_before = manuscript(api, external_id)
    api.post(f"/jobs/{external_id}/sections/3/regenerate", {"instructions": "Shorter."})
    # The run holds its new section 3 in S3, not yet current; the cancel comes then.
    hold = HoldAt("after_s3_put")
    revising = BackgroundConsumer(Consumer(make_services(), name="consumer-1", failpoints=hold), 20.0)
    try:
        assert hold.reached.wait(15), "the revision never stored its section"
        cancelled = api.post(f"/jobs/{external_id}/cancel").json_body
        assert cancelled["status"] == "completed" and cancelled["status_reason"] == "revision_cancelled"
        assert manuscript(api, external_id) == text_before
    finally:
        hold.release()
    assert revising.join(20).completed == 0
    # The run stopped at the section the cancel put back: it made nothing current, announced no
    # version that never became current, and wrote over no manuscript.
    assert not [e for e in job_events(redis_client, external_id)
                if e["event"] == "section.completed" and e["data"]["version"] == 2]
    job = api.get(f"/jobs/{external_id}").json_body
    assert [s["version"] for s in job["sections"]] == [1, 1, 1, 1]
    now = section_texts(api, external_id)
    assert manuscript(api, external_id) == assemble(job["title"], [(s["title"], now[s["index"]]) for s in job["sections"]])
    assert manuscript(api, external_id) == text_before


# ---- edit, If-Match, restore --------------------------------------------------------------

def test_two_editors_with_the_same_etag_one_wins_and_the_other_gets_412(api, run_consumer, start_gateway):
    external_id = completed_job(api, run_consumer)
    read = section(api, external_id, 2)
    assert read.headers["ETag"] == '"v1"'
    gateway = start_gateway()
    headers = {"Authorization": f"Bearer {gateway.key}", "If-Match": read.headers["ETag"]}
    answers: list[httpx.Response] = []
    barrier = threading.Barrier(2)

    def edit(text: str) -> None:
        with httpx.Client(base_url=gateway.base_url, timeout=10) as client:
            barrier.wait()
            answers.append(client.put(f"/jobs/{external_id}/sections/2", json={"content": text}, headers=headers))

    editors = [threading.Thread(target=edit, args=(f"Editor {n} wrote this.",)) for n in range(2)]
    for editor in editors:
        editor.start()
    for editor in editors:
        editor.join()
    assert sorted(a.status_code for a in answers) == [200, 412], [a.text for a in answers]
    winner = next(a for a in answers if a.status_code == 200)
    assert winner.headers["ETag"] == '"v2"' and winner.json()["maker"] == "human"
    loser = next(a for a in answers if a.status_code == 412)
    assert "someone changed it first" in loser.json()["error"]["message"]

    current = section(api, external_id, 2).json_body["content"]
    assert current in ("Editor 0 wrote this.", "Editor 1 wrote this.")
    assert f"## Part 2\n\n{current}\n" in manuscript(api, external_id)
    unconditional = api.put(f"/jobs/{external_id}/sections/2", {"content": "No If-Match."})
    assert unconditional.status_code == 428


def test_a_later_regeneration_sees_the_human_edit(api, run_consumer, llm, make_openai_services):
    services = make_openai_services()
    external_id = api.create(outline=FOUR[:3], **SMALL)
    api.post(f"/jobs/{external_id}/start")
    run_consumer(services=services)
    etag = section(api, external_id, 1).headers["ETag"]
    edited = api.put(f"/jobs/{external_id}/sections/1", {"content": "THE HUMAN EDIT ENDS HERE"},
                     headers={"If-Match": etag})
    assert edited.status_code == 200, edited.body
    llm.reset()
    api.post(f"/jobs/{external_id}/sections/2/regenerate", {})
    run_consumer(services=services)
    prompts = [m["content"] for r in llm.requests for m in r.messages if m["role"] == "user"]
    assert len(prompts) == 1 and "THE HUMAN EDIT ENDS HERE" in prompts[0]


def test_restoring_an_old_version_brings_its_text_back_as_a_new_version(api, run_consumer):
    external_id = completed_job(api, run_consumer)
    original = section(api, external_id, 0).json_body["content"]
    api.put(f"/jobs/{external_id}/sections/0", {"content": "A rewrite by hand."}, headers={"If-Match": '"v1"'})
    assert "A rewrite by hand." in manuscript(api, external_id)

    restored = api.post(f"/jobs/{external_id}/sections/0/versions/1/restore")
    assert restored.status_code == 201, restored.body
    assert restored.json_body["version"] == 3 and restored.json_body["maker"] == "restore"
    assert restored.json_body["made_with"] == {"restored_from": 1}
    assert section(api, external_id, 0).json_body["content"] == original
    text = manuscript(api, external_id)
    assert original.strip() in text and "A rewrite by hand." not in text
    assert [v["sha256"] for v in versions(api, external_id, 0)][::2] == [restored.json_body["sha256"]] * 2
    stale = api.post(f"/jobs/{external_id}/sections/0/versions/2/restore", headers={"If-Match": '"v2"'})
    assert stale.status_code == 412
    assert api.get(f"/jobs/{external_id}/sections/0/versions/9").status_code == 404


def test_a_locked_section_cannot_be_edited_and_a_running_job_cannot_be_edited(api, run_consumer, start_consumer):
    external_id = completed_job(api, run_consumer)
    api.post(f"/jobs/{external_id}/sections/1/lock")
    locked = api.put(f"/jobs/{external_id}/sections/1", {"content": "x"}, headers={"If-Match": "*"})
    assert locked.status_code == 409 and locked.json_body["error"]["code"] == "section_locked"

    api.post(f"/jobs/{external_id}/sections/0/regenerate", {})
    busy = api.put(f"/jobs/{external_id}/sections/3", {"content": "x"}, headers={"If-Match": "*"})
    assert busy.status_code == 409 and "pause it or let it finish" in busy.json_body["error"]["message"]
    run_consumer()


# ---- fork -------------------------------------------------------------------------------------

def test_a_fork_from_section_3_shares_and_bills_nothing_for_sections_0_to_2(api, run_consumer, database):
    five = FOUR + [{"title": "Part 4"}]
    source = completed_job(api, run_consumer, outline=five)
    forked = api.post(f"/jobs/{source}/fork", {"from_section": 3, "outline": [{"title": "New ending"}]})
    assert forked.status_code == 201, forked.body
    fork = forked.json_body["externalId"]
    assert forked.headers["Location"] == f"/jobs/{fork}"
    assert forked.json_body["forked_from"] == {"job": source, "from_section": 3}
    assert [s["status"] for s in forked.json_body["sections"]] == ["done"] * 3 + ["pending"]

    api.post(f"/jobs/{fork}/start")
    run_consumer()
    job = api.get(f"/jobs/{fork}").json_body
    assert job["status"] == "completed"
    assert [s["title"] for s in job["sections"]] == ["Part 0", "Part 1", "Part 2", "New ending"]
    assert section_texts(api, fork)[:3] == section_texts(api, source)[:3]
    assert billed(database, fork) == {3: 1}  # one call, for the section it wrote
    assert [s["usage"]["total_tokens"] for s in job["sections"][:3]] == [0, 0, 0]
    shared = versions(api, fork, 0)[0]
    assert shared["maker"] == "fork" and shared["made_with"] == {"job": source, "index": 0, "version": 1}
    assert api.post(f"/jobs/{source}/fork", {"from_section": 9}).status_code == 409
    once = [api.post(f"/jobs/{source}/fork", {"from_section": 1}, headers={"Idempotency-Key": "fork-1"})
            for _ in range(2)]
    assert once[0].json_body["externalId"] == once[1].json_body["externalId"]
    assert once[1].headers["Idempotent-Replayed"] == "true"


# ---- length and coherence -----------------------------------------------------------------

def test_a_section_short_of_its_target_is_continued_and_each_call_accounted(api, run_consumer, database):
    # 30 words a call: 50 words need a second call; 200 words stop at the bound, four calls.
    external_id = completed_job(api, run_consumer, params={"max_tokens_per_section": 30}, outline=[
        {"title": "Short one", "target_words": 50}, {"title": "Long one", "target_words": 200}])
    texts = section_texts(api, external_id)
    calls = database.rows("SELECT a.section_idx, a.purpose FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
                          " WHERE j.external_id = :e ORDER BY a.id", e=external_id)
    assert [(c["section_idx"], c["purpose"]) for c in calls] == [
        (0, "draft"), (0, "continuation"), (1, "draft"), (1, "continuation"), (1, "continuation"), (1, "continuation")]
    assert [len(text.split()) for text in texts] == [60, 120]
    job = api.get(f"/jobs/{external_id}").json_body
    assert [s["usage"]["attempts"] for s in job["sections"]] == [2, 4]
    assert versions(api, external_id, 1)[0]["usage"]["completion_tokens"] == job["sections"][1]["usage"]["completion_tokens"]


def test_summary_context_puts_a_running_summary_into_each_prompt(api, run_consumer, llm, make_openai_services,
                                                                 database):
    external_id = api.create(outline=FOUR[:3], context="summary", **SMALL)
    api.post(f"/jobs/{external_id}/start")
    run_consumer(services=make_openai_services())
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "completed"

    summaries = [r for r in llm.requests if r.messages[0]["content"] == SUMMARY_SYSTEM]
    sections = [r for r in llm.requests if r.messages[0]["content"] != SUMMARY_SYSTEM]
    assert len(summaries) == 2 and len(sections) == 3  # through sections 0 and 1; the last needs none
    for summary, following in zip(summaries, sections[1:]):
        assert summary.text_sent.strip() in following.messages[-1]["content"]
    assert "said so far" not in sections[0].messages[-1]["content"]
    rows = database.rows("SELECT a.section_idx FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
                         " WHERE j.external_id = :e AND a.purpose = 'summary' ORDER BY a.section_idx", e=external_id)
    assert [row["section_idx"] for row in rows] == [0, 1]


def test_the_openapi_document_describes_the_revision_routes(api):
    paths = api.get("/openapi.json").json_body["paths"]
    for path in ("/jobs/{external_id}/outline", "/jobs/{external_id}/approve", "/jobs/{external_id}/fork",
                 "/jobs/{external_id}/sections/{index}/regenerate", "/jobs/{external_id}/sections/{index}/versions",
                 "/jobs/{external_id}/sections/{index}/versions/{version}/restore"):
        assert path in paths, path
    assert set(paths["/jobs/{external_id}/sections/{index}"]) == {"get", "put"}
    assert json.dumps(paths["/jobs/{external_id}/sections/{index}"]["put"]).count("412") == 1
