"""The functions' Lambda entry points, invoked with real API Gateway proxy events."""

from __future__ import annotations

import base64
import importlib.util
import json
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pytest
from conftest import API_KEY, EVENTS_DIR, OTHER_KEY, drop_database

from rtqcc.run.consumer import TimeBudget
from rtqcc.store.db import Database, connect_kwargs
from rtqcc.store.migrate import ensure_database, migrate

ROOT = Path(__file__).parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def function_env(base_settings, settings, s3_endpoint, monkeypatch):
    for name, value in {
        "REDIS_URL": base_settings.redis_url,
        "DATABASE_URL": base_settings.database_url,
        "S3_ENDPOINT_URL": s3_endpoint,
        "S3_BUCKET": base_settings.s3_bucket,
        "RTQCC_API_KEYS": f"{API_KEY}:tenant-a,{OTHER_KEY}:tenant-b",
        "RTQCC_STREAM_TOKEN_SECRET": base_settings.stream_token_secret,
        "RTQCC_FAKE_TOKENS_PER_S": "0",
        "RTQCC_CONSUMER_IDLE_EXIT_MS": "200",
        "RTQCC_CONSUMER_SAFETY_MARGIN_MS": "100",
    }.items():
        monkeypatch.setenv(name, value)


def _event(name: str) -> dict:
    return json.loads((EVENTS_DIR / name).read_text())


def test_api_gateway_events_drive_a_job_through_both_functions(function_env):
    api = _load(ROOT / "functions" / "api" / "app.py", "api_function")

    created = api.app(_event("create_job.json"), TimeBudget(30))
    assert created["statusCode"] == 201
    external_id = json.loads(created["body"])["externalId"]

    start = _event("create_job.json")
    start.update(path=f"/jobs/{external_id}/start", resource="/jobs/{external_id}/start", body=None,
                 isBase64Encoded=False, pathParameters={"external_id": external_id})
    start["requestContext"]["resourcePath"] = "/jobs/{external_id}/start"
    assert api.app(start, TimeBudget(30))["statusCode"] == 202

    # The consumer as both templates deploy it: Chalice's scheduled `app.consumer`, on EventBridge's event.
    summary = api.consumer(_event("scheduled_event.json"), TimeBudget(10))
    assert summary["completed"] == 1

    get = json.loads(json.dumps(_event("get_job.json")).replace("RTQCC-PLACEHOLDER", external_id))
    answer = api.app(get, TimeBudget(30))
    assert answer["statusCode"] == 200
    job = json.loads(answer["body"])
    assert job["title"] == "From an API Gateway event"
    assert job["status"] == "completed"
    assert job["progress"]["sections_done"] == 2


def test_an_unreachable_database_is_a_503_with_retry_after(function_env, monkeypatch):
    monkeypatch.setenv("DATABASE_URL", "postgresql://postgres@127.0.0.1:1/nowhere")
    api = _load(ROOT / "functions" / "api" / "app.py", "api_function_unreachable_db")
    event = _event("create_job.json")
    answer = api.app(event, TimeBudget(30))
    assert answer["statusCode"] == 503
    body = json.loads(answer["body"])
    assert body["error"]["code"] == "service_unavailable"
    assert "Postgres" in body["error"]["message"]
    assert answer["headers"]["Retry-After"] == "2"


@pytest.fixture
def database_without_a_column(base_settings) -> Iterator[str]:
    """A database of this run's own, migrated, then missing `jobs.metadata`: the schema a handler
    meets when a deploy ships code ahead of its migration. Its URL; dropped afterwards."""
    name = connect_kwargs(base_settings.database_url)["database"] + "_no_metadata"
    url = urlsplit(base_settings.database_url)._replace(path=f"/{name}").geturl()
    ensure_database(url)
    db = Database(url)
    try:
        migrate(db)
        db.run("ALTER TABLE jobs DROP COLUMN metadata")
    finally:
        db.close()
    try:
        yield url
    finally:
        drop_database(url)


def test_a_handler_bug_is_a_generic_500_without_a_traceback_and_the_traceback_is_logged(
        function_env, database_without_a_column, monkeypatch, capsys):
    monkeypatch.setenv("DATABASE_URL", database_without_a_column)
    api = _load(ROOT / "functions" / "api" / "app.py", "api_function_with_a_bug")
    capsys.readouterr()
    answer = api.app(_event("create_job.json"), TimeBudget(30))

    assert answer["statusCode"] == 500
    body = json.loads(answer["body"])
    assert list(body) == ["error"] and body["error"]["code"] == "internal_error" and body["error"]["message"]
    for leak in ("Traceback", "metadata", "INSERT", "does not exist", "127.0.0.1"):
        assert leak not in answer["body"], f"the 500 answer shows {leak!r}: {answer['body']}"
    logged = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    [error] = [record for record in logged if record.get("level") == "ERROR"]
    assert "POST /jobs" in error["message"]
    assert "Traceback (most recent call last)" in error["exc_info"]
    assert 'column "metadata" of relation "jobs" does not exist' in error["exc_info"]


def test_the_sample_create_event_body_is_what_it_claims(function_env):
    body = json.loads(base64.b64decode(_event("create_job.json")["body"]))
    assert body == {"title": "From an API Gateway event", "brief": "Prove the Lambda entry point works.",
                    "section_count": 2}


@pytest.mark.parametrize("secret, complaint", [
    (None, "RTQCC_STREAM_TOKEN_SECRET must be set"),
    ("too-short-3f9a", "at least 32 bytes"),
    ("CHANGE-ME-CHANGE-ME-CHANGE-ME-CHANGE-ME", "placeholder"),
])
def test_a_serving_function_without_a_real_stream_token_secret_serves_nothing(function_env, monkeypatch, capsys,
                                                                              secret, complaint):
    if secret is None:
        monkeypatch.delenv("RTQCC_STREAM_TOKEN_SECRET")
    else:
        monkeypatch.setenv("RTQCC_STREAM_TOKEN_SECRET", secret)
    api = _load(ROOT / "functions" / "api" / "app.py", "api_function_without_secret")
    answer = api.app(_event("create_job.json"), TimeBudget(30))
    assert answer["statusCode"] == 500 and "RTQCC_STREAM_TOKEN_SECRET" not in answer["body"]
    stream = _load(ROOT / "functions" / "stream" / "stream_function.py", "stream_function_without_secret")
    assert stream.handler({"pathParameters": {"external_id": "RTQCC-01J00000000000000000000000"}}, None).status == 500
    assert complaint in capsys.readouterr().err  # the operator is told which variable to set (JSON logs)


def test_production_refuses_the_development_key(function_env, monkeypatch, capsys):
    monkeypatch.setenv("RTQCC_DEV_API_KEY", "dev-a-key-someone-could-guess")
    api = _load(ROOT / "functions" / "api" / "app.py", "api_function_dev_key")
    assert api.app(_event("create_job.json"), TimeBudget(30))["statusCode"] == 500
    assert "RTQCC_DEV_API_KEY is for the local stack" in capsys.readouterr().err
    monkeypatch.setenv("RTQCC_ENV", "local")
    api = _load(ROOT / "functions" / "api" / "app.py", "api_function_local")
    assert api.app(_event("create_job.json"), TimeBudget(30))["statusCode"] == 201
