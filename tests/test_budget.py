"""A job's budget (budget.max_tokens / budget.max_cost_usd) is enforced while the stream runs: the
job pauses with status_reason budget_exceeded, keeps what it paid for, and continues on resume
once the stored budget allows it."""

from __future__ import annotations

import json

from conftest import job_events, section_texts

OUTLINE = [{"title": "Beginnings", "brief": "how it started"}, {"title": "Endings", "brief": "how it ends"}]
PARAMS = {"max_tokens_per_section": 200}

pytest_plugins = ["openai_fixtures"]  # the local OpenAI-compatible server and its providers


def _billed(database, external_id) -> int:
    row = database.row(
        "SELECT SUM(COALESCE(reported_prompt_tokens, counted_prompt_tokens)"
        " + COALESCE(reported_completion_tokens, counted_completion_tokens))::int AS n"
        " FROM generation_attempts a JOIN jobs j ON j.id = a.job_id WHERE j.external_id = :e", e=external_id)
    return row["n"] or 0


def _set_budget(database, external_id, budget):
    database.run("UPDATE jobs SET budget = CAST(:b AS jsonb) WHERE external_id = :e",
                 b=json.dumps(budget), e=external_id)


def test_the_job_pauses_the_moment_it_would_pass_its_token_budget_and_resumes_once_raised(
        api, run_consumer, make_openai_services, llm, database, redis_client):
    services = make_openai_services()
    reference = api.create(outline=OUTLINE, params=PARAMS)
    api.post(f"/jobs/{reference}/start")
    assert run_consumer(services=services).completed == 1
    expected = section_texts(api, reference)
    first_prompt = llm.requests[0].usage["prompt_tokens"]
    llm.reset()

    max_tokens = first_prompt + 30  # room for the first section's prompt and ~30 tokens of it
    llm.set_pace(tokens_per_s=400)  # a live stream, so stopping it is seen by the server
    external_id = api.create(outline=OUTLINE, params=PARAMS, budget={"max_tokens": max_tokens})
    api.post(f"/jobs/{external_id}/start")
    result = run_consumer(services=services)

    assert result.stopped == 1 and result.completed == 0
    job = api.get(f"/jobs/{external_id}").json_body
    assert (job["status"], job["status_reason"]) == ("paused", "budget_exceeded")
    assert abs(_billed(database, external_id) - max_tokens) <= 2  # stopped at the limit, not later
    (streamed,) = llm.requests
    assert streamed.disconnected_at is not None  # the stream was closed, not read to its end
    llm.set_pace(tokens_per_s=0)
    partial = database.row(
        "SELECT s.partial_text FROM sections s JOIN jobs j ON j.id = s.job_id WHERE j.external_id = :e AND s.idx = 0",
        e=external_id)["partial_text"]
    assert partial and expected[0].startswith(partial) and len(partial) < len(expected[0])
    attempt = database.row("SELECT a.aborted, a.finish_reason FROM generation_attempts a JOIN jobs j ON j.id = a.job_id"
                           " WHERE j.external_id = :e", e=external_id)
    assert (attempt["aborted"], attempt["finish_reason"]) == ("budget_exceeded", None)
    status = [e["data"] for e in job_events(redis_client, external_id) if e["event"] == "status"]
    assert status[-1]["status"] == "paused" and status[-1]["reason"] == "budget_exceeded"
    assert status[-1]["spent"]["total_tokens"] == _billed(database, external_id)

    # Resumed under the same budget: paused again at once, without calling the model.
    api.post(f"/jobs/{external_id}/resume")
    assert run_consumer(services=services).stopped == 1
    assert api.get(f"/jobs/{external_id}").json_body["status_reason"] == "budget_exceeded"
    assert len(llm.requests) == 1

    # With the stored budget raised, resume simply continues where it stopped.
    _set_budget(database, external_id, {"max_tokens": 100_000})
    api.post(f"/jobs/{external_id}/resume")
    assert run_consumer(services=services).completed == 1
    assert section_texts(api, external_id) == expected
    assert llm.requests[1].messages[-2] == {"role": "assistant", "content": partial}


def test_a_section_whose_prompt_alone_would_pass_the_budget_is_not_started(
        api, run_consumer, make_openai_services, llm, database):
    services = make_openai_services()
    external_id = api.create(outline=OUTLINE, params=PARAMS, budget={"max_tokens": 10})
    api.post(f"/jobs/{external_id}/start")

    assert run_consumer(services=services).stopped == 1

    job = api.get(f"/jobs/{external_id}").json_body
    assert (job["status"], job["status_reason"]) == ("paused", "budget_exceeded")
    assert llm.requests == [] and _billed(database, external_id) == 0
    assert [s["status"] for s in job["sections"]] == ["pending", "pending"]


def test_a_cost_budget_pauses_the_job_too(api, run_consumer, make_services, redis_client):
    # Any provider: the budget is watched on the deltas the orchestrator receives.
    services = make_services()
    max_cost = 0.000_05  # gpt-4o-mini: $0.15 / 1M in, $0.60 / 1M out: a few hundred tokens
    external_id = api.create(outline=OUTLINE, params={"max_tokens_per_section": 400},
                             budget={"max_cost_usd": max_cost})
    api.post(f"/jobs/{external_id}/start")

    assert run_consumer(services=services).stopped == 1

    job = api.get(f"/jobs/{external_id}").json_body
    assert (job["status"], job["status_reason"]) == ("paused", "budget_exceeded")
    paused = [e["data"] for e in job_events(redis_client, external_id) if e["event"] == "status"][-1]
    assert paused["reason"] == "budget_exceeded" and paused["budget"] == {"max_cost_usd": max_cost}
    assert max_cost * 0.9 <= paused["spent"]["cost_usd"] <= max_cost * 1.01
