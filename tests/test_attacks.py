"""Attacks on the public API: another tenant's jobs, server-owned fields, hostile bodies,
unicode edge cases, and property-based fuzzing of every route in the OpenAPI document.

Whatever is sent, the answer is a 4xx or 2xx, never a 5xx; an error is always
`{"error": {"code", "message"}}` JSON that leaks no traceback (the gateway's own 403/413/504
answers keep API Gateway's `{"message": ...}` shape)."""

from __future__ import annotations

import json
import os

import httpx
import pytest
from conftest import API_KEY, OTHER_KEY, ApiClient

from rtqcc.api import stream_tokens
from rtqcc.store.api_keys import key_ref
from rtqcc.api.openapi import OPERATIONS

VALID = {"title": "T", "brief": "B"}
JOB_ROUTES = [op for op in OPERATIONS if "{external_id}" in op.path]
GATEWAY_SHAPES = {403, 413, 502, 504}  # answered by the gateway itself, as API Gateway does


def assert_error_body(status: int, content_type: str, body: bytes, *, gateway_shape_ok: bool = True) -> dict:
    """The contract every error answer keeps; returns the parsed body."""
    text = body.decode("utf-8", "replace")
    assert "Traceback" not in text and 'File "' not in text, f"a traceback leaked in a {status}: {text[:500]}"
    assert content_type.startswith("application/json"), f"a {status} answered {content_type!r}: {text[:300]}"
    parsed = json.loads(body)
    if gateway_shape_ok and status in GATEWAY_SHAPES and set(parsed) == {"message"}:
        return parsed
    assert isinstance(parsed, dict) and set(parsed) == {"error"}, f"not an error body: {text[:300]}"
    assert set(parsed["error"]) == {"code", "message"}, f"not an error body: {text[:300]}"
    assert all(isinstance(v, str) and v for v in parsed["error"].values())
    return parsed


def expect_error(response, status: int | tuple[int, ...], code: str | None = None) -> dict:
    statuses = status if isinstance(status, tuple) else (status,)
    assert response.status_code in statuses, (response.status_code, response.body[:500])
    error = assert_error_body(response.status_code, response.headers.get("Content-Type", ""), response.body,
                              gateway_shape_ok=False)["error"]
    if code:
        assert error["code"] == code, error
    return error


def _path(op, external_id: str) -> str:
    return op.path.replace("{external_id}", external_id).replace("{index}", "0").replace("{version}", "1")


def _call(client: ApiClient, op, external_id: str, headers: dict | None = None):
    path = _path(op, external_id)
    if op.method == "PUT":
        return client.put(path, {}, headers=headers)
    return client.post(path, headers=headers) if op.method == "POST" else client.get(path, headers=headers)


def _job_count(database) -> int:
    return database.row("SELECT COUNT(*)::int AS n FROM jobs")["n"]


# ---- cross-tenant access --------------------------------------------------------------------

def test_every_job_route_hides_another_tenants_job(api, database, redis_client):
    victim = api.create(outline=[{"title": "Secret plans"}], metadata={"owner": "tenant-a"})
    attacker = api.as_key(OTHER_KEY)
    unknown = "RTQCC-01J00000000000000000000000"
    assert JOB_ROUTES, "OPERATIONS lists no job routes"
    for op in JOB_ROUTES:
        response = _call(attacker, op, victim)
        error = expect_error(response, 404, "job_not_found")
        assert "Secret plans" not in response.body.decode() and "tenant-a" not in response.body.decode()
        # Nothing tells a job of another tenant from a job that does not exist.
        assert error["message"] == expect_error(_call(attacker, op, unknown), 404)["message"].replace(unknown, victim), op.path

    after = database.row("SELECT status, lease_version FROM jobs WHERE external_id = :e", e=victim)
    assert after == {"status": "created", "lease_version": 0}, "the attacker's calls changed the job"
    assert redis_client.xlen("jobs:pending") == 0, "the attacker's start enqueued the job"
    assert attacker.get("/jobs").json_body["jobs"] == []

    # The same routes answer the owner (so the 404s above were about the tenant, not the route).
    for op in JOB_ROUTES:
        answer = _call(api, op, victim)  # a version the new job lacks is a 404 of its own, not job_not_found
        assert answer.status_code != 404 or answer.json_body["error"]["code"] != "job_not_found", op.path


def test_an_idempotency_key_of_another_tenant_replays_nothing(api):
    mine = api.post("/jobs", VALID, headers={"Idempotency-Key": "shared-key"})
    theirs = api.as_key(OTHER_KEY).post("/jobs", VALID, headers={"Idempotency-Key": "shared-key"})
    assert mine.status_code == theirs.status_code == 201
    assert theirs.json_body["externalId"] != mine.json_body["externalId"]
    assert "Idempotent-Replayed" not in theirs.headers


def _stream_with_token(api, external_id: str, token: str):
    return api.client.http.get(f"/jobs/{external_id}/stream?access_token={token}")


def test_a_stream_token_opens_only_the_job_and_tenant_it_was_issued_for(api, services):
    first, second = api.create(), api.create()
    theirs = api.as_key(OTHER_KEY).create()
    token = api.post(f"/jobs/{first}/stream-token").json_body["token"]
    their_token = api.as_key(OTHER_KEY).post(f"/jobs/{theirs}/stream-token").json_body["token"]
    assert _stream_with_token(api, first, token).status_code == 200

    expect_error(_stream_with_token(api, second, token), 401, "unauthorized")       # another job, same tenant
    expect_error(_stream_with_token(api, first, their_token), 401, "unauthorized")  # another tenant's token
    # A genuine token does not lend its tenant to a caller who also sends their own key.
    with_key = api.client.http.get(f"/jobs/{first}/stream?access_token={token}",
                                   headers={"Authorization": f"Bearer {OTHER_KEY}"})
    expect_error(with_key, 404, "job_not_found")

    keys = stream_tokens.SigningKeys.from_settings(services.settings)
    grant = stream_tokens.StreamGrant("tenant-a", first, key_ref(API_KEY))
    expired = stream_tokens.issue(keys, grant, ttl_s=-1)
    expect_error(_stream_with_token(api, first, expired), 401, "unauthorized")
    forged = stream_tokens.issue(stream_tokens.SigningKeys(stream_tokens.SigningKey(keys.current.kid, b"x" * 32)), grant)
    expect_error(_stream_with_token(api, first, forged), 401, "unauthorized")
    # The payload rewritten to name the victim's job, with the attacker's signature kept.
    payload, _, signature = their_token.partition(".")
    claims = json.loads(stream_tokens._unb64(payload))
    swapped = stream_tokens._b64(json.dumps({**claims, "j": first}, separators=(",", ":")).encode()) + "." + signature
    expect_error(_stream_with_token(api, first, swapped), 401, "unauthorized")
    for junk in ("x", ".", "a.b", "%00", "é.é", "A" * 5000):
        expect_error(_stream_with_token(api, first, junk), 401, "unauthorized")


def test_the_streaming_function_hides_other_tenants_jobs_too(api, start_gateway):
    victim = api.create()
    running = start_gateway(streaming=True)
    their_token = api.as_key(OTHER_KEY).post(f"/jobs/{api.as_key(OTHER_KEY).create()}/stream-token").json_body["token"]
    with httpx.Client(base_url=running.base_url, timeout=10) as http:
        cases = [
            http.get(f"/jobs/{victim}/stream", headers={"Authorization": f"Bearer {OTHER_KEY}"}),
            http.get(f"/jobs/{victim}/stream", params={"access_token": their_token}),
            http.get(f"/jobs/{victim}/stream"),
        ]
    assert [answer.status_code for answer in cases] == [404, 401, 401]
    for answer in cases:
        assert_error_body(answer.status_code, answer.headers["content-type"], answer.content, gateway_shape_ok=False)


# ---- mass assignment ------------------------------------------------------------------------

@pytest.mark.parametrize("field, value", [
    ("status", "completed"), ("tenant", "tenant-b"), ("usage", {"total_tokens": 0}),
    ("externalId", "RTQCC-01J00000000000000000000000"), ("lease_version", 99), ("error", None),
    ("id", 1), ("lease_owner", "me"), ("manuscript_key", "manuscripts/x/manuscript.md"),
    ("progress", {"sections_done": 5}), ("failures", 0), ("deliveries", 0), ("created_at", "2020-01-01"),
])
def test_server_owned_fields_in_a_new_job_are_refused_by_name(api, database, field, value):
    error = expect_error(api.post("/jobs", {**VALID, field: value}), 422, "validation_failed")
    assert f"{field}:" in error["message"] and "set by the server" in error["message"], error
    assert _job_count(database) == 0


def test_server_owned_fields_nested_in_the_outline_are_refused(api, database):
    error = expect_error(api.post("/jobs", {**VALID, "outline": [{"title": "a", "status": "done"}]}), 422)
    assert "outline.0.status:" in error["message"]
    assert _job_count(database) == 0


def test_a_control_request_body_cannot_set_the_state(api, database):
    external_id = api.create()
    response = api.post(f"/jobs/{external_id}/start", {"status": "completed", "tenant": "tenant-b",
                                                        "lease_version": 99})
    assert response.status_code == 202 and response.json_body["status"] == "queued"
    row = database.row("SELECT status, tenant, lease_version FROM jobs WHERE external_id = :e", e=external_id)
    assert row == {"status": "queued", "tenant": "tenant-a", "lease_version": 0}


# ---- oversize and malformed bodies ----------------------------------------------------------

def test_a_body_over_the_limit_is_413(api, settings, database):
    huge = json.dumps({**VALID, "brief": "x" * (settings.max_body_bytes + 1)})
    expect_error(api.post("/jobs", raw=huge), 413, "payload_too_large")
    assert _job_count(database) == 0


@pytest.mark.parametrize("depth", [50, 900, 5_000, 100_000])
def test_deeply_nested_json_is_a_4xx(api, database, depth):
    top_level = "[" * depth + "]" * depth
    in_metadata = json.dumps(VALID)[:-1] + ', "metadata": ' + '{"a": ' * depth + "1" + "}" * depth + "}"
    for raw in (top_level, in_metadata):
        response = api.post("/jobs", raw=raw)
        assert 400 <= response.status_code < 500, (
            f"JSON nested {depth} deep got {response.status_code}: {response.body[:200]!r}")
        expect_error(response, (400, 413, 422))
    assert _job_count(database) == 0


@pytest.mark.parametrize("raw", [
    '{"title": "T", "brief": "B", "section_count": 1e400}',
    '{"title": "T", "brief": "B", "section_count": ' + "9" * 5000 + "}",
    '{"title": "T", "brief": "B", "section_count": 99999999999999999999999999}',
    '{"title": "T", "brief": "B", "section_count": -99999999999999999999999999}',
    '{"title": "T", "brief": "B", "section_count": 2.5}',
    '{"title": "T", "brief": "B", "section_count": NaN}',
    '{"title": "T", "brief": "B", "params": {"temperature": Infinity}}',
    '{"title": "T", "brief": "B", "params": {"temperature": NaN}}',
    '{"title": "T", "brief": "B", "params": {"max_tokens_per_section": 1e10}}',
    '{"title": "T", "brief": "B", "budget": {"max_cost_usd": 1e400}}',
    '{"title": "T", "brief": "B", "budget": {"max_cost_usd": Infinity}}',
    '{"title": "T", "brief": "B", "budget": {"max_cost_usd": -Infinity}}',
    '{"title": "T", "brief": "B", "budget": {"max_cost_usd": NaN}}',
], ids=["float-overflow", "5000-digits", "above-int64", "below-int64", "fraction", "nan-count",
        "inf-temperature", "nan-temperature", "float-tokens", "overflow-cost", "inf-cost", "minus-inf-cost",
        "nan-cost"])
def test_huge_and_non_finite_numbers_are_a_4xx(api, database, raw):
    response = api.post("/jobs", raw=raw)
    assert 400 <= response.status_code < 500, f"{raw[:80]} got {response.status_code}: {response.body[:300]!r}"
    expect_error(response, (400, 422))
    assert _job_count(database) == 0


def test_a_huge_but_finite_budget_is_stored_and_read_back(api):
    external_id = api.create(budget={"max_tokens": 10 ** 30, "max_cost_usd": 1e308})
    assert api.get(f"/jobs/{external_id}").status_code == 200


@pytest.mark.parametrize("body, field", [
    ({**VALID, "title": 123}, "title"), ({**VALID, "title": ["T"]}, "title"), ({**VALID, "title": None}, "title"),
    ({**VALID, "brief": {"a": 1}}, "brief"), ({**VALID, "outline": "one, two"}, "outline"),
    ({**VALID, "outline": [["a"]]}, "outline.0"), ({**VALID, "section_count": True}, "section_count"),
    ({**VALID, "params": []}, "params"), ({**VALID, "params": {"temperature": "hot"}}, "params.temperature"),
    ({**VALID, "budget": "lots"}, "budget"), ({**VALID, "metadata": ["a"]}, "metadata"),
    ({**VALID, "metadata": {"k": None}}, "metadata.k"), ({**VALID, "model": 4}, "model"),
])
def test_wrong_types_are_422_naming_the_field(api, database, body, field):
    error = expect_error(api.post("/jobs", body), 422, "validation_failed")
    assert f"{field}:" in error["message"], error
    assert _job_count(database) == 0


@pytest.mark.parametrize("raw", ["null", "true", "0", "[]", '"x"', "{", '{"title": "T",}', "{'title': 'T'}",
                                 '{"title": "T"} {"brief": "B"}', "\ufeff" + json.dumps(VALID)[:-1]])
def test_malformed_json_is_a_4xx(api, database, raw):
    expect_error(api.post("/jobs", raw=raw), (400, 422))
    assert _job_count(database) == 0


@pytest.mark.parametrize("raw", [
    b'{"title": "\xff\xfe", "brief": "B"}',
    b'{"title": "T", "brief": "\xc3\x28"}',
    b'{"title": "T", "brief": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8 bytes (CESU)
    b'\x00\x00\x00{',
])
def test_invalid_utf8_bytes_are_a_4xx(api, database, raw):
    response = api.client.http.post("/jobs", body=raw, headers=api.headers())
    expect_error(response, (400, 422))
    assert _job_count(database) == 0


def test_invalid_utf8_bytes_over_http_are_a_400(start_gateway, database):
    running = start_gateway()
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        answer = http.post("/jobs", content=b'{"title": "\xff", "brief": "B"}',
                           headers={"Content-Type": "application/json"})
    assert answer.status_code == 400, answer.text
    assert_error_body(400, answer.headers["content-type"], answer.content, gateway_shape_ok=False)
    assert _job_count(database) == 0


@pytest.mark.parametrize("raw", [
    '{"title": "A", "title": "B", "brief": "x"}',
    '{"title": "T", "brief": "x", "section_count": 1, "section_count": 500}',
    '{"title": "T", "brief": "x", "metadata": {"k": "a", "k": "b"}}',
    '{"title": "T", "brief": "x", "status": "completed", "status": "created"}',
])
def test_duplicate_keys_are_refused(api, database, raw):
    # Parsers disagree on which duplicate wins (first, last, error): a proxy that checked the
    # first value and an app that used the last is a classic smuggling path. Refuse them.
    response = api.post("/jobs", raw=raw)
    assert 400 <= response.status_code < 500, (
        f"a body with a duplicate key was accepted ({response.status_code}): {raw}")
    expect_error(response, (400, 422))
    assert _job_count(database) == 0


HOSTILE_PATHS = (
    "/jobs?limit=%C2%B2", "/jobs?limit=%D9%A3", "/jobs?limit=-1", "/jobs?limit=1e9",
    "/jobs?limit=99999999999999999999999", "/jobs?status=%00", "/jobs?cursor=%00", "/jobs?status=completed%00",
    "/jobs/{id}/sections/%C2%B2", "/jobs/{id}/sections/%D9%A3", "/jobs/{id}/sections/-1",
    "/jobs/{id}/sections/99999999999999999999999999", "/jobs/{id}/stream?lastEventId=%00",
    "/jobs/{id}/stream?lastEventId=99999999999999999999999-0", "/jobs/RTQCC-%F0%9F%98%80", "/jobs/%00",
    "/jobs/" + "A" * 3000,
)


def test_hostile_query_strings_and_paths_are_a_4xx(api, start_gateway):
    external_id = api.create(outline=[{"title": "a"}])
    running = start_gateway(streaming=False)
    crashed = []
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        for template in HOSTILE_PATHS:
            path = template.replace("{id}", external_id)
            in_process = api.get(path)
            over_http = http.get(path)
            for how, status, content_type, body in (
                    ("chalice", in_process.status_code, in_process.headers.get("Content-Type", ""), in_process.body),
                    ("http", over_http.status_code, over_http.headers.get("content-type", ""), over_http.content)):
                if not 400 <= status < 500:
                    crashed.append(f"{how}: GET {path[:80]} -> {status}")
                    continue
                assert_error_body(status, content_type, body)
    assert not crashed, f"hostile query strings or paths were not refused with a 4xx: {crashed}"


def test_a_deeply_nested_body_with_an_idempotency_key_is_a_4xx(api):
    external_id = api.create()
    response = api.post(f"/jobs/{external_id}/start", raw="[" * 5000 + "]" * 5000,
                        headers={"Idempotency-Key": "deep"})
    assert 400 <= response.status_code < 500 or response.status_code == 202, (
        f"a deeply nested body on start got {response.status_code}: {response.body[:200]!r}")


# ---- unicode --------------------------------------------------------------------------------

UNICODE_SAMPLES = {
    "emoji": "Launch 🚀 plan 👩🏽‍💻 with flags 🇺🇦🏳️‍🌈",
    "rtl": "שלום עולם — مرحبا بالعالم",
    "combining": "Zalgo: Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǫ̯̰̈̈ and e\u0301 vs \u00e9",
    "four_byte": "𠜎𠜱𠝹 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 𓀀 🀄",
    "mixed_direction": "abc \u202edcba\u202c \u200f\u200e zero\u200bwidth",
}


@pytest.mark.parametrize("name", list(UNICODE_SAMPLES))
def test_unicode_text_is_accepted_and_round_tripped_exactly(api, name):
    text = UNICODE_SAMPLES[name]
    external_id = api.create(title=text, brief=text + " brief", metadata={text[:16]: text},
                             outline=[{"title": text, "brief": text}])
    job = api.get(f"/jobs/{external_id}").json_body
    assert (job["title"], job["brief"], job["metadata"]) == (text, text + " brief", {text[:16]: text})
    assert job["sections"][0]["title"] == text
    section = api.get(f"/jobs/{external_id}/sections/0").json_body
    assert (section["title"], section["brief"]) == (text, text)
    assert [j["title"] for j in api.get("/jobs").json_body["jobs"]] == [text]


def test_unicode_round_trips_over_http_both_as_raw_utf8_and_as_escapes(start_gateway):
    text = "".join(UNICODE_SAMPLES.values())
    running = start_gateway()
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {API_KEY}",
                                                          "Content-Type": "application/json"}) as http:
        for ensure_ascii in (False, True):  # raw UTF-8 bytes, then \uXXXX escapes with surrogate pairs
            body = json.dumps({"title": text[:300], "brief": text}, ensure_ascii=ensure_ascii).encode()
            created = http.post("/jobs", content=body)
            assert created.status_code == 201, created.text
            job = http.get(f"/jobs/{created.json()['externalId']}").json()
            assert (job["title"], job["brief"]) == (text[:300], text)


def test_length_limits_count_characters_not_bytes(api):
    assert api.post("/jobs", {**VALID, "title": "🚀" * 300}).status_code == 201
    expect_error(api.post("/jobs", {**VALID, "title": "🚀" * 301}), 422)


@pytest.mark.parametrize("raw, where", [
    ('{"title": "T", "brief": "B", "outline": [{"title": "a\\u0000b"}]}', "outline"),
    ('{"title": "T", "brief": "B", "metadata": {"k": "v\\u0000"}}', "metadata"),
    ('{"title": "T\\udc00", "brief": "B"}', "title"),
    ('{"title": "T", "brief": "\\ude00\\ud83d"}', "brief"),
    ('{"title": "T", "brief": "B", "metadata": {"\\ud800": "v"}}', "metadata"),
    ('{"title": "T", "brief": "B", "outline": [{"title": "a", "brief": "\\udfff"}]}', "outline"),
])
def test_nul_and_lone_surrogates_are_refused_wherever_they_hide(api, database, raw, where):
    error = expect_error(api.post("/jobs", raw=raw), 422, "validation_failed")
    assert where in error["message"] and "NUL characters or unpaired surrogates" in error["message"]
    assert _job_count(database) == 0


# ---- property-based fuzzing of every documented route ------------------------------------------

FUZZ_EXAMPLES = int(os.environ.get("RTQCC_FUZZ_EXAMPLES", "60"))
FUZZED_OPERATIONS = [(op.method, op.path) for op in OPERATIONS]


@pytest.fixture
def fuzz_target(make_services, start_gateway):
    """A buffering gateway over real HTTP (a streaming SSE answer would never end), rate limit off,
    with one job of each tenant so generated ids sometimes name a real job."""
    import schemathesis

    services = make_services(rate_limit_per_min=0, sse_long_poll_s=0.1)
    running = start_gateway(services_override=services, streaming=False, integration_timeout_s=10)
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        mine = http.post("/jobs", json={**VALID, "outline": [{"title": "a"}]}).json()["externalId"]
    with httpx.Client(base_url=running.base_url, headers={"Authorization": f"Bearer {OTHER_KEY}"}) as http:
        theirs = http.post("/jobs", json=VALID).json()["externalId"]
    schema = schemathesis.openapi.from_url(f"{running.base_url}/openapi.json")
    return running.base_url, schema, (mine, theirs)


def check_fuzzed_answer(case, response) -> None:
    where = f"{case.method} {case.formatted_path} -> {response.status_code}"
    assert response.status_code < 500, f"{where}: {response.text[:500]}\n{case.as_curl_command()}"
    text = response.text
    assert "Traceback" not in text and 'File "' not in text, f"{where} leaked a traceback: {text[:500]}"
    if response.status_code >= 400:
        content_type = {name.lower(): values for name, values in response.headers.items()}.get("content-type", [""])
        assert_error_body(response.status_code, content_type[0], response.content)


@pytest.mark.parametrize("method, path", FUZZED_OPERATIONS, ids=[f"{m} {p}" for m, p in FUZZED_OPERATIONS])
def test_fuzzed_requests_never_crash_the_api(fuzz_target, method, path):
    from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st
    from schemathesis import GenerationMode
    from schemathesis.specs.openapi.checks import content_type_conformance, negative_data_rejection

    base_url, schema, real_ids = fuzz_target
    operation = schema[path][method]
    cases = st.one_of(operation.as_strategy(generation_mode=GenerationMode.POSITIVE),
                      operation.as_strategy(generation_mode=GenerationMode.NEGATIVE))
    keys = st.sampled_from([API_KEY, API_KEY, API_KEY, OTHER_KEY, "not-a-key", None])
    ids = st.sampled_from([*real_ids, None])

    @hypothesis_settings(max_examples=FUZZ_EXAMPLES, deadline=None, derandomize=True, database=None,
                         suppress_health_check=list(HealthCheck))
    @given(case=cases, key=keys, real_id=ids)
    def fuzz(case, key, real_id):
        if real_id and "external_id" in (case.path_parameters or {}):
            case.path_parameters["external_id"] = real_id
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        response = case.call(base_url=base_url, headers=headers, timeout=15)
        check_fuzzed_answer(case, response)
        # Answers carry their documented media type; a body the schema forbids is refused
        # (unknown query parameters are ignored, as most APIs do, so only bodies are held to it).
        checks = [content_type_conformance, *([negative_data_rejection] if operation.body else [])]
        case.validate_response(response, checks=checks, headers=headers)

    fuzz()
