"""The gateway emulator as a pure object: request in, response out, no sockets."""

from __future__ import annotations

import base64
import json

import pytest
from conftest import API_KEY

from rtqcc_emulator.gateway import Gateway, GatewayConfig, GatewayRequest, build_gateway

AUTH = [("authorization", f"Bearer {API_KEY}")]
JSON = [("content-type", "application/json")]


@pytest.fixture
def make_gateway(services):
    made = []

    def make(**config) -> Gateway:
        made.append(build_gateway(services, GatewayConfig(**config)))
        return made[-1]

    yield make
    for gateway in made:
        gateway.close()


def test_the_event_has_the_api_gateway_rest_shape(make_gateway):
    gateway = make_gateway()
    request = GatewayRequest(
        method="GET", path="/jobs/RTQCC-01ABCDEFGHJKMNPQRSTVWXYZ00/sections/2",
        query=[("tag", "a"), ("tag", "b"), ("limit", "5")],
        headers=[("x-trace", "1"), ("x-trace", "2"), ("accept", "*/*")],
    )
    event = gateway.build_event(request, "/jobs/{external_id}/sections/{index}",
                                {"external_id": "RTQCC-01ABCDEFGHJKMNPQRSTVWXYZ00", "index": "2"})
    assert event["resource"] == "/jobs/{external_id}/sections/{index}"
    assert event["pathParameters"] == {"external_id": "RTQCC-01ABCDEFGHJKMNPQRSTVWXYZ00", "index": "2"}
    assert event["queryStringParameters"] == {"tag": "b", "limit": "5"}
    assert event["multiValueQueryStringParameters"] == {"tag": ["a", "b"], "limit": ["5"]}
    assert event["headers"]["X-Trace"] == "2"
    assert event["multiValueHeaders"]["X-Trace"] == ["1", "2"]
    context = event["requestContext"]
    assert context["resourcePath"] == event["resource"]
    assert context["stage"] == "api" and context["path"].startswith("/api/jobs/")
    assert context["requestId"] and context["identity"]["sourceIp"] == "127.0.0.1"
    assert event["body"] is None and event["isBase64Encoded"] is False


def test_a_binary_body_is_base64_encoded(make_gateway):
    gateway = make_gateway()
    raw = bytes(range(256))
    event = gateway.build_event(GatewayRequest(method="POST", path="/jobs", body=raw,
                                               headers=[("content-type", "application/octet-stream")]), "/jobs", {})
    assert event["isBase64Encoded"] is True
    assert base64.b64decode(event["body"]) == raw


def test_a_job_runs_through_the_gateway_without_sockets(make_gateway, run_consumer):
    gateway = make_gateway()
    created = gateway.handle(GatewayRequest(method="POST", path="/jobs", headers=AUTH + JSON,
                                            body=json.dumps({"title": "T", "brief": "B", "section_count": 2}).encode()))
    assert created.status == 201
    external_id = created.json()["externalId"]
    assert gateway.handle(GatewayRequest(method="POST", path=f"/jobs/{external_id}/start", headers=AUTH)).status == 202
    run_consumer()
    job = gateway.handle(GatewayRequest(method="GET", path=f"/jobs/{external_id}", headers=AUTH)).json()
    assert job["status"] == "completed"
    manuscript = gateway.handle(GatewayRequest(method="GET", path=f"/jobs/{external_id}/manuscript", headers=AUTH))
    assert manuscript.headers["Content-Type"].startswith("text/markdown")
    assert manuscript.body.decode().startswith("# T\n")


@pytest.mark.parametrize("method, path", [("GET", "/nowhere"), ("DELETE", "/jobs"), ("GET", "/jobs/a/b/c/d")])
def test_unknown_routes_get_api_gatewayss_missing_token_answer(make_gateway, method, path):
    answer = make_gateway().handle(GatewayRequest(method=method, path=path, headers=AUTH))
    assert answer.status == 403
    assert answer.json() == {"message": "Missing Authentication Token"}


def test_a_handler_slower_than_the_integration_timeout_gets_a_504(make_gateway, api, services):
    external_id = api.create()
    gateway = make_gateway(streaming=False, integration_timeout_s=0.3)
    first = gateway.handle(GatewayRequest(method="GET", path=f"/jobs/{external_id}/stream", headers=AUTH))
    last_id = [line for line in first.body.decode().splitlines() if line.startswith("id: ")][0][4:]
    # An idle long poll waits sse_long_poll_s (1 s in tests): longer than the 0.3 s integration timeout.
    answer = gateway.handle(GatewayRequest(method="GET", path=f"/jobs/{external_id}/stream",
                                           headers=AUTH + [("last-event-id", last_id)]))
    assert answer.status == 504
    assert answer.json() == {"message": "Endpoint request timed out"}


def test_an_oversize_request_gets_a_413(make_gateway):
    gateway = make_gateway(max_request_bytes=1000)
    answer = gateway.handle(GatewayRequest(method="POST", path="/jobs", headers=AUTH + JSON, body=b"x" * 1001))
    assert answer.status == 413
    assert answer.json() == {"message": "Request Too Long"}


def test_streaming_mode_answers_the_stream_route_with_a_body_iterator(make_gateway, api):
    external_id = api.create()
    streaming = make_gateway().handle(GatewayRequest(method="GET", path=f"/jobs/{external_id}/stream", headers=AUTH))
    assert streaming.status == 200 and streaming.stream is not None
    assert next(streaming.stream).startswith(b"retry: ")
    assert b"event: snapshot" in next(streaming.stream)
    streaming.stream.close()
    buffered = make_gateway(streaming=False).handle(
        GatewayRequest(method="GET", path=f"/jobs/{external_id}/stream", headers=AUTH))
    assert buffered.stream is None and b"event: snapshot" in buffered.body


def test_errors_of_the_streaming_function_are_json(make_gateway, api):
    external_id = api.create()
    answer = make_gateway().handle(GatewayRequest(method="GET", path=f"/jobs/{external_id}/stream"))
    assert answer.status == 401
    assert json.loads(b"".join(answer.stream))["error"]["code"] == "unauthorized"


def test_paths_are_matched_segment_by_segment_on_the_encoded_path_as_api_gateway_does(make_gateway, api):
    gateway = make_gateway()
    stream = gateway.match("/jobs/RTQCC-a%2Fb/stream")
    assert (stream.resource, stream.params) == ("/jobs/{external_id}/stream", {"external_id": "RTQCC-a/b"})
    slashed = gateway.match("/jobs/RTQCC-a%2Fstream")
    assert (slashed.resource, slashed.params) == ("/jobs/{external_id}", {"external_id": "RTQCC-a/stream"})
    assert gateway.match("/jobs/RTQCC-a/%73tream/").resource == "/jobs/{external_id}/stream"
    assert gateway.match("/jobs//stream") is None  # an empty segment is no parameter
    assert gateway.match("/jobs/%F0%9F%98%80").params == {"external_id": "\U0001F600"}

    external_id = api.create()
    request = GatewayRequest(method="GET", path=f"/jobs/{external_id}%2Fstream", headers=AUTH)
    answer = gateway.handle(request)
    assert answer.stream is None and answer.status == 404
    assert f"{external_id}/stream" in answer.json()["error"]["message"]
    event = gateway.build_event(request, "/jobs/{external_id}", gateway.match(request.path).params)
    assert event["path"] == f"/jobs/{external_id}%2Fstream"  # REST keeps the path as sent
    assert event["pathParameters"] == {"external_id": f"{external_id}/stream"}


def test_liveness_is_answered_on_the_calling_thread_without_the_pools(make_gateway):
    gateway = make_gateway()
    gateway.close()  # no worker is left: only an inline call can answer
    answer = gateway.handle_inline(GatewayRequest(method="GET", path="/healthz"))
    assert answer.status == 200 and answer.json() == {"status": "ok"}
