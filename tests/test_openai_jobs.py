"""Whole jobs through the API and the consumer with RTQCC_PROVIDER=openai, the real SDK talking to
the local OpenAI-compatible server: completion, token figures against what the server reported,
cut streams, pause and resume, quota errors, and models without a price."""

from __future__ import annotations

import pytest
from conftest import job_events, section_texts, wait_for

from rtqcc.writing.pricing import DEFAULT_PRICES
from rtqcc.writing.tokens import count_tokens

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]
PARAMS = {"max_tokens_per_section": 200}

pytest_plugins = ["openai_fixtures"]  # the local OpenAI-compatible server and its providers


def _attempts(database, external_id, idx=None):
    return database.rows(
        "SELECT a.* FROM generation_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.external_id = :e"
        " AND (CAST(:i AS int) IS NULL OR a.section_idx = :i) ORDER BY a.id", e=external_id, i=idx)


def _reference(api, run_consumer, services, **fields):
    external_id = api.create(**fields)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer(services=services).completed == 1
    return section_texts(api, external_id)


def test_a_full_job_runs_on_the_openai_provider_and_bills_what_the_server_reported(
        api, run_consumer, make_openai_services, llm, database, redis_client):
    services = make_openai_services()
    assert type(services.provider).__name__ == "OpenAIProvider"
    external_id = api.create(section_count=3, params=PARAMS)  # the outline comes from the model too
    api.post(f"/jobs/{external_id}/start")

    assert run_consumer(services=services).completed == 1

    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "completed" and job["progress"] == {"sections_total": 3, "sections_done": 3}
    outline_call, *section_calls = llm.requests
    assert outline_call.params["response_format"]["type"] == "json_schema"
    assert len(section_calls) == 3 and all(r.finish_reason == "stop" for r in llm.requests)
    manuscript = api.get(f"/jobs/{external_id}/manuscript").body.decode()
    for request, section in zip(section_calls, job["sections"]):
        assert f"## {section['title']}" in manuscript and request.text_sent.strip() in manuscript

    # Every figure the server reported is stored as it was, and billed as it was.
    reported = [(r["reported_prompt_tokens"], r["reported_completion_tokens"]) for r in _attempts(database, external_id)]
    assert reported == [(r.usage["prompt_tokens"], r.usage["completion_tokens"]) for r in llm.requests]
    completed = {e["data"]["index"]: e["data"]["usage"] for e in job_events(redis_client, external_id)
                 if e["event"] == "section.completed"}
    price = DEFAULT_PRICES["gpt-4o-mini"]
    for request, section in zip(section_calls, job["sections"]):
        usage = section["usage"]
        assert (usage["prompt_tokens"], usage["completion_tokens"]) == (
            request.usage["prompt_tokens"], request.usage["completion_tokens"])
        assert usage["reported"] == {"prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
        assert usage["counted"] == usage["reported"]  # gpt-4o-mini: our offline count is exact
        assert usage["estimated"] is False and usage["attempts"] == 1
        detail = completed[section["index"]]
        assert detail["difference"] == {"prompt_tokens": 0, "completion_tokens": 0}
        assert detail["cost_usd"] == pytest.approx(price.cost(usage["prompt_tokens"], usage["completion_tokens"]))
    total = job["usage"]
    assert total["prompt_tokens"] == sum(r.usage["prompt_tokens"] for r in llm.requests)
    assert total["completion_tokens"] == sum(r.usage["completion_tokens"] for r in llm.requests)
    assert total["estimated"] is False
    last_usage = [e["data"] for e in job_events(redis_client, external_id) if e["event"] == "usage"][-1]
    assert (last_usage["prompt_tokens"], last_usage["completion_tokens"]) == (
        total["prompt_tokens"], total["completion_tokens"])
    assert last_usage["cost_usd"] == pytest.approx(price.cost(total["prompt_tokens"], total["completion_tokens"]))


def test_a_cut_section_is_continued_billed_per_call_and_marked_estimated(
        api, run_consumer, make_openai_services, llm, database):
    services = make_openai_services()
    expected = _reference(api, run_consumer, services, outline=OUTLINE, params=PARAMS)
    llm.reset()
    external_id = api.create(outline=OUTLINE, params=PARAMS)
    api.post(f"/jobs/{external_id}/start")
    llm.add_faults({"kind": "cut", "after_tokens": 6})

    assert run_consumer(services=services).completed == 1

    assert section_texts(api, external_id) == expected  # nothing repeated, nothing lost
    cut, continued, _second = llm.requests
    assert continued.messages[-2]["content"] == cut.text_sent
    rows = _attempts(database, external_id, 0)
    assert [(r["finish_reason"], r["reported_completion_tokens"]) for r in rows] == [
        (None, None), ("stop", continued.usage["completion_tokens"])]
    assert rows[0]["counted_completion_tokens"] == count_tokens(cut.text_sent, "gpt-4o-mini")
    usage = api.get(f"/jobs/{external_id}").json_body["sections"][0]["usage"]
    assert usage["attempts"] == 2 and usage["estimated"] is True
    assert usage["completion_tokens"] == rows[0]["counted_completion_tokens"] + continued.usage["completion_tokens"]


def test_a_stream_cut_more_often_than_allowed_keeps_its_text_and_is_handed_back(
        api, run_consumer, make_openai_services, llm, database):
    services = make_openai_services(RTQCC_OPENAI_MAX_CONTINUATIONS="0")
    external_id = api.create(outline=OUTLINE, params=PARAMS)
    api.post(f"/jobs/{external_id}/start")
    llm.add_faults({"kind": "cut", "after_tokens": 6})

    result = run_consumer(services=services)

    assert result.requeued == 1 and result.completed == 0
    section = database.row(
        "SELECT s.status, s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id"
        " WHERE j.external_id = :e AND s.idx = 0", e=external_id)
    assert section["status"] == "pending" and section["partial_text"] == llm.requests[0].text_sent
    assert api.get(f"/jobs/{external_id}").json_body["status"] == "queued"
    (row,) = _attempts(database, external_id)
    assert row["finish_reason"] is None and row["aborted"] is None


def test_pause_closes_the_stream_and_resume_continues_the_kept_text(
        api, run_consumer, start_consumer, make_openai_services, llm, database, redis_client):
    services = make_openai_services()
    fields = {"outline": OUTLINE, "params": {"max_tokens_per_section": 400}}
    expected = _reference(api, run_consumer, services, **fields)
    llm.reset()
    llm.set_pace(tokens_per_s=100)
    external_id = api.create(**fields)
    api.post(f"/jobs/{external_id}/start")
    consumer = start_consumer(services=services)
    wait_for(lambda: [e for e in job_events(redis_client, external_id) if e["event"] == "section.delta"],
             what="the first token event")

    assert api.post(f"/jobs/{external_id}/pause").json_body["status"] == "paused"
    assert consumer.join().stopped == 1

    (streamed,) = llm.requests
    wait_for(lambda: streamed.disconnected_at, timeout_s=2, what="the server to see the stream closed")
    partial = database.row(
        "SELECT s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id WHERE j.external_id = :e AND s.idx = 0",
        e=external_id)["partial_text"]
    assert 0 < len(partial) < len(expected[0]) and expected[0].startswith(partial)

    llm.set_pace(tokens_per_s=0)
    assert api.post(f"/jobs/{external_id}/resume").json_body["status"] == "queued"
    assert run_consumer(services=services).completed == 1
    assert section_texts(api, external_id) == expected
    assert llm.requests[1].messages[-2] == {"role": "assistant", "content": partial}
    rows = _attempts(database, external_id, 0)
    assert [(r["aborted"], r["finish_reason"]) for r in rows] == [("pause", None), (None, "stop")]
    assert sum(r["counted_completion_tokens"] for r in rows) == count_tokens(expected[0], "gpt-4o-mini")


def test_no_quota_fails_the_job_with_a_clear_reason(api, run_consumer, make_openai_services, llm, redis_client):
    services = make_openai_services()
    external_id = api.create(outline=OUTLINE, params=PARAMS)
    api.post(f"/jobs/{external_id}/start")
    llm.add_faults({"kind": "insufficient_quota"})

    assert run_consumer(services=services).failed == 1

    job = api.get(f"/jobs/{external_id}").json_body
    assert job["status"] == "failed" and job["status_reason"] == "provider_quota_exceeded"
    assert "no quota left" in job["error"]
    done = [e for e in job_events(redis_client, external_id) if e["event"] == "done"]
    assert done[-1]["data"]["status"] == "failed"
    assert len(llm.requests) == 1


def test_a_model_without_a_price_or_our_tokenizer_shows_both_counts_and_no_cost(
        api, run_consumer, make_openai_services, make_services, llm, redis_client):
    from chalice.test import Client
    from conftest import API_KEY, ApiClient

    from rtqcc.api import create_app

    services = make_openai_services()
    allowing = make_services(allowed_models=frozenset({"llama-3.1-8b-instruct"}))  # unpriced: allowed by name
    with Client(create_app(lambda: allowing)) as client:
        external_id = ApiClient(client, API_KEY).create(outline=OUTLINE[:1], params=PARAMS,
                                                        model="llama-3.1-8b-instruct")
    api.post(f"/jobs/{external_id}/start")

    assert run_consumer(services=services).completed == 1

    job = api.get(f"/jobs/{external_id}").json_body
    usage = job["sections"][0]["usage"]
    (request,) = llm.requests
    assert usage["reported"] == {"prompt_tokens": request.usage["prompt_tokens"],
                                 "completion_tokens": request.usage["completion_tokens"]}
    assert usage["completion_tokens"] == request.usage["completion_tokens"]  # billed as reported
    assert usage["estimated"] is False
    events = job_events(redis_client, external_id)
    detail = [e["data"]["usage"] for e in events if e["event"] == "section.completed"][0]
    assert detail["difference"]["completion_tokens"] == (
        request.usage["completion_tokens"] - usage["counted"]["completion_tokens"]) != 0
    assert detail["cost_usd"] is None
    total = [e["data"] for e in events if e["event"] == "usage"][-1]
    assert total["cost_usd"] is None and "llama-3.1-8b-instruct" in total["cost_note"]
