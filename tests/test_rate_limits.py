"""A provider's rate limits, shared by every consumer through Redis: consumers running many jobs
at once stay under the requests per minute that the local OpenAI-compatible server enforces, a
429 with `retry-after` holds every consumer's calls to that model, not only the refused one's, and
a job whose calls are held back says why in its document."""

from __future__ import annotations

import pytest
from conftest import wait_for

from rtqcc.errors import ConfigError
from rtqcc.writing.rate_limits import ModelLimit, parse_limits

pytest_plugins = ["openai_fixtures"]

OUTLINE = [{"title": "One"}, {"title": "Two"}]
PARAMS = {"max_tokens_per_section": 20}


def _start_jobs(api, count: int) -> list[str]:
    ids = [api.create(outline=OUTLINE, params=PARAMS) for _ in range(count)]
    for external_id in ids:
        assert api.post(f"/jobs/{external_id}/start").status_code == 202
    return ids


def _completed(database, ids) -> bool:
    rows = database.rows("SELECT status FROM jobs WHERE external_id = ANY(CAST(:e AS text[]))", e=list(ids))
    return {row["status"] for row in rows} == {"completed"}


def _drain_with_two_consumers(start_consumer, make_openai_services, database, ids, **env):
    consumers = [start_consumer(name=f"limited-{n}", budget_s=60, services=make_openai_services(**env))
                 for n in range(2)]
    try:
        wait_for(lambda: _completed(database, ids), timeout_s=45, interval_s=0.05, what="every job to complete")
    finally:
        for consumer in consumers:
            consumer.consumer.shut_down()
    return [consumer.join() for consumer in consumers]


@pytest.mark.parametrize("shared_limit", [True, False])
def test_consumers_running_many_jobs_stay_under_the_servers_requests_per_minute(
        shared_limit, api, llm, make_openai_services, start_consumer, database):
    llm.limits = type(llm.limits)(requests_per_min=600, tokens_per_min=None)  # 10 a second, 10 at once
    ids = _start_jobs(api, 12)  # 24 calls, more than the server takes at once
    # A little under the server's own limit, as an operator sets it: calls leave the consumers as
    # granted, but reach the server with the jitter of threads and sockets.
    env = {"RTQCC_PROVIDER_LIMITS": "gpt-4o-mini=540/"} if shared_limit else {}
    if shared_limit:
        _drain_with_two_consumers(start_consumer, make_openai_services, database, ids, **env)
        assert [r.status for r in llm.requests].count(429) == 0
        assert len(llm.requests) == 24
    else:  # the same work without the shared limit: the server refuses some calls
        consumers = [start_consumer(name=f"unlimited-{n}", budget_s=60, services=make_openai_services())
                     for n in range(2)]
        try:
            wait_for(lambda: any(r.status == 429 for r in llm.requests), timeout_s=30, what="a refusal")
        finally:
            for consumer in consumers:
                consumer.consumer.shut_down()
                consumer.join()


def test_a_429_holds_every_consumers_calls_to_that_model_for_its_retry_after(
        api, llm, make_openai_services, start_consumer, database):
    llm.set_pace(tokens_per_s=40)  # half a second a call: the other jobs have calls to make meanwhile
    ids = _start_jobs(api, 4)
    llm.add_faults({"kind": "rate_limit", "retry_after_s": 1.5})  # the first call is refused
    _drain_with_two_consumers(start_consumer, make_openai_services, database, ids)
    refused = [r for r in llm.requests if r.status == 429]
    assert len(refused) == 1
    held_from, held_until = refused[0].ended_at + 0.3, refused[0].ended_at + 1.3
    during = [r for r in llm.requests if held_from <= r.started_at <= held_until]
    assert during == [], f"{len(during)} calls went out while the model was held"
    assert len(llm.requests) == 4 * 2 + 1


def _provider_waits(api, external_id):
    return api.get(f"/jobs/{external_id}").json_body.get("provider_waits")


def _watch_waits_until_completed(api, consumer, database, external_id) -> list[list[dict]]:
    """Every `provider_waits` the job's document showed while it ran, until it completed."""
    shown = []
    try:
        def completed():
            if waits := _provider_waits(api, external_id):
                shown.append(waits)
            return _completed(database, [external_id])

        wait_for(completed, timeout_s=30, interval_s=0.02, what="the job to complete")
    finally:
        consumer.consumer.shut_down()
        consumer.join()
    return shown


def test_a_running_job_held_back_by_a_429_says_so_until_its_call_goes_out(
        api, llm, make_openai_services, start_consumer, database, redis_client):
    external_id = _start_jobs(api, 1)[0]
    llm.add_faults({"kind": "rate_limit", "retry_after_s": 1.5})  # its first call is refused
    consumer = start_consumer(name="held", budget_s=60, services=make_openai_services())
    shown = _watch_waits_until_completed(api, consumer, database, external_id)
    assert shown, "the wait was never shown"
    assert {(w["section"], w["model"], w["reason"]) for waits in shown for w in waits} == {(0, "gpt-4o-mini", "rate_limited")}
    remaining = [waits[0]["remaining_s"] for waits in shown]
    assert remaining == sorted(remaining, reverse=True) and remaining[-1] >= 0  # one wait, counting down
    assert _provider_waits(api, external_id) is None
    assert redis_client.keys("job:*:provider_waits") == []


def test_a_model_limited_to_fewer_requests_than_a_quarter_second_holds_still_runs_one_call_at_a_time(
        api, llm, make_openai_services, start_consumer, database):
    # 20 a minute: a quarter second's worth is a twelfth of a request, and the bucket holds one,
    # refilled in 3 s, longer than the first section takes.
    external_id = _start_jobs(api, 1)[0]
    services = make_openai_services(RTQCC_PROVIDER_LIMITS="gpt-4o-mini=20/")
    shown = _watch_waits_until_completed(api, start_consumer(name="slow", budget_s=60, services=services),
                                         database, external_id)
    assert len(llm.requests) == 2
    # The first call went at once; the second waited its turn, and said why.
    assert {(w["section"], w["reason"]) for waits in shown for w in waits} == {(1, "requests_per_min")}


def test_limits_are_read_from_one_setting_and_a_bad_one_names_it():
    assert parse_limits("gpt-4o-mini=500/200000, *=60/") == {
        "gpt-4o-mini": ModelLimit(500, 200000), "*": ModelLimit(60, None)}
    for wrong in ("gpt-4o-mini=500", "=1/2", "gpt-4o=-1/5", "gpt-4o=fast/"):
        with pytest.raises(ConfigError, match="RTQCC_PROVIDER_LIMITS"):
            parse_limits(wrong)
