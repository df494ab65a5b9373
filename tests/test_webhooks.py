"""Signed webhooks: endpoints per tenant, the outbox written with each state change, and delivery
by the consumer side to a real HTTP receiver on 127.0.0.1: signatures, retries with the same
webhook-id, timeouts, redirects not followed, and private targets refused before connecting."""

from __future__ import annotations

import ipaddress
import json
import threading
import time
from http.server import BaseHTTPRequestHandler
from typing import Iterator

import pytest
import urllib3.util.connection
from conftest import OTHER_KEY, LoopbackHTTPServer, section_texts, send_answer, wait_for
from standardwebhooks import Webhook
from standardwebhooks.webhooks import WebhookVerificationError

from rtqcc.delivery.targets import TargetPolicy, TargetRefused, check_registration, checked_addresses, parse_target
from rtqcc.errors import ValidationFailed
from rtqcc.run.webhook_sender import SenderThread, WebhookSender

LOOPBACK = {"webhook_allowed_networks": ("127.0.0.0/8",)}
QUICK = {**LOOPBACK, "webhook_backoff_s": 0.01, "webhook_backoff_max_s": 0.05, "webhook_poll_s": 0.02,
         "webhook_timeout_s": 2.0}


def quick(**changes) -> dict:
    return {**QUICK, **changes}


class Receiver:
    """A real HTTP server on 127.0.0.1 (port 0) that records what it is sent and answers with the
    statuses queued in `answers` (then 200); `hang` holds every answer until released."""

    def __init__(self):
        self.requests: list[dict] = []
        self.answers: list[int] = []
        self.hang = threading.Event()
        self.released = threading.Event()
        self._server = LoopbackHTTPServer(self._answer)
        self.url = self._server.url

    def _answer(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        self.requests.append({"path": request.path, "body": body.decode(),
                              "headers": {k.lower(): v for k, v in request.headers.items()}})
        if self.hang.is_set():
            self.released.wait(30)
            return
        status = self.answers.pop(0) if self.answers else 200
        redirect = {"Location": f"{self.url}/elsewhere"} if 300 <= status < 400 else {}
        send_answer(request, status, b"thanks" if status < 300 else b"not now", **redirect)

    def events(self) -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests]

    def stop(self) -> None:
        self.released.set()
        self._server.stop()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    running = Receiver()
    yield running
    running.stop()


@pytest.fixture
def send_webhooks(make_services):
    """A webhook sender on a thread of its own, as beside a consumer's drain; finished at teardown."""
    started: list[SenderThread] = []

    def start(services=None, **overrides) -> SenderThread:
        s = services or make_services(**quick(**overrides))
        sender = WebhookSender(s.webhooks, s.settings)
        started.append(SenderThread(sender, time.monotonic() + 60))
        return started[-1]

    yield start
    for thread in started:
        thread.finish()


def register(api, url: str, events=("job.completed",), **extra) -> dict:
    created = api.post("/webhooks", {"url": url, "events": list(events), **extra})
    assert created.status_code == 201, created.json_body
    return created.json_body


def deliveries(api, webhook_id: str, **params) -> list[dict]:
    query = "&".join(f"{k}={v}" for k, v in params.items())
    answer = api.get(f"/webhooks/{webhook_id}/deliveries" + (f"?{query}" if query else ""))
    assert answer.status_code == 200, answer.json_body
    return answer.json_body["deliveries"]


def verified(secret: str, request: dict) -> dict:
    return Webhook(secret).verify(request["body"], request["headers"])


def cancelled_job(api) -> str:
    """A job cancelled through the API: its job.cancelled delivery written by the same statement."""
    external_id = api.create(section_count=1)
    assert api.post(f"/jobs/{external_id}/cancel").status_code == 202
    return external_id


# ---- endpoints ---------------------------------------------------------------------------------

def test_an_endpoint_is_registered_listed_read_and_deleted_and_its_secret_is_shown_once(make_api, receiver):
    api, _ = make_api(**LOOPBACK)
    created = register(api, f"{receiver.url}/hooks", ["job.completed", "section.completed"], description="CI")
    assert created["id"].startswith("wh_") and created["secret"].startswith("whsec_")
    assert created["events"] == ["job.completed", "section.completed"] and created["job"] is None
    other = register(api, f"{receiver.url}/other")
    assert other["secret"] != created["secret"]

    listed = api.get("/webhooks").json_body["webhooks"]
    assert [w["id"] for w in listed] == [created["id"], other["id"]]
    one = api.get(f"/webhooks/{created['id']}").json_body
    assert one["description"] == "CI" and one["url"] == f"{receiver.url}/hooks"
    assert all("secret" not in w for w in listed) and "secret" not in one
    assert created["secret"] not in json.dumps(listed) + json.dumps(one)

    assert api.client.http.delete(f"/webhooks/{created['id']}", headers=api.headers()).status_code == 204
    assert api.get(f"/webhooks/{created['id']}").status_code == 404
    assert [w["id"] for w in api.get("/webhooks").json_body["webhooks"]] == [other["id"]]


def test_another_tenant_can_neither_see_nor_touch_an_endpoint(make_api, receiver):
    api, _ = make_api(**LOOPBACK)
    mine = register(api, receiver.url)
    theirs = api.as_key(OTHER_KEY)
    assert theirs.get("/webhooks").json_body == {"webhooks": []}
    for answer in (theirs.get(f"/webhooks/{mine['id']}"),
                   theirs.client.http.delete(f"/webhooks/{mine['id']}", headers=theirs.headers()),
                   theirs.post(f"/webhooks/{mine['id']}/rotate-secret"),
                   theirs.get(f"/webhooks/{mine['id']}/deliveries")):
        assert answer.status_code == 404, answer.json_body
        assert answer.json_body["error"]["code"] == "not_found"
    assert api.get(f"/webhooks/{mine['id']}").status_code == 200


@pytest.mark.parametrize(("body", "says"), [
    ({"url": "ftp://hooks.example.com/x", "events": ["job.completed"]}, "https:// or http://"),
    ({"url": "https://user:pw@hooks.example.com/x", "events": ["job.completed"]}, "credentials"),
    ({"url": "https:///x", "events": ["job.completed"]}, "must name a host"),
    ({"url": "https://bad_host!/x", "events": ["job.completed"]}, "not a valid host name"),
    ({"url": "https://hooks.example.com/x#frag", "events": ["job.completed"]}, "fragment"),
    ({"url": "https://hooks.example.com/a b", "events": ["job.completed"]}, "spaces"),
    ({"url": "http://10.0.0.1/x", "events": ["job.completed"]}, "private"),
    ({"url": "http://169.254.169.254/latest/meta-data", "events": ["job.completed"]}, "link-local"),
    ({"url": "http://localhost:8080/x", "events": ["job.completed"]}, "loopback"),
    ({"url": "http://[::ffff:127.0.0.1]/x", "events": ["job.completed"]}, "refused"),
    ({"url": "https://hooks.example.com/x", "events": ["job.started"]}, "events.0"),
    ({"url": "https://hooks.example.com/x", "events": []}, "events"),
    ({"url": "https://hooks.example.com/x", "events": ["job.completed"], "secret": "mine"}, "unknown field"),
], ids=["scheme", "credentials", "no-host", "bad-host", "fragment", "space", "private", "metadata", "localhost",
        "mapped-loopback", "unknown-event", "no-events", "own-secret"])
def test_a_bad_url_or_event_is_a_clear_422(api, body, says):
    answer = api.post("/webhooks", body)
    assert answer.status_code == 422, answer.json_body
    assert answer.json_body["error"]["code"] == "validation_failed"
    assert says in answer.json_body["error"]["message"], answer.json_body


@pytest.mark.parametrize(("address", "refused"), [
    ("10.0.0.1", True), ("172.16.5.4", True), ("192.168.1.1", True), ("127.0.0.1", True), ("0.0.0.0", True),
    ("169.254.169.254", True), ("100.64.0.1", True), ("224.0.0.1", True), ("239.255.255.250", True),
    ("::1", True), ("fe80::1", True), ("fc00::1", True), ("ff02::1", True), ("::ffff:10.0.0.1", True),
    ("::ffff:169.254.169.254", True), ("2002:a00:1::1", True), ("64:ff9b::a9fe:a9fe", True),
    ("93.184.216.34", False), ("2606:4700::1111", False),
])
def test_the_address_policy_refuses_every_non_public_address(address, refused):
    policy = TargetPolicy()
    if refused:
        with pytest.raises(TargetRefused):
            policy.check(ipaddress.ip_address(address))
    else:
        policy.check(ipaddress.ip_address(address))


def test_an_allowed_network_opens_only_itself():
    policy = TargetPolicy(("127.0.0.0/8",))
    policy.check(ipaddress.ip_address("127.0.0.1"))
    policy.check(ipaddress.ip_address("::ffff:127.0.0.1"))  # the same host, mapped
    for other in ("10.0.0.1", "169.254.169.254", "::1"):
        with pytest.raises(TargetRefused):
            policy.check(ipaddress.ip_address(other))
    assert check_registration("http://127.0.0.1:9/x", policy)
    with pytest.raises(ValidationFailed):
        check_registration("http://10.0.0.1/x", policy)


def test_every_address_a_name_resolves_to_is_checked(receiver):
    target = parse_target("https://hooks.example.test/in")
    with pytest.raises(TargetRefused, match="10.0.0.1"):  # one private among public ones refuses the name
        checked_addresses(target, TargetPolicy(), lambda host, port: ["93.184.216.34", "10.0.0.1"])
    assert [str(a) for a in checked_addresses(target, TargetPolicy(), lambda host, port: ["93.184.216.34"])] == [
        "93.184.216.34"]


# ---- delivery -----------------------------------------------------------------------------------

def test_job_completed_arrives_signed_after_a_real_run(make_services, make_api, run_consumer, receiver):
    api, services = make_api(**QUICK)
    hook = register(api, f"{receiver.url}/in", ["job.completed", "section.completed"])
    external_id = api.create(section_count=2)
    api.post(f"/jobs/{external_id}/start")

    result = run_consumer(services=make_services(**QUICK))
    assert result.completed == 1 and result.webhook_attempts == 3

    # One batch is sent at once: the receiver may see them in any order.
    events = {(e["type"], e["data"].get("index")): e for e in (verified(hook["secret"], r) for r in receiver.requests)}
    assert sorted(events, key=str) == [("job.completed", None), ("section.completed", 0), ("section.completed", 1)]
    assert events["job.completed", None]["data"] == {"externalId": external_id, "title": "A field guide",
                                                     "status": "completed"}
    assert events["section.completed", 1]["data"] == {"externalId": external_id, "index": 1, "version": 1,
                                                      "chars": len(section_texts(api, external_id)[1])}
    (headers,) = [r["headers"] for r in receiver.requests if json.loads(r["body"])["type"] == "job.completed"]
    assert headers["webhook-id"].startswith("msg_") and headers["content-type"] == "application/json"
    assert abs(int(headers["webhook-timestamp"]) - time.time()) < 300  # verify() checks it too

    log = deliveries(api, hook["id"])
    assert [d["event"] for d in log] == ["job.completed", "section.completed", "section.completed"]
    assert log[0] | {"id": None, "last_attempt_at": None, "delivered_at": None, "created_at": None} == {
        "id": None, "event": "job.completed", "job": external_id, "status": "succeeded", "attempts": 1,
        "next_attempt_at": None, "last_attempt_at": None, "last_status_code": 200, "last_error": None,
        "last_response": "thanks", "delivered_at": None, "created_at": None}
    assert log[0]["id"] == headers["webhook-id"]


def test_an_endpoint_registered_while_a_job_runs_hears_every_section_completed_after(make_api, start_consumer,
                                                                                       database, receiver):
    paced = quick(fake_tokens_per_s=60.0)
    api, _ = make_api(**paced)
    external_id = api.create(section_count=3, params={"max_tokens_per_section": 40})
    api.post(f"/jobs/{external_id}/start")
    done = "SELECT COUNT(*)::int AS n FROM sections s JOIN jobs j ON j.id = s.job_id WHERE j.external_id = :e" \
           " AND s.status = 'done'"
    with start_consumer(budget_s=60, **paced) as consumer:
        wait_for(lambda: database.row(done, e=external_id)["n"] >= 1, timeout_s=20, interval_s=0.02,
                 what="the first section done")
        before = database.row(done, e=external_id)["n"]
        hook = register(api, f"{receiver.url}/in", ["section.completed"])
        after = database.row(done, e=external_id)["n"]
        wait_for(lambda: database.row("SELECT status FROM jobs WHERE external_id = :e", e=external_id)["status"]
                 == "completed", timeout_s=30, interval_s=0.05, what="the job's end")
    assert consumer.result.completed == 1
    heard = [d["event"] for d in deliveries(api, hook["id"])]
    assert set(heard) == {"section.completed"}  # none missed for want of asking again
    assert 3 - after <= len(heard) <= 3 - before


def test_a_receiver_failing_three_times_gets_the_event_four_times_with_one_webhook_id(make_api, receiver,
                                                                                        send_webhooks):
    api, services = make_api(**QUICK)
    hook = register(api, receiver.url, ["job.cancelled"])
    receiver.answers = [500, 502, 503]
    external_id = cancelled_job(api)

    send_webhooks(services)
    wait_for(lambda: deliveries(api, hook["id"])[0]["status"] == "succeeded", timeout_s=20, what="the 4th attempt")
    assert len(receiver.requests) == 4
    assert len({r["headers"]["webhook-id"] for r in receiver.requests}) == 1
    assert all(verified(hook["secret"], r)["data"]["externalId"] == external_id for r in receiver.requests)
    (log,) = deliveries(api, hook["id"])
    assert log["attempts"] == 4 and log["last_status_code"] == 200 and log["last_error"] is None


def test_a_failed_attempt_is_logged_and_retried_later_and_the_window_ends_it(make_api, receiver, send_webhooks):
    api, services = make_api(**quick(webhook_backoff_s=3600, webhook_backoff_max_s=3600))
    hook = register(api, receiver.url, ["job.cancelled"])
    receiver.answers = [500]
    cancelled_job(api)
    first_sender = send_webhooks(services)
    log = wait_for(lambda: [d for d in deliveries(api, hook["id"]) if d["attempts"] == 1 and d["last_status_code"]],
                   what="the first attempt")[0]
    assert log["status"] == "pending" and log["last_error"] == "answered 500" and log["last_response"] == "not now"
    assert log["next_attempt_at"] > log["last_attempt_at"]  # backed off, not retried at once
    assert len(receiver.requests) == 1

    first_sender.finish()

    # Past its retry window a failed attempt is final.
    api2, services2 = make_api(**quick(webhook_retry_for_s=0))
    receiver.answers = [500]
    cancelled_job(api2)
    send_webhooks(services2)
    wait_for(lambda: any(d["status"] == "failed" for d in deliveries(api2, hook["id"])), what="the delivery to fail")
    assert len(receiver.requests) == 2


def test_a_receiver_that_hangs_is_timed_out(make_api, receiver, send_webhooks):
    api, services = make_api(**quick(webhook_timeout_s=0.3, webhook_backoff_s=3600, webhook_backoff_max_s=3600))
    hook = register(api, receiver.url, ["job.cancelled"])
    receiver.hang.set()
    cancelled_job(api)
    send_webhooks(services)
    log = wait_for(lambda: [d for d in deliveries(api, hook["id"]) if d["last_error"]], what="the timeout")[0]
    assert log["last_error"] == "no answer within 0.3 s" and log["status"] == "pending"
    assert log["last_status_code"] is None and len(receiver.requests) == 1


def test_a_redirect_is_not_followed(make_api, receiver, send_webhooks):
    api, services = make_api(**quick(webhook_backoff_s=3600, webhook_backoff_max_s=3600))
    hook = register(api, f"{receiver.url}/in", ["job.cancelled"])
    receiver.answers = [302]
    cancelled_job(api)
    send_webhooks(services)
    log = wait_for(lambda: [d for d in deliveries(api, hook["id"]) if d["last_status_code"]], what="the attempt")[0]
    assert log["last_status_code"] == 302 and "redirects are not followed" in log["last_error"]
    assert log["status"] == "pending"
    assert [r["path"] for r in receiver.requests] == ["/in"]  # /elsewhere never asked


def test_private_targets_are_refused_at_delivery_before_any_connection(make_api, receiver, send_webhooks,
                                                                      monkeypatch):
    # Stored while the deployment allowed them (or resolving elsewhere then), refused when sent.
    api, _ = make_api(webhook_allowed_networks=("0.0.0.0/0", "::/0"))
    hooks = [register(api, url, ["job.cancelled"]) for url in
             ("http://10.0.0.1/hook", "http://169.254.169.254/latest/meta-data", f"{receiver.url}/loopback",
              "http://[::ffff:10.0.0.1]/mapped")]
    # A safety net, not the check under test: no connection may leave this machine whatever happens.
    connected = []
    real_connect = urllib3.util.connection.create_connection

    def loopback_only(address, *args, **kwargs):
        connected.append(address[0])
        if address[0] != "127.0.0.1":
            raise OSError(f"the test refuses a connection to {address[0]}")
        return real_connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", loopback_only)
    cancelled_job(api)
    send_webhooks(webhook_allowed_networks=(), webhook_backoff_s=3600, webhook_backoff_max_s=3600)
    for hook in hooks:
        log = wait_for(lambda: [d for d in deliveries(api, hook["id"]) if d["last_error"]], what="the refusal")[0]
        assert log["last_error"].startswith("refused before connecting:"), log
        assert log["status"] == "pending" and log["last_status_code"] is None
    assert connected == [] and receiver.requests == []


def test_a_name_resolving_to_a_private_address_is_refused(make_api, make_services):
    api, _ = make_api()
    hook = register(api, "https://hooks.example.test/in", ["job.cancelled"])
    cancelled_job(api)
    services = make_services(**quick(webhook_allowed_networks=(), webhook_backoff_s=3600, webhook_backoff_max_s=3600))
    sender = WebhookSender(services.webhooks, services.settings, resolver=lambda host, port: ["169.254.169.254"])
    thread = SenderThread(sender, time.monotonic() + 30)
    assert thread.finish() == 1
    (log,) = deliveries(api, hook["id"])
    assert "169.254.169.254 is a link-local address" in log["last_error"]


def test_rotation_signs_with_the_new_secret_and_the_old_one_during_its_grace(make_api, receiver, send_webhooks):
    api, services = make_api(**QUICK)
    hook = register(api, receiver.url, ["job.cancelled"])
    rotated = api.post(f"/webhooks/{hook['id']}/rotate-secret")
    assert rotated.status_code == 200
    new = rotated.json_body["secret"]
    assert new.startswith("whsec_") and new != hook["secret"] and rotated.json_body["previous_secret_expires_at"]
    assert "secret" not in api.get(f"/webhooks/{hook['id']}").json_body
    cancelled_job(api)
    send_webhooks(services)
    wait_for(lambda: receiver.requests, what="the delivery")
    request = receiver.requests[0]
    assert len(request["headers"]["webhook-signature"].split(" ")) == 2
    assert verified(new, request)["type"] == "job.cancelled"
    assert verified(hook["secret"], request)  # receivers that have not switched yet

    # With no grace, the previous secret stops signing at once.
    api2, services2 = make_api(**quick(webhook_secret_grace_s=0))
    newest = api2.post(f"/webhooks/{hook['id']}/rotate-secret").json_body["secret"]
    cancelled_job(api2)
    send_webhooks(services2)
    wait_for(lambda: len(receiver.requests) == 2, what="the second delivery")
    assert verified(newest, receiver.requests[1])
    with pytest.raises(WebhookVerificationError):
        verified(new, receiver.requests[1])


def test_a_job_may_name_its_own_url_with_its_own_secret(make_api, receiver, send_webhooks):
    api, services = make_api(**QUICK)
    tenant_hook = register(api, f"{receiver.url}/tenant", ["job.completed"])  # not subscribed to cancel
    created = api.post("/jobs", {"title": "A field guide", "brief": "b", "section_count": 1,
                                 "webhook": {"url": f"{receiver.url}/job"}})
    assert created.status_code == 201, created.json_body
    external_id, own = created.json_body["externalId"], created.json_body["webhook"]
    assert own["job"] == external_id and own["secret"].startswith("whsec_") and own["secret"] != tenant_hook["secret"]
    assert "job.cancelled" in own["events"] and "section.completed" not in own["events"]
    assert [w["id"] for w in api.get("/webhooks").json_body["webhooks"]] == [tenant_hook["id"]]
    assert api.get(f"/webhooks/{own['id']}").json_body["job"] == external_id

    other = api.create(section_count=1)  # another job's events do not reach it
    api.post(f"/jobs/{other}/cancel")
    api.post(f"/jobs/{external_id}/cancel")
    send_webhooks(services)
    wait_for(lambda: receiver.requests, what="the delivery")
    thread_done = wait_for(lambda: deliveries(api, own["id"])[0]["status"] == "succeeded", what="delivered")
    assert thread_done and len(receiver.requests) == 1
    assert receiver.requests[0]["path"] == "/job"
    assert verified(own["secret"], receiver.requests[0])["data"]["externalId"] == external_id

    bad = api.post("/jobs", {"title": "t", "brief": "b", "webhook": {"url": "http://10.0.0.1/x"}})
    assert bad.status_code == 422 and "private" in bad.json_body["error"]["message"]
    assert len(api.get("/jobs").json_body["jobs"]) == 2  # the job with a refused URL was not created


def test_deliveries_are_paginated_and_one_can_be_sent_again(make_api, receiver, send_webhooks):
    api, services = make_api(**QUICK)
    hook = register(api, receiver.url, ["job.cancelled"])
    jobs = [cancelled_job(api) for _ in range(3)]
    first = api.get(f"/webhooks/{hook['id']}/deliveries?limit=2").json_body
    assert [d["job"] for d in first["deliveries"]] == [jobs[2], jobs[1]] and first["next_cursor"]
    second = api.get(f"/webhooks/{hook['id']}/deliveries?limit=2&cursor={first['next_cursor']}").json_body
    assert [d["job"] for d in second["deliveries"]] == [jobs[0]] and second["next_cursor"] is None
    assert api.get(f"/webhooks/{hook['id']}/deliveries?cursor=RTQCC-x").status_code == 400

    sender = send_webhooks(services)
    wait_for(lambda: len(receiver.requests) == 3, what="three deliveries")
    again = api.post(f"/webhooks/{hook['id']}/deliveries/{second['deliveries'][0]['id']}/redeliver")
    assert again.status_code == 202 and again.json_body["status"] == "pending"
    sender.sender.wake()
    wait_for(lambda: len(receiver.requests) == 4, what="the redelivery")
    assert receiver.requests[3]["headers"]["webhook-id"] == second["deliveries"][0]["id"]
    assert api.as_key(OTHER_KEY).post(
        f"/webhooks/{hook['id']}/deliveries/{second['deliveries'][0]['id']}/redeliver").status_code == 404


def test_a_refused_transition_writes_no_delivery(make_api, receiver):
    api, _ = make_api(**LOOPBACK)
    hook = register(api, receiver.url, ["job.cancelled", "job.completed"])
    external_id = cancelled_job(api)
    assert api.post(f"/jobs/{external_id}/cancel").status_code == 409
    assert len(deliveries(api, hook["id"])) == 1


def test_the_consumer_sends_within_its_budget(make_services, make_api, receiver, run_consumer):
    api, _ = make_api(**QUICK)
    hook = register(api, receiver.url, ["job.cancelled"])
    cancelled_job(api)
    result = run_consumer(services=make_services(**QUICK), budget_s=5)  # nothing to run, webhooks to send
    assert result.processed == 0 and result.webhook_attempts == 1
    assert deliveries(api, hook["id"])[0]["status"] == "succeeded"
    # A budget shorter than one attempt's timeout claims nothing it could not finish.
    cancelled_job(api)
    assert run_consumer(services=make_services(**QUICK), budget_s=1).webhook_attempts == 0


def test_the_cli_manages_endpoints_and_shows_their_deliveries(make_services, start_gateway, receiver, send_webhooks,
                                                             capsys):
    from rtqcc.cli import main

    services = make_services(**QUICK)
    gateway = start_gateway(services_override=services)

    def cli(*argv: str) -> list[str]:
        assert main(["webhooks", "--url", gateway.base_url, "--key", gateway.key, *argv]) == 0, capsys.readouterr().err
        return capsys.readouterr().out.strip().splitlines()

    created = cli("create", f"{receiver.url}/cli", "--events", "job.cancelled,job.completed", "--description", "ops")
    webhook_id = created[0].split()[0]
    secret = created[1].rsplit(" ", 1)[1]
    assert webhook_id.startswith("wh_") and secret.startswith("whsec_")
    assert cli("list") == [f"{webhook_id}  {'job.cancelled,job.completed':<40}  {receiver.url}/cli  ops"]

    with gateway.client() as client:
        external_id = client.create(title="t", brief="b", section_count=1)["externalId"]
        client.control(external_id, "cancel")
    send_webhooks(services)
    wait_for(lambda: receiver.requests, what="the delivery")
    assert verified(secret, receiver.requests[0])["data"]["externalId"] == external_id
    (line,) = wait_for(lambda: [l for l in cli("deliveries", webhook_id) if "succeeded" in l], what="the log")
    delivery_id = line.split()[0]
    assert "job.cancelled" in line and external_id in line and delivery_id.startswith("msg_")
    assert cli("redeliver", webhook_id, delivery_id) == ["pending"]

    rotated = cli("rotate", webhook_id)
    assert rotated[1].rsplit(" ", 1)[1] != secret
    assert cli("delete", webhook_id) == [f"deleted {webhook_id}"]
    assert main(["webhooks", "--url", gateway.base_url, "--key", gateway.key, "delete", webhook_id]) == 1
    assert "No webhook" in capsys.readouterr().err


class RefusingProvider:
    """A provider that refuses every call the way a retry will not fix."""

    name = "refusing"

    def stream(self, request, abort, on_delta, on_wait=None):
        from rtqcc.errors import ProviderError

        raise ProviderError("the model refused the brief")


def test_awaiting_review_and_failed_are_announced_with_their_reason(make_api, make_services, run_consumer, receiver):
    api, _ = make_api(**QUICK)
    hook = register(api, receiver.url, ["job.awaiting_review", "job.failed"])
    reviewed = api.create(outline=[{"title": "One"}], review={"outline": True})
    assert api.post(f"/jobs/{reviewed}/start").json_body["status"] == "awaiting_review"  # the API's transition
    failing = api.create(section_count=1)
    api.post(f"/jobs/{failing}/start")

    result = run_consumer(services=make_services(provider=RefusingProvider(), **QUICK))
    assert result.failed == 1 and result.webhook_attempts == 2
    events = {e["type"]: e["data"] for e in (verified(hook["secret"], r) for r in receiver.requests)}
    assert events["job.awaiting_review"] == {"externalId": reviewed, "title": "A field guide",
                                             "status": "awaiting_review"}
    assert events["job.failed"]["externalId"] == failing and events["job.failed"]["status"] == "failed"
    assert events["job.failed"]["error"] and events["job.failed"]["status_reason"]


def test_a_claim_whose_sender_died_lapses_and_the_delivery_is_sent_again(make_api, services):
    api, _ = make_api(**LOOPBACK)
    register(api, "http://127.0.0.1:9/never", ["job.cancelled"])
    cancelled_job(api)
    (claimed,) = services.webhooks.claim_due(10, hold_s=0.2)
    assert services.webhooks.claim_due(10, hold_s=0.2) == []  # held: no second sender takes it
    # The first sender "died" without recording: once the hold lapses, the same delivery is due.
    (again,) = wait_for(lambda: services.webhooks.claim_due(10, hold_s=60), what="the lapsed claim")
    assert (again.public_id, again.attempt) == (claimed.public_id, 2)


def test_the_backoff_doubles_to_its_cap_with_jitter(services):
    settings = services.settings.with_overrides(webhook_backoff_s=5.0, webhook_backoff_max_s=3600.0)
    low = WebhookSender(services.webhooks, settings, jitter=lambda: 0.0)
    high = WebhookSender(services.webhooks, settings, jitter=lambda: 1.0)
    assert [high.backoff_s(n) for n in (1, 2, 3, 4)] == [5.0, 10.0, 20.0, 40.0]
    assert [low.backoff_s(n) for n in (1, 2, 3)] == [2.5, 5.0, 10.0]
    assert high.backoff_s(20) == 3600.0 and high.backoff_s(10_000) == 3600.0
