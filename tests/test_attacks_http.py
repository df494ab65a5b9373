"""Attacks on the HTTP front of the gateways, over real sockets: `rtqcc up`'s server (the
emulator's Starlette app under uvicorn, in this process) and the container gateway
(`rtqcc serve` run as the container runs it, in processes of its own).

Each test is an attack that worked before the front was hardened: the page handing out the dev
key to any Host, a chunked body buffered whole, `%2F` turned into a separator, X-Forwarded-For
believed from anyone, stream tokens in the access log, one tenant's streams starving everyone
(threads, Redis connections, stream slots), and a streaming function URL open to every origin."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import select
import socket
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from conftest import API_KEY, OTHER_KEY, job_events, wait_for

from rtqcc.bus.events import stream_id_tuple
from rtqcc_emulator.client import RtqccClient

ROOT = Path(__file__).resolve().parents[1]
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT_S = 30.0  # the bound of every wait


# ---------------------------------------------------------------- helpers

def _create(base_url: str, key: str = API_KEY, **fields) -> str:
    answer = httpx.post(f"{base_url}/jobs", json={"title": "t", "brief": "b", **fields},
                        headers={"Authorization": f"Bearer {key}"}, timeout=10)
    assert answer.status_code == 201, answer.text
    return answer.json()["externalId"]


@dataclass
class RawStream:
    """One SSE connection on asyncio streams: many can be held open at once without a thread each."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    status: int
    received: bytearray = field(default_factory=bytearray)
    closed: bool = False

    def count(self, marker: bytes) -> int:
        return self.received.count(marker)

    async def read_until(self, marker: bytes, *, times: int = 1) -> None:
        async def read() -> None:
            while self.count(marker) < times:
                chunk = await self.reader.read(65536)
                if not chunk:
                    self.closed = True
                    raise AssertionError(f"the stream ended before {marker!r}: {bytes(self.received[-500:])!r}")
                self.received += chunk
        await asyncio.wait_for(read(), WAIT_S)

    async def keep_reading(self) -> None:
        """Read until the server ends the stream (then `closed`), or until cancelled."""
        while chunk := await self.reader.read(65536):
            self.received += chunk
        self.closed = True

    def close(self) -> None:
        self.writer.close()


async def open_raw_stream(port: int, path: str, key: str = API_KEY) -> RawStream:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {key}\r\n"
                 f"Accept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), WAIT_S)
    return RawStream(reader, writer, status=int(head.split(b" ", 2)[1]))


# ---------------------------------------------------------------- the page and the hosts (issue 10, item 5)

EVIL_HOST = "rebound.attacker.example"


def test_the_page_embeds_no_key_and_a_rebinding_host_gets_nothing(start_gateway):
    running = start_gateway()
    port = urlsplit(running.base_url).port
    page = httpx.get(running.base_url + "/")
    assert page.status_code == 200
    for path in ("/", "/static/app.js"):
        assert API_KEY not in httpx.get(running.base_url + path).text, f"{path} gives away the API key"

    # A DNS-rebinding page reaches 127.0.0.1 under its own name: nothing answers it, not even with a key.
    for path in ("/", "/static/app.js", "/jobs"):
        refused = httpx.get(running.base_url + path, headers={**AUTH, "Host": f"{EVIL_HOST}:{port}"})
        assert refused.status_code == 400, (path, refused.status_code, refused.text[:200])
        assert refused.json()["error"]["code"] == "host_not_allowed"
        assert API_KEY not in refused.text and "RTQCC" not in refused.text.replace("RTQCC_ALLOWED_HOSTS", "")
    for host in ("127.0.0.1", f"127.0.0.1:{port}", "localhost", f"localhost:{port}", f"[::1]:{port}", "LOCALHOST"):
        assert httpx.get(running.base_url + "/jobs", headers={**AUTH, "Host": host}).status_code == 200, host
    for host in (f"{EVIL_HOST}@127.0.0.1", "127.0.0.1.attacker.example", "", "localhost:99999"):
        assert httpx.get(running.base_url + "/", headers={"Host": host}).status_code == 400, host


def test_every_answer_carries_csp_nosniff_and_no_referrer_and_the_page_has_no_inline_code(start_gateway):
    running = start_gateway()
    page = httpx.get(running.base_url + "/")
    assert not re.search(r"<script(?![^>]*\bsrc=)", page.text), "an inline script: CSP would block it"
    assert "<style" not in page.text and " style=" not in page.text, "inline style: CSP would block it"
    answers = [page, httpx.get(running.base_url + "/static/app.js"), httpx.get(running.base_url + "/jobs", headers=AUTH),
               httpx.get(running.base_url + "/jobs"), httpx.get(running.base_url + "/no/such/route"),
               httpx.get(running.base_url + "/", headers={"Host": EVIL_HOST})]
    for answer in answers:
        where = f"{answer.request.url.path} -> {answer.status_code}"
        assert answer.headers.get("content-security-policy") == "default-src 'self'; frame-ancestors 'none'", where
        assert answer.headers.get("x-content-type-options") == "nosniff", where
        assert answer.headers.get("referrer-policy") == "no-referrer", where


def test_the_served_gateway_answers_configured_hosts_only_and_probes_from_any(served_gateway):
    gateway = served_gateway(RTQCC_ALLOWED_HOSTS="api.example.test,*.tenants.example.test")
    for host, expected in (("api.example.test", 200), ("acme.tenants.example.test:443", 200), ("localhost:8080", 200),
                           (EVIL_HOST, 400), ("example.test", 400), ("tenants.example.test", 400)):
        answer = httpx.get(gateway.base_url + "/jobs", headers={**AUTH, "Host": host})
        assert answer.status_code == expected, (host, answer.status_code, answer.text[:200])
    # The kubelet probes with the pod's IP as Host.
    assert httpx.get(gateway.base_url + "/healthz", headers={"Host": "10.1.2.3:8080"}).json() == {"status": "ok"}
    assert httpx.get(gateway.base_url + "/readyz", headers={"Host": "10.1.2.3:8080"}).status_code == 200


# ---------------------------------------------------------------- bodies counted as they arrive (item 6)

def _send_chunked(port: int, total: int, piece: int = 64 * 1024) -> tuple[int, bytes]:
    """POST /jobs with a chunked body of `total` bytes and no auth, stopping when the server
    answers or hangs up; how much was sent, and what came back."""
    sent, answer = 0, b""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(b"POST /jobs HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n" % piece + b" " * piece + b"\r\n"
        try:
            while sent < total and not select.select([sock], [], [], 0)[0]:
                sock.sendall(chunk)
                sent += piece
            if sent >= total:
                sock.sendall(b"0\r\n\r\n")
            while data := sock.recv(65536):
                answer += data
        except (BrokenPipeError, ConnectionResetError):
            pass
    return sent, answer


def test_a_chunked_body_is_refused_at_the_limit_not_buffered_whole(start_gateway):
    limit = 64 * 1024
    running = start_gateway(max_request_bytes=limit)
    total = 256 * 1024 * 1024
    sent, answer = _send_chunked(urlsplit(running.base_url).port, total)
    # The server stopped taking the body soon after the limit (what the sockets buffer aside),
    # instead of reading all of it into memory first.
    assert sent < total // 8, f"the server read {sent} of {total} bytes of a body over its {limit}-byte limit"
    if answer:  # the answer may be lost to the reset that a close with unread data sends
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 413"), head
        assert json.loads(body) == {"message": "Request Too Long"}


def test_a_chunked_body_just_over_the_limit_gets_the_gateways_413(start_gateway):
    running = start_gateway(max_request_bytes=4096)
    body = b"{" + b" " * 8192 + b"}"
    answer = httpx.post(running.base_url + "/jobs", content=iter([body[:4000], body[4000:]]), headers=AUTH)
    assert answer.status_code == 413
    assert answer.json() == {"message": "Request Too Long"}


# ---------------------------------------------------------------- %2F is no separator (item 11)

@pytest.mark.parametrize("which", ["rtqcc-up", "container"])
def test_an_encoded_slash_stays_inside_its_path_parameter(which, start_gateway, served_gateway):
    base_url = start_gateway().base_url if which == "rtqcc-up" else served_gateway().base_url
    external_id = _create(base_url, outline=[{"title": "One", "brief": "b"}])
    # As API Gateway: the path is /jobs/{external_id}, with external_id "<id>/stream" (decoded).
    with httpx.stream("GET", f"{base_url}/jobs/{external_id}%2Fstream", headers=AUTH, timeout=10) as answer:
        assert not answer.headers.get("content-type", "").startswith("text/event-stream"), "reached the stream route"
        answer.read()
    assert answer.status_code == 404, (answer.status_code, answer.text[:300])
    error = answer.json()["error"]
    assert error["code"] == "job_not_found" and f"{external_id}/stream" in error["message"], error
    # POST /jobs/{external_id} is no route at all: API Gateway's own 403, and the job is not started.
    answer = httpx.post(f"{base_url}/jobs/{external_id}%2Fstart", headers=AUTH, timeout=10)
    assert answer.status_code == 403 and answer.json() == {"message": "Missing Authentication Token"}
    assert httpx.get(f"{base_url}/jobs/{external_id}", headers=AUTH).json()["status"] == "created"
    # An encoded character that is not a slash still names the route it spells.
    assert httpx.get(f"{base_url}/jobs/{external_id}/%73ections/0", headers=AUTH).status_code == 200


# ---------------------------------------------------------------- X-Forwarded-For (item 12)

def _bad_key_statuses(base_url: str, forwarded_for: list[str]) -> list[int]:
    return [httpx.get(f"{base_url}/jobs", headers={"Authorization": "Bearer not-a-key", "X-Forwarded-For": address},
                      timeout=10).status_code for address in forwarded_for]


def test_x_forwarded_for_from_an_untrusted_client_cannot_dodge_the_failed_auth_throttle(served_gateway):
    gateway = served_gateway(RTQCC_AUTH_FAILURES_PER_MIN="3")
    # Each guess claims another address; the gateway must see the one the connection comes from.
    statuses = _bad_key_statuses(gateway.base_url, [f"203.0.113.{n}" for n in range(1, 7)])
    assert statuses[:3] == [401, 401, 401] and 429 in statuses[3:], statuses


def test_x_forwarded_for_is_believed_from_a_configured_proxy(served_gateway):
    gateway = served_gateway(RTQCC_AUTH_FAILURES_PER_MIN="3", RTQCC_TRUSTED_PROXIES="127.0.0.0/8")
    # Behind a trusted proxy each client is counted on its own...
    assert _bad_key_statuses(gateway.base_url, [f"203.0.113.{n}" for n in range(1, 7)]) == [401] * 6
    # ...and one client is still throttled.
    statuses = _bad_key_statuses(gateway.base_url, ["198.51.100.9"] * 5)
    assert statuses[:3] == [401, 401, 401] and 429 in statuses[3:], statuses


def test_the_streaming_function_url_allows_configured_origins_only():
    template = json.loads((ROOT / "infra" / "cloudformation" / "extra.json").read_text())
    cors = template["Resources"]["StreamFunction"]["Properties"]["FunctionUrlConfig"]["Cors"]
    assert cors["AllowOrigins"] == {"Ref": "StreamAllowedOrigins"}, cors["AllowOrigins"]
    parameter = template["Parameters"]["StreamAllowedOrigins"]
    assert "Default" not in parameter, "no origin is allowed unless the operator names it"
    pattern = re.compile(parameter["AllowedPattern"])
    assert pattern.fullmatch("https://app.example.com") and pattern.fullmatch("http://localhost:5173")
    for wildcard in ("*", "https://*.example.com", "https://app.example.com/path", "null"):
        assert not pattern.fullmatch(wildcard), wildcard
    terraform = json.loads((ROOT / "infra" / "terraform" / "rtqcc.tf.json").read_text())
    url_cors = terraform["resource"]["aws_lambda_function_url"]["stream"]["cors"]
    assert url_cors["allow_origins"] == "${var.stream_allowed_origins}"
    assert "default" not in terraform["variable"]["stream_allowed_origins"]


# ---------------------------------------------------------------- no token in any log (item 1)

class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _stream_token(base_url: str, external_id: str) -> str:
    answer = httpx.post(f"{base_url}/jobs/{external_id}/stream-token", headers=AUTH, timeout=10)
    assert answer.status_code in (200, 201), answer.text
    return answer.json()["token"]


def _open_with_token(base_url: str, external_id: str, token: str) -> None:
    with httpx.stream("GET", f"{base_url}/jobs/{external_id}/stream",
                      params={"access_token": token, "lastEventId": "0-0"}, timeout=10) as answer:
        assert answer.status_code == 200
        for line in answer.iter_lines():
            if line.startswith("event: "):  # its first event: the request is in the log by now
                break


def test_rtqcc_ups_access_log_shows_no_stream_token(services, start_gateway):
    from rtqcc_emulator.gateway import build_gateway
    from rtqcc_emulator.server import ServerThread, build_http_app

    gateway = build_gateway(services)
    server = ServerThread(build_http_app(gateway, services.settings), port=0)
    # With the access log on (uvicorn's own format), as someone debugging would turn it on.
    access = logging.getLogger("uvicorn.access")
    level, records = access.level, _Records()
    access.setLevel(logging.INFO)
    access.addHandler(records)
    try:
        server.start()
        external_id = _create(server.base_url)
        token = _stream_token(server.base_url, external_id)
        _open_with_token(server.base_url, external_id, token)
        wait_for(lambda: any("/stream?" in line for line in records.lines), timeout_s=WAIT_S,
                 what="the stream request in the access log")
    finally:
        access.removeHandler(records)
        access.setLevel(level)
        server.stop()
        gateway.close()
    logged = "\n".join(records.lines)
    assert token not in logged and token[:16] not in logged, "a stream token reached the access log"
    assert "access_token=***&lastEventId=0-0" in logged


def test_the_served_gateways_log_shows_no_stream_token(served_gateway):
    gateway = served_gateway()
    external_id = _create(gateway.base_url)
    token = _stream_token(gateway.base_url, external_id)
    _open_with_token(gateway.base_url, external_id, token)
    wait_for(lambda: "/stream?" in gateway.log(), timeout_s=WAIT_S, what="the stream request in the gateway's log")
    gateway.stop()
    logged = gateway.log()
    assert token not in logged and token[:16] not in logged, "a stream token reached the container gateway's log"


# ---------------------------------------------------------------- no tenant starves the others (item 3)

STREAMS = 200


def test_a_flood_of_streams_holds_no_thread_each_and_starves_neither_health_nor_api_nor_others(
        served_gateway, start_consumer, redis_client):
    gateway = served_gateway(RTQCC_MAX_STREAMS_PER_TENANT="1000", RTQCC_MAX_STREAMS_PER_KEY="1000")
    idle_job = _create(gateway.base_url)

    async def attack() -> None:
        first = await open_raw_stream(gateway.port, f"/jobs/{idle_job}/stream")
        await first.read_until(b"event: snapshot")
        before = gateway.threads()
        crowd = [first]
        try:
            for batch in range(0, STREAMS - 1, 50):
                opened = await asyncio.gather(*(open_raw_stream(gateway.port, f"/jobs/{idle_job}/stream")
                                                for _ in range(min(50, STREAMS - 1 - batch))))
                crowd += opened
            assert [s.status for s in crowd] == [200] * STREAMS
            await asyncio.gather(*(s.read_until(b"event: snapshot") for s in crowd))
            grown = gateway.threads() - before
            assert grown < STREAMS // 2, f"{STREAMS} open streams took {grown} more threads: a thread per stream"

            # Meanwhile liveness, the API and another tenant's live stream all still answer.
            health = await asyncio.to_thread(httpx.get, gateway.base_url + "/healthz", timeout=10)
            assert health.json() == {"status": "ok"}
            other_job = await asyncio.to_thread(_create, gateway.base_url, OTHER_KEY, section_count=2,
                                                params={"max_tokens_per_section": 40})
            started = await asyncio.to_thread(httpx.post, f"{gateway.base_url}/jobs/{other_job}/start",
                                              headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=10)
            assert started.status_code == 202, started.text
            start_consumer(fake_tokens_per_s=400.0)

            def watch() -> list:
                with RtqccClient(gateway.base_url, OTHER_KEY, timeout_s=WAIT_S) as client:
                    return [(e.id, e.type, e.data) for e in client.events(other_job)]

            seen = await asyncio.wait_for(asyncio.to_thread(watch), WAIT_S * 2)
            published = [(e["id"], e["event"], e["data"]) for e in job_events(redis_client, other_job)]
            assert seen[0][1] == "snapshot" and seen[-1][2] == {"status": "completed"}
            assert seen[1:] == [e for e in published if stream_id_tuple(e[0]) > stream_id_tuple(seen[0][0])]
            assert not any(s.closed for s in crowd)
        finally:
            for s in crowd:
                s.close()

    asyncio.run(attack())


@pytest.fixture
def small_hub_gateway(services):
    """`rtqcc up`'s HTTP app whose event hub has only 8 Redis connections, on a free port."""
    from rtqcc.streaming.hub import EventHub
    from rtqcc_emulator.gateway import build_gateway
    from rtqcc_emulator.server import ServerThread, create_http_app

    gateway = build_gateway(services)
    hub = EventHub(services.settings.redis_url, max_connections=8)
    server = ServerThread(create_http_app(gateway, hub=hub), port=0).start()
    try:
        yield server
    finally:
        server.stop()
        gateway.close()


def test_one_tenant_following_many_jobs_cannot_exhaust_the_hubs_redis_connections(small_hub_gateway, start_consumer,
                                                                                   redis_client):
    base_url = small_hub_gateway.base_url
    port = urlsplit(base_url).port
    followed = [_create(base_url) for _ in range(30)]  # many more feeds than the hub has connections
    problems = _Records()
    problems.setLevel(logging.WARNING)
    watched = [logging.getLogger(name) for name in ("rtqcc_emulator", "uvicorn.error")]
    for logger in watched:
        logger.addHandler(problems)

    async def attack() -> None:
        crowd = await asyncio.gather(*(open_raw_stream(port, f"/jobs/{job}/stream") for job in followed))
        readers = []
        try:
            assert [s.status for s in crowd] == [200] * len(crowd)
            # Every stream got past its catch-up: a keep-alive comes only after it.
            await asyncio.gather(*(s.read_until(b": keep-alive") for s in crowd))
            readers = [asyncio.create_task(s.keep_reading()) for s in crowd]

            other_job = await asyncio.to_thread(_create, base_url, OTHER_KEY, section_count=2,
                                                params={"max_tokens_per_section": 40})
            started = await asyncio.to_thread(httpx.post, f"{base_url}/jobs/{other_job}/start",
                                              headers={"Authorization": f"Bearer {OTHER_KEY}"}, timeout=10)
            assert started.status_code == 202, started.text
            start_consumer(fake_tokens_per_s=400.0)

            def watch() -> list:
                with RtqccClient(base_url, OTHER_KEY, timeout_s=WAIT_S) as client:
                    return [(e.id, e.type, e.data) for e in client.events(other_job)]

            seen = await asyncio.wait_for(asyncio.to_thread(watch), WAIT_S * 2)
            published = [(e["id"], e["event"], e["data"]) for e in job_events(redis_client, other_job)]
            assert seen[0][1] == "snapshot"
            assert seen[1:] == [e for e in published if stream_id_tuple(e[0]) > stream_id_tuple(seen[0][0])]
            assert seen[-1][1] == "done"

            # The crowd's streams are all still open and still beating.
            beats = [s.count(b": keep-alive") for s in crowd]

            async def all_beat_again() -> None:
                while any(s.count(b": keep-alive") <= n and not s.closed for s, n in zip(crowd, beats)):
                    await asyncio.sleep(0.05)
            await asyncio.wait_for(all_beat_again(), WAIT_S)
            assert not any(s.closed for s in crowd), "some streams were closed under the crowd"
        finally:
            for task in readers:
                task.cancel()
            for s in crowd:
                s.close()

    try:
        asyncio.run(attack())
    finally:
        for logger in watched:
            logger.removeHandler(problems)
    assert not problems.lines, problems.lines[:5]


def test_a_stream_the_client_left_gives_its_slot_back_at_once(make_services, start_gateway):
    running = start_gateway(services_override=make_services(max_streams_per_key=2))
    port = urlsplit(running.base_url).port
    job = _create(running.base_url)

    async def attack() -> None:
        pair = [await open_raw_stream(port, f"/jobs/{job}/stream") for _ in range(2)]
        assert [s.status for s in pair] == [200, 200]
        await asyncio.gather(*(s.read_until(b"event: snapshot") for s in pair))
        third = await open_raw_stream(port, f"/jobs/{job}/stream")
        assert third.status == 429  # the cap holds while both are open
        third.close()
        for s in pair:
            s.close()

        async def reopens() -> RawStream:
            while True:
                again = await open_raw_stream(port, f"/jobs/{job}/stream")
                if again.status == 200:
                    return again
                again.close()
                await asyncio.sleep(0.05)

        # Well before the slots would expire by themselves (a minute): the gateway released them.
        again = await asyncio.wait_for(reopens(), 20)
        await again.read_until(b"event: snapshot")
        again.close()

    asyncio.run(attack())
