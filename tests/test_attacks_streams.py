"""Attacks on live streaming by one tenant against all: open streams are capped per tenant and
per API key, counted in Redis so every gateway shares the count and a crashed one leaks nothing."""

from __future__ import annotations

import pytest
from chalice.test import Client
from conftest import API_KEY, OTHER_KEY, ApiClient, parse_sse

from rtqcc.api import create_app
from rtqcc.api.access import open_job_stream
from rtqcc.store.api_keys import ApiKeyStore, key_ref
from rtqcc.errors import TooManyRequests


@pytest.fixture
def capped(make_services):
    """Services whose tenants may hold 3 streams at once, and any one key 2."""
    return make_services(max_streams_per_tenant=3, max_streams_per_key=2, sse_long_poll_s=0.1)


def _open(services, external_id: str, key: str):
    return open_job_stream(services, {"authorization": f"Bearer {key}"}, {}, external_id, "127.0.0.1")


def _job(services, key: str = API_KEY) -> str:
    with Client(create_app(lambda: services)) as client:
        return ApiClient(client, key).create()


def test_open_streams_are_capped_per_key_then_per_tenant_with_retry_after(capped, database):
    external_id = _job(capped)
    second_key = ApiKeyStore(database).create("tenant-a").key
    first, second = _open(capped, external_id, API_KEY), _open(capped, external_id, API_KEY)
    with pytest.raises(TooManyRequests) as refused:
        _open(capped, external_id, API_KEY)
    assert "API key" in refused.value.message
    assert int(refused.value.headers["Retry-After"]) >= 1

    third = _open(capped, external_id, second_key)  # another key of the tenant: its own 2, the tenant's 3rd
    with pytest.raises(TooManyRequests) as tenant_full:
        _open(capped, external_id, second_key)
    assert "account" in tenant_full.value.message

    # Another tenant streams as usual: the cap is the noisy tenant's alone.
    theirs = _open(capped, _job(capped, OTHER_KEY), OTHER_KEY)
    theirs.close()

    first.close()  # a closed stream frees its slot at once
    _open(capped, external_id, API_KEY).close()
    for stream in (second, third):
        stream.close()


def test_a_slot_of_a_crashed_gateway_expires_by_itself(capped, redis_client):
    external_id = _job(capped)
    for _ in range(2):
        _open(capped, external_id, API_KEY)  # never closed
    with pytest.raises(TooManyRequests):
        _open(capped, external_id, API_KEY)
    # The gateway holding them died: nothing refreshes them, and Redis drops them once they expire
    # (here: their expiry moved into the past, as the clock would after SLOT_TTL_S).
    for key in ("streams:open:tenant:tenant-a", f"streams:open:key:{key_ref(API_KEY)}"):
        members = redis_client.zrange(key, 0, -1)
        redis_client.zadd(key, {member: 0 for member in members}, xx=True)
        assert redis_client.ttl(key) > 0  # the sets themselves expire too
    _open(capped, external_id, API_KEY).close()


def test_a_streaming_answer_releases_its_slot_when_it_ends(capped, run_consumer, redis_client):
    external_id = _job(capped)
    with Client(create_app(lambda: capped)) as client:
        api = ApiClient(client, API_KEY)
        api.post(f"/jobs/{external_id}/start")
        run_consumer()
        for _ in range(5):  # more than the cap, one after another: each answer gives its slot back
            answer = api.get(f"/jobs/{external_id}/stream")
            assert answer.status_code == 200
            assert parse_sse(answer.body.decode())[-1]["event"] == "done"
    stream = _open(capped, external_id, API_KEY)
    assert [event["event"] for event in parse_sse("".join(stream.frames(heartbeat_s=0.1)))][-1] == "done"
    assert redis_client.zcard(f"streams:open:key:{key_ref(API_KEY)}") == 0


def test_the_cap_is_shared_by_every_gateway(capped, make_services):
    external_id = _job(capped)
    other_gateway = make_services(max_streams_per_tenant=3, max_streams_per_key=2)
    held = [_open(capped, external_id, API_KEY), _open(other_gateway, external_id, API_KEY)]
    with pytest.raises(TooManyRequests):
        _open(other_gateway, external_id, API_KEY)
    for stream in held:
        stream.close()
