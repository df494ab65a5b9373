"""Attacks on who-is-who: forged and replayed stream tokens, key rotation and revocation, key
guessing, stream opens outside the rate limit, and /metrics read with a tenant's key."""

from __future__ import annotations

import hashlib
import hmac
import io
import json
import logging

import pytest
from chalice.test import Client
from conftest import API_KEY, METRICS_TOKEN, OTHER_KEY, ApiClient
from test_attacks import expect_error

from rtqcc.api import create_app, stream_tokens
from rtqcc.store.api_keys import AmbiguousKeyPrefix, ApiKeyStore
from rtqcc.errors import ConfigError
from rtqcc.logs import configure_logging
from rtqcc.settings import Settings


@pytest.fixture
def api_for(make_services):
    """A Chalice test client over services with these setting overrides, as tenant A."""
    clients = []

    def make(**overrides) -> ApiClient:
        services = make_services(**overrides)
        client = Client(create_app(lambda: services))
        clients.append(client)
        return ApiClient(client.__enter__(), API_KEY)

    yield make
    for client in clients:
        client.__exit__(None, None, None)


def _stream(api: ApiClient, external_id: str, token: str):
    return api.client.http.get(f"/jobs/{external_id}/stream?access_token={token}")


def _b64(raw: bytes) -> str:
    return stream_tokens._b64(raw)


# ---- item 1: stream tokens -----------------------------------------------------------------

def test_a_token_signed_with_what_the_old_code_derived_from_the_keys_opens_nothing(api):
    """The old key was sha256 over the configured `key:tenant` pairs (or over nothing): anyone
    holding a key, or nobody at all, could compute it and sign a token for any tenant's job."""
    victim = api.create()
    payload = json.dumps({"t": "tenant-a", "j": victim, "exp": 2**40}, separators=(",", ":")).encode()
    for material in ("", f"{API_KEY}:tenant-a\n{OTHER_KEY}:tenant-b"):
        derived = hashlib.sha256(b"rtqcc-stream-token\n" + material.encode()).digest()
        forged = f"{_b64(payload)}.{_b64(hmac.new(derived, payload, hashlib.sha256).digest())}"
        expect_error(_stream(api, victim, forged), 401, "unauthorized")
    assert _stream(api, victim, api.post(f"/jobs/{victim}/stream-token").json_body["token"]).status_code == 200


@pytest.mark.parametrize("value, complaint", [
    ("short-but-random-9f2c", "at least 32 bytes"),
    ("change-me-change-me-change-me-change-me", "placeholder"),
    ("x" * 40, "placeholder"),
])
def test_a_weak_stream_token_secret_is_refused_at_start_naming_the_variable(value, complaint):
    with pytest.raises(ConfigError, match=f"RTQCC_STREAM_TOKEN_SECRET.*{complaint}|{complaint}"):
        Settings.from_env({"RTQCC_STREAM_TOKEN_SECRET": value})


def test_the_secret_rotates_with_the_previous_one_accepted_until_it_is_dropped(api_for, settings):
    old_secret, new_secret = settings.stream_token_secret, "n3w-" + "Zq8vT2kLpW5xR7mY" * 3
    before = api_for()
    external_id = before.create()
    issued_before = before.post(f"/jobs/{external_id}/stream-token").json_body["token"]

    during = api_for(stream_token_secret=new_secret, stream_token_previous_secret=old_secret)
    assert _stream(during, external_id, issued_before).status_code == 200  # a page open across the rotation
    issued_during = during.post(f"/jobs/{external_id}/stream-token").json_body["token"]
    assert _stream(during, external_id, issued_during).status_code == 200

    after = api_for(stream_token_secret=new_secret)
    expect_error(_stream(after, external_id, issued_before), 401, "unauthorized")
    assert _stream(after, external_id, issued_during).status_code == 200


def test_revoking_the_issuing_key_kills_its_stream_tokens(api_for, database):
    api = api_for(api_key_cache_s=0)
    issued = ApiKeyStore(database).create("tenant-a")
    mine = api.as_key(issued.key)
    external_id = mine.create()
    token = mine.post(f"/jobs/{external_id}/stream-token").json_body["token"]
    colleague_token = api.post(f"/jobs/{external_id}/stream-token").json_body["token"]  # same tenant, other key
    assert _stream(api, external_id, token).status_code == 200

    assert ApiKeyStore(database).revoke(issued.key_hash[:12]) == 1
    error = expect_error(_stream(api, external_id, token), 401, "unauthorized")
    assert "revoked" in error["message"]
    assert _stream(api, external_id, colleague_token).status_code == 200


def test_a_token_does_not_outlive_its_key_being_moved_to_another_tenant(api_for, settings):
    """A token names its key and tenant; if that key now belongs elsewhere, the token is void."""
    api = api_for()
    external_id = api.create()
    token = api.post(f"/jobs/{external_id}/stream-token").json_body["token"]
    moved = api_for(api_keys={API_KEY: "tenant-b", OTHER_KEY: "tenant-b"})
    expect_error(_stream(moved, external_id, token), 401, "unauthorized")


def test_revoking_by_a_pattern_revokes_nothing(database):
    store = ApiKeyStore(database)
    first, second = store.create("tenant-a"), store.create("tenant-b")
    for pattern in ("________", "%%%%%%%%", "________________", "' OR '1'='1"):
        with pytest.raises(AmbiguousKeyPrefix):
            store.revoke(pattern)
    assert [row["revoked_at"] for row in store.list()] == [None, None]
    assert store.revoke(first.key_hash[:10]) == 1
    assert store.tenant_for(second.key) == "tenant-b"


def test_no_stream_token_reaches_the_logs(api):
    stream = io.StringIO()
    configure_logging(stream=stream)  # the root logger is put back after the test (conftest)
    external_id = api.create()
    token = api.post(f"/jobs/{external_id}/stream-token").json_body["token"]
    logging.getLogger("rtqcc.test.access").warning('127.0.0.1:5 - "GET /jobs/%s/stream?access_token=%s HTTP/1.1" 200',
                                              external_id, token)
    logging.getLogger("rtqcc").warning("could not reach postgresql://rtqcc:hunter2hunter2@db:5432/rtqcc")
    logged = stream.getvalue()
    assert external_id in logged and "access_token=***" in logged
    assert token not in logged and token.split(".")[1] not in logged
    assert "hunter2hunter2" not in logged and "postgresql://***@db:5432" in logged


# ---- item 4: rate limits -------------------------------------------------------------------

def test_stream_opens_count_against_the_tenants_request_rate(api_for):
    api = api_for(rate_limit_per_min=4, sse_long_poll_s=0.1)
    external_id = api.create()                                               # 1
    token = api.post(f"/jobs/{external_id}/stream-token").json_body["token"]  # 2
    assert api.get(f"/jobs/{external_id}/stream").status_code == 200         # 3, by header
    assert _stream(api, external_id, token).status_code == 200               # 4, by token
    refused = api.client.http.get(f"/jobs/{external_id}/stream?access_token={token}")
    expect_error(refused, 429, "rate_limited")
    assert int(refused.headers["Retry-After"]) >= 1


def test_failed_authentication_is_throttled_per_client_before_any_lookup(api_for):
    api = api_for(auth_failures_per_min=5)
    for attempt in range(5):
        expect_error(api.as_key(f"guess-{attempt}").get("/jobs"), 401, "unauthorized")
    throttled = api.as_key("guess-5").get("/jobs")
    expect_error(throttled, 429, "rate_limited")
    assert int(throttled.headers["Retry-After"]) >= 1
    # Past the limit even a right key from that address waits (it is not looked up at all), so a
    # guesser learns nothing and costs the database nothing more.
    expect_error(api.get("/jobs"), 429, "rate_limited")
    expect_error(api.client.http.get("/jobs/RTQCC-01J00000000000000000000000/stream?access_token=forged"),
                 429, "rate_limited")


# ---- item 9: /metrics ------------------------------------------------------------------------

def test_metrics_need_their_own_token_not_a_tenants_key(api_for):
    api = api_for()
    expect_error(api.get("/metrics"), 401, "unauthorized")
    expect_error(api.as_key(OTHER_KEY).get("/metrics"), 401, "unauthorized")
    assert api.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).status_code == 200
    off = api_for(metrics_token=None)
    error = expect_error(off.get("/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}), 404, "not_found")
    assert "RTQCC_METRICS_TOKEN" in error["message"]


# ---- one app, many threads -------------------------------------------------------------------

def test_concurrent_callers_of_one_app_never_see_each_others_requests(services):
    """The gateways invoke one Chalice app from a pool of threads. Chalice keeps the request on
    the app object, so a view could read another thread's request and answer with the wrong
    tenant's jobs (found by the concurrency test of the cost quotas)."""
    from concurrent.futures import ThreadPoolExecutor

    from rtqcc_emulator.gateway import GatewayRequest, build_gateway

    gateway = build_gateway(services, workers=16)
    owners = {API_KEY: set(), OTHER_KEY: set()}
    for key in owners:
        for _ in range(2):
            request = GatewayRequest("POST", "/jobs", headers=[("authorization", f"Bearer {key}"),
                                                              ("content-type", "application/json")],
                                     body=b'{"title": "t", "brief": "b"}')
            owners[key].add(gateway.handle(request).json()["externalId"])

    def listing(key: str) -> tuple[str, set[str]]:
        answer = gateway.handle(GatewayRequest("GET", "/jobs", headers=[("authorization", f"Bearer {key}")]))
        return key, {job["externalId"] for job in answer.json()["jobs"]}

    import sys

    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter can: races show at once
    try:
        with ThreadPoolExecutor(max_workers=12) as pool:
            seen = list(pool.map(listing, [API_KEY, OTHER_KEY] * 150))
    finally:
        sys.setswitchinterval(interval)
        gateway.close()
    crossed = [key for key, jobs in seen if jobs != owners[key]]
    assert not crossed, f"{len(crossed)} of {len(seen)} answers listed another tenant's jobs"
