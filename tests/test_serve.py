"""`rtqcc serve`, the production gateway, as its container runs it: worker processes sharing one
port, a worker that dies replaced, and a rolling restart (a new gateway on the port, SIGTERM to
the old) that every watcher of a running job rides through without a lost or repeated event."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from conftest import API_KEY, job_events, wait_for

from rtqcc.streaming.hub import DRAIN_RETRY_MS
from rtqcc_emulator.client import JobEvent, RtqccClient

AUTH = {"Authorization": f"Bearer {API_KEY}"}
KUBERNETES_GRACE_S = 30


def _sockets(pid: int) -> int:
    fds = Path(f"/proc/{pid}/fd")
    count = 0
    for fd in fds.iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:  # closed while we looked
            pass
    return count


def _connect(port: int) -> socket.socket:
    conn = socket.create_connection(("127.0.0.1", port), timeout=10)
    conn.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    assert b"200" in conn.recv(200)  # served, and the connection stays open (keep-alive)
    return conn


def test_workers_share_the_port_and_one_that_dies_is_replaced(served_gateway):
    gateway = served_gateway(workers=2)
    workers = gateway.worker_pids()
    assert len(workers) == 2
    before = {pid: _sockets(pid) for pid in workers}
    connections = [_connect(gateway.port) for _ in range(40)]
    try:
        # The kernel spreads connections over both (40 on one alone: a chance of one in 2**39).
        assert all(_sockets(pid) > before[pid] for pid in workers), {pid: _sockets(pid) for pid in workers}
    finally:
        for conn in connections:
            conn.close()

    os.kill(workers[0], signal.SIGKILL)
    replaced = wait_for(lambda: (pids := gateway.worker_pids()) and len(pids) == 2 and workers[0] not in pids and pids,
                        timeout_s=60, what="the supervisor to start another worker")
    assert workers[1] in replaced
    assert httpx.get(gateway.base_url + "/healthz", timeout=5).status_code == 200
    assert "exited with code -9; starting another" in gateway.log()


def _follow(base_url: str, external_id: str, seen: list[JobEvent]) -> None:
    with RtqccClient(base_url, API_KEY, timeout_s=10) as client:
        seen.extend(client.events(external_id))


def _raw_stream_until_closed(port: int, external_id: str, opened: threading.Event) -> bytes:
    conn = socket.create_connection(("127.0.0.1", port), timeout=KUBERNETES_GRACE_S)
    conn.sendall(f"GET /jobs/{external_id}/stream HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 f"Authorization: Bearer {API_KEY}\r\n\r\n".encode())
    received = b""
    while chunk := conn.recv(65536):
        received += chunk
        if b"event: snapshot" in received:
            opened.set()
    conn.close()
    return received


def test_a_rolling_restart_loses_no_event_and_repeats_none(served_gateway, start_consumer, redis_client):
    """A gateway with watchers on a running job gets SIGTERM after a new one took its port: each
    open stream is told to reconnect (`retry:`) and ends; the old gateway exits 0 within the
    grace period; every watcher resumes on the new one with Last-Event-ID and has seen exactly
    the job's events, in order, once each."""
    old = served_gateway(workers=2)
    created = httpx.post(f"{old.base_url}/jobs", headers=AUTH, timeout=10, json={
        "title": "Rolled", "brief": "b", "outline": [{"title": f"Part {n}"} for n in range(3)],
        "params": {"max_tokens_per_section": 120}})
    external_id = created.json()["externalId"]
    assert httpx.post(f"{old.base_url}/jobs/{external_id}/start", headers=AUTH, timeout=10).status_code == 202
    start_consumer(fake_tokens_per_s=40.0, delta_flush_ms=0, budget_s=60)

    seen: list[list[JobEvent]] = [[] for _ in range(6)]
    watchers = [threading.Thread(target=_follow, args=(old.base_url, external_id, events)) for events in seen]
    for watcher in watchers:
        watcher.start()
    raw: dict[str, bytes] = {}
    opened = threading.Event()
    raw_watcher = threading.Thread(target=lambda: raw.update(answer=_raw_stream_until_closed(old.port, external_id, opened)))
    raw_watcher.start()
    wait_for(lambda: opened.is_set() and all(any(e.type == "section.delta" for e in events) for events in seen),
             timeout_s=30, what="every watcher to be receiving tokens from the old gateway")

    new = served_gateway(workers=1, port=old.port)
    assert job_events(redis_client, external_id)[-1]["event"] != "done"  # still running when the old one stops
    old.process.send_signal(signal.SIGTERM)
    assert old.process.wait(KUBERNETES_GRACE_S) == 0, old.log()[-3000:]
    raw_watcher.join(KUBERNETES_GRACE_S)
    for watcher in watchers:
        watcher.join(60)
    assert not any(watcher.is_alive() for watcher in watchers + [raw_watcher])

    # The open stream was told when to come back, then ended (no `done`: the job still runs).
    hint = re.findall(rb"retry: (\d+)\n\n", raw["answer"])[-1]
    assert DRAIN_RETRY_MS[0] <= int(hint) <= DRAIN_RETRY_MS[1]
    assert b"event: done" not in raw["answer"]

    published = job_events(redis_client, external_id)
    assert published[-1]["event"] == "done" and published[-1]["data"] == {"status": "completed"}
    for events in seen:
        assert events[0].type == "snapshot"
        after = [e for e in published if tuple(map(int, e["id"].split("-"))) > tuple(map(int, events[0].id.split("-")))]
        assert [(e.id, e.type, e.data) for e in events[1:]] == [(e["id"], e["event"], e["data"]) for e in after]
    # ... and every watcher came back through the new gateway.
    assert new.log().count(f"/jobs/{external_id}/stream") >= len(seen)


def test_without_its_services_it_refuses_to_start_and_names_what_is_missing(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RTQCC_", "REDIS_", "DATABASE_", "S3_"))}
    answer = subprocess.run([str(Path(sys.executable).with_name("rtqcc")), "serve", "--port", "0"],
                            env={**env, "REDIS_URL": "redis://127.0.0.1:6379/0"}, capture_output=True, text=True,
                            timeout=60, cwd=tmp_path)
    assert answer.returncode == 2
    assert "DATABASE_URL must be set" in answer.stderr and "listening" not in answer.stdout
