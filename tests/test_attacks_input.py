"""Odd input that used to reach a 5xx or a wrong answer: ids and cursors with Unicode digits,
numbers past 64 bits or past Python's 4,300-digit limit, trailing newlines; manuscripts too large
for a function's answer; idempotency keys left in progress by a request that died."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
from chalice.test import Client
from conftest import ApiClient
from test_attacks import expect_error

from rtqcc.api import create_app
from rtqcc.store.blobs import manuscript_key
from rtqcc.errors import InvalidTransition
from rtqcc.store.idempotency import Answer, IdempotencyStore, fingerprint

HUGE = "9" * 4301


@pytest.mark.parametrize("last_event_id", [
    "\u0661\u0662\u0663-0",            # Arabic-Indic digits: \d matched them
    "18446744073709551616-0",          # 2**64: more than a Redis stream id holds
    "1-18446744073709551616",
    "1700000000000-0\n",               # `$` let a trailing newline through
])
def test_a_last_event_id_that_is_no_stream_id_is_a_400(api, last_event_id):
    external_id = api.create()
    answer = api.get(f"/jobs/{external_id}/stream?lastEventId={quote(last_event_id)}")
    error = expect_error(answer, 400, "bad_request")
    assert "Last-Event-ID" in error["message"]


@pytest.mark.parametrize("path", [f"/jobs?limit={HUGE}", "/jobs/{id}/sections/" + HUGE])
def test_numbers_past_the_4300_digit_limit_are_a_400(api, path):
    external_id = api.create(outline=[{"title": "a"}])
    answer = api.get(path.replace("{id}", external_id))
    expect_error(answer, 400, "bad_request")
    assert len(answer.body) < 1000, "the whole number was echoed back"


def test_a_cursor_with_a_trailing_newline_is_refused(api):
    external_id = api.create()
    expect_error(api.get(f"/jobs?cursor={external_id}%0A"), 400, "bad_request")
    assert api.get(f"/jobs?cursor={external_id}").status_code == 200


def test_a_manuscript_too_large_to_answer_inline_redirects_to_a_presigned_download(
        api, make_services, blob_store, database):
    external_id = api.create(outline=[{"title": "a"}])
    manuscript = ("# A long one\n\n" + "All work and no play. " * 400).encode()
    blob_store.put(manuscript_key(external_id), manuscript)
    database.run("UPDATE jobs SET status = 'completed', manuscript_key = :k", k=manuscript_key(external_id))

    small = make_services(max_inline_manuscript_bytes=1024)
    with Client(create_app(lambda: small)) as client:
        answer = ApiClient(client, api.key).get(f"/jobs/{external_id}/manuscript")
    assert answer.status_code == 303, answer.body[:300]
    downloaded = httpx.get(answer.headers["Location"], timeout=10)
    assert downloaded.status_code == 200 and downloaded.content == manuscript
    assert api.get(f"/jobs/{external_id}/manuscript").body == manuscript  # under the default limit: inline


def test_an_idempotency_key_left_in_progress_by_a_dead_request_is_freed(api, database):
    body = {"title": "T", "brief": "B"}
    request_hash = fingerprint("POST", "/jobs", json.dumps(body).encode())
    # What a create killed between its INSERT and its UPDATE leaves behind, past the 60 s it may hold the key.
    database.run("INSERT INTO idempotency_keys (tenant, key, request_hash, created_at)"
                 " VALUES ('tenant-a', 'died', :h, now() - interval '2 minutes')", h=request_hash)
    retried = api.post("/jobs", body, headers={"Idempotency-Key": "died"})
    assert retried.status_code == 201, retried.body
    replayed = api.post("/jobs", body, headers={"Idempotency-Key": "died"})
    assert replayed.json_body == retried.json_body and replayed.headers["Idempotent-Replayed"] == "true"


def test_an_idempotency_key_in_progress_within_its_time_still_holds(database):
    request_hash = fingerprint("POST", "/jobs", b"{}")
    database.run("INSERT INTO idempotency_keys (tenant, key, request_hash) VALUES ('tenant-a', 'busy', :h)",
                 h=request_hash)
    store = IdempotencyStore(database, in_progress_ttl_s=60, wait_s=0.2)
    with pytest.raises(InvalidTransition):
        store.run("tenant-a", "busy", request_hash, lambda: Answer(201, {}))
