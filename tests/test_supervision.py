"""`rtqcc up` survives its own parts: a real stack on embedded Redis, Postgres and SeaweedFS, a job
written slowly (the fake provider at 20 tokens a second) and watched over SSE, and one embedded
service SIGKILLed mid-section. The stack restarts it on its port, the job completes, the fault
oracle finds each section stored exactly once, and the watcher saw every event once (see
docs/recovery.md for what "once" means when Redis, which holds the event stream, lost it all).
A service that cannot come back stops the stack with one message naming it and its log.

Every process is found through the stack (its printed URL, the pids it writes to services.json)
and stopped by its pid."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import job_events, parse_sse, wait_for
from fault_oracle import check_job
from test_attacks_local import _stack_env  # the environment of an `rtqcc up` on embedded services

from rtqcc.bus.events import stream_id_tuple
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.writing.providers.fake import FakeProvider
from rtqcc_emulator.client import RtqccClient
from rtqcc_emulator.embedded import EmbeddedPostgres, EmbeddedRedis, SeaweedS3
from rtqcc_emulator.supervisor import STATE_FILE

SECTIONS = 4
TOKENS_PER_SECTION = 60  # at 20 tokens a second: three seconds a section, time to kill mid-way


@dataclass
class RunningStack:
    process: subprocess.Popen
    output: Path
    data_dir: Path
    base_url: str = ""
    api_key: str = ""
    pids_seen: set[int] = field(default_factory=set)

    def printed(self) -> str:
        return self.output.read_text(errors="replace")

    def state(self) -> dict:
        state = json.loads((self.data_dir / STATE_FILE).read_text())
        self.pids_seen.update(part["pid"] for part in state.values() if part["pid"])
        return state

    def services(self) -> Services:
        """Clients of the stack's own embedded services, for the oracle (the credentials kept in
        their data folders, the ports in services.json)."""
        state = self.state()
        s3 = SeaweedS3(self.data_dir / "s3", port=state["s3"]["port"])
        return Services(Settings.from_env({
            "REDIS_URL": EmbeddedRedis(self.data_dir / "redis", port=state["redis"]["port"]).url,
            "DATABASE_URL": EmbeddedPostgres(self.data_dir / "postgres", port=state["postgres"]["port"]).url,
            "S3_ENDPOINT_URL": s3.endpoint_url,
            "AWS_ACCESS_KEY_ID": s3.credentials["access_key_id"],
            "AWS_SECRET_ACCESS_KEY": s3.credentials["secret_access_key"],
            "RTQCC_ENV": "local",
        }))


def _slow_stack_env(**extra: str) -> dict[str, str]:
    return {**_stack_env(), "RTQCC_FAKE_TOKENS_PER_S": "20", "RTQCC_LEASE_TTL_S": "5", "RTQCC_DELTA_FLUSH_MS": "0",
            "RTQCC_SSE_HEARTBEAT_S": "1", **extra}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def start_stack(tmp_path):
    started: list[RunningStack] = []

    def start(**env: str) -> RunningStack:
        data_dir = tmp_path / f"stack{len(started)}"
        output = tmp_path / f"up{len(started)}.out"
        with open(output, "wb") as sink:
            process = subprocess.Popen(
                [str(Path(sys.executable).with_name("rtqcc")), "up", "--port", "0", "--data-dir", str(data_dir),
                 "--consumers", "2", "--consumer-budget-s", "60"],
                stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_slow_stack_env(**env))
        stack = RunningStack(process, output, data_dir)
        started.append(stack)
        wait_for(lambda: "ready" in stack.printed().splitlines() or process.poll() is not None, timeout_s=120,
                 interval_s=0.2, what="rtqcc up to be ready")
        assert process.poll() is None, stack.printed()
        stack.base_url = re.search(r"local stack at (http://\S+)", stack.printed()).group(1)
        stack.api_key = re.search(r"API key: (\S+)", stack.printed()).group(1)
        stack.state()
        return stack

    yield start
    for stack in started:
        if stack.process.poll() is None:
            stack.process.send_signal(signal.SIGTERM)
            try:
                stack.process.wait(60)
            except subprocess.TimeoutExpired:
                stack.process.kill()
                stack.process.wait(5)
        if (stack.data_dir / STATE_FILE).exists():
            stack.state()
        for pid in stack.pids_seen:  # what a killed stack could not stop
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


class Watcher(threading.Thread):
    """Follows a job's stream as `rtqcc jobs watch` does: across drops and 503s, with Last-Event-ID."""

    def __init__(self, stack: RunningStack, external_id: str):
        super().__init__(daemon=True)
        self.client = RtqccClient(stack.base_url, stack.api_key)
        self.external_id = external_id
        self.events: list = []
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for event in self.client.events(self.external_id):
                self.events.append(event)
        except BaseException as error:  # noqa: BLE001 - the test reports it
            self.error = error
        finally:
            self.client.close()

    def seen(self, type_: str, after: int = 0) -> bool:
        return any(event.type == type_ for event in self.events[after:])


def _start_job(stack: RunningStack) -> str:
    with RtqccClient(stack.base_url, stack.api_key) as client:
        job = client.create(title="A field guide", brief="Durable jobs survive their parts.",
                            section_count=SECTIONS, params={"max_tokens_per_section": TOKENS_PER_SECTION})
        client.control(job["externalId"], "start")
    return job["externalId"]


def _check_events(events: list, stored: dict[int, str]) -> None:
    """The watcher's events, each once and in order, and the text it was shown is what was stored."""
    ids = [event.id for event in events]
    assert all(stream_id_tuple(a) < stream_id_tuple(b) for a, b in zip(ids, ids[1:])), ids
    assert [event.type for event in events].count("done") == 1
    assert events[-1].type == "done" and events[-1].data["status"] == "completed", events[-1]
    # A section's text as a watcher builds it: from its last section.started, the part of the
    # stored text a resumed run kept (resumed_chars), then every delta.
    started = {}
    for position, event in enumerate(events):
        if event.type == "section.started":
            started[event.data["index"]] = position
    assert set(started) == set(stored), "the watcher, there from the start, saw every section start"
    for index, position in started.items():
        resumed = events[position].data["resumed_chars"]
        deltas = "".join(event.data["text"] for event in events[position + 1:]
                         if event.type == "section.delta" and event.data["index"] == index)
        assert stored[index][:resumed] + deltas == stored[index], f"section {index}"
        assert any(event.type == "section.completed" and event.data["index"] == index
                   for event in events[position + 1:]), f"section {index} never completed for the watcher"


@pytest.mark.parametrize("part", ["redis", "postgres", "s3"])
def test_a_killed_service_is_restarted_and_the_job_completes_each_section_once(start_stack, part):
    stack = start_stack()
    external_id = _start_job(stack)
    watcher = Watcher(stack, external_id)
    watcher.start()
    wait_for(lambda: watcher.seen("section.delta") or watcher.error, timeout_s=60, interval_s=0.05,
             what="a section under way")
    assert watcher.error is None, watcher.error

    pid = stack.state()[part]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: f"{part} is back" in stack.printed() or stack.process.poll() is not None, timeout_s=90,
             interval_s=0.1, what=f"{part} to be restarted")
    assert stack.process.poll() is None, stack.printed()
    assert f"{part} is down" in stack.printed()
    new_pid = stack.state()[part]["pid"]
    assert new_pid != pid and _alive(new_pid)

    watcher.join(180)
    assert not watcher.is_alive(), f"the job did not end; events: {[e.type for e in watcher.events][-20:]}"
    assert watcher.error is None, watcher.error

    services = stack.services()
    try:
        with RtqccClient(stack.base_url, stack.api_key) as client:
            assert client.get(external_id)["status"] == "completed"
        verdict = check_job(external_id, db=services.db, blobs=services.blobs, redis=services.redis,
                            provider=FakeProvider())
        assert verdict.ok, str(verdict)
        stored = {section.idx: services.blobs.get(section.content_key).decode()
                  for section in services.jobs.sections(services.jobs.get_by_external_id(external_id).id)}
    finally:
        services.close()
    _check_events(watcher.events, stored)


def test_readyz_names_the_part_that_is_down_while_it_is_down(start_stack):
    import httpx

    # A service that cannot come back stays down until the stack gives up: long enough to look.
    stack = start_stack(RTQCC_SERVICE_MAX_RESTARTS="4")
    ready = httpx.get(stack.base_url + "/readyz", timeout=10)
    assert ready.status_code == 200, ready.text

    (stack.data_dir / "s3" / "credentials.json").write_text("not json")
    os.kill(stack.state()["s3"]["pid"], signal.SIGKILL)

    def answer():
        found = httpx.get(stack.base_url + "/readyz", timeout=10)
        return found if found.status_code == 503 else None

    down = wait_for(answer, timeout_s=30, interval_s=0.1, what="/readyz to say the stack is unavailable")
    assert down.json()["checks"]["s3"] == {"ok": False}
    assert down.json()["checks"]["redis"]["ok"] and down.json()["checks"]["postgres"]["ok"]
    assert "127.0.0.1" not in down.text and "http" not in down.text  # what is down, never where


def test_a_service_that_dies_at_every_restart_stops_the_stack_naming_it(start_stack):
    stack = start_stack(RTQCC_SERVICE_MAX_RESTARTS="2")
    pids = stack.state()
    # Its data folder corrupted: every start fails at once.
    (stack.data_dir / "redis" / "credentials.json").write_text("not json")
    os.kill(pids["redis"]["pid"], signal.SIGKILL)

    stack.process.wait(120)
    printed = stack.printed()
    assert stack.process.returncode != 0, printed
    last = printed.strip().splitlines()[-1]
    assert "redis died 3 times" in last and str(stack.data_dir / "redis" / "redis.log") in last, printed
    assert "redis is down" in printed
    assert not [name for name, part in stack.state().items() if _alive(part["pid"])]  # the others stopped


def test_a_port_taken_while_its_service_was_down_stops_the_stack_naming_it(start_stack):
    stack = start_stack()
    redis = stack.state()["redis"]
    os.kill(redis["pid"], signal.SIGKILL)
    # The supervisor waits its backoff before the restart: the port is taken before it tries.
    squatter = wait_for(lambda: _bind(redis["port"]), timeout_s=5, interval_s=0.001, what="the freed port")
    try:
        stack.process.wait(60)
    finally:
        squatter.close()
    printed = stack.printed()
    assert stack.process.returncode != 0, printed
    last = printed.strip().splitlines()[-1]
    assert f"127.0.0.1:{redis['port']}: another process has it" in last and "redis" in last, printed


def _bind(port: int) -> socket.socket | None:
    try:
        return socket.create_server(("127.0.0.1", port))
    except OSError:
        return None


def test_a_reconnect_after_redis_lost_the_stream_gets_a_snapshot_that_does_not_go_back(api, run_consumer,
                                                                                      redis_client):
    """The embedded Redis came back empty and nothing was written since: the client's reconnect
    gets the truth from Postgres, under an id no lower than the last one it saw."""
    external_id = api.create(section_count=2)
    api.post(f"/jobs/{external_id}/start")
    assert run_consumer().completed == 1
    last_seen = job_events(redis_client, external_id)[-2]["id"]  # it saw all but `done`
    redis_client.delete(f"job:{external_id}:events")  # what a restart without persistence does

    response = api.get(f"/jobs/{external_id}/stream", headers={"Last-Event-ID": last_seen})
    events = parse_sse(response.body.decode())
    assert [event["event"] for event in events] == ["snapshot", "done"]
    assert events[0]["data"]["status"] == "completed"
    assert all(event["id"] == last_seen for event in events)


def test_consumers_that_fail_at_start_are_replaced_after_a_growing_pause(tmp_path):
    """A consumer that cannot start (here a malformed setting; on a laptop, a part still down) is
    replaced, but after a pause that doubles with each failure in a row: no hot loop."""
    from rtqcc_emulator.scheduler import ConsumerScheduler

    env = _slow_stack_env(RTQCC_LEASE_TTL_S="not a number")
    scheduler = ConsumerScheduler(concurrency=1, budget_s=5, env=env, log_dir=tmp_path, restart_delay_s=0.1,
                                  max_restart_delay_s=0.4).start()
    try:
        wait_for(lambda: scheduler.failures_in_a_row >= 4, timeout_s=60, interval_s=0.05,
                 what="four failed invocations in a row")
        assert scheduler.invocations <= scheduler.failures_in_a_row + 1  # one at a time, each one counted
        assert scheduler._restart_delay_s() == 0.4  # 0.1, 0.2, 0.4, then capped
        assert "RTQCC_LEASE_TTL_S" in (tmp_path / "consumers.log").read_text()
    finally:
        scheduler.stop()
