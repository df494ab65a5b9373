"""`rtqcc demo`: one sample manuscript, from create to file, on the local stack.

It drives the same handlers a client would reach over HTTP (in process, through Chalice's test
gateway) and one consumer, and prints the job's events as they stream."""

from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path

from rtqcc.api import create_app
from rtqcc.consumer import Consumer
from rtqcc.db import Database
from rtqcc.migrate import ensure_database, migrate
from rtqcc.services import Services
from rtqcc.settings import Settings
from rtqcc.sse import JobEventStream

from .embedded import LocalServices

DEMO_KEY = "rtqcc-demo-key"
DEMO_JOB = {
    "title": "Keeping Long Jobs Alive",
    "brief": "A short field guide for teams that generate long documents with language models: "
             "why jobs fail, how checkpoints and leases keep them alive, and how to watch them live.",
}


class _Budget:
    def __init__(self, seconds: float):
        self._deadline = time.monotonic() + seconds

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self._deadline - time.monotonic()) * 1000))


def run_demo(*, sections: int, output: str | None, data_dir: str) -> int:
    local = LocalServices(Path(data_dir), os.environ)
    print("starting services (embedded where none is configured) ...", flush=True)
    local.start()
    try:
        os.environ.update(local.env())
        os.environ.setdefault("RTQCC_DEV_API_KEY", DEMO_KEY)
        os.environ.setdefault("RTQCC_FAKE_TOKENS_PER_S", "150")
        settings = Settings.from_env()
        ensure_database(settings.database_url)
        db = Database(settings.database_url)
        migrate(db)
        services = Services(settings, db=db)
        services.blobs.ensure_bucket()
        return _run_job(services, sections=sections, output=output)
    finally:
        local.stop()


def _run_job(services: Services, *, sections: int, output: str | None) -> int:
    from chalice.test import Client

    key = os.environ["RTQCC_DEV_API_KEY"]
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    with Client(create_app(lambda: services)) as client:
        created = client.http.post("/jobs", headers=headers, body=json.dumps({**DEMO_JOB, "section_count": sections}))
        if created.status_code != 201:
            print(f"could not create the job: {created.body.decode()}", file=sys.stderr)
            return 1
        external_id = created.json_body["externalId"]
        print(f"job {external_id} created; starting it")
        client.http.post(f"/jobs/{external_id}/start", headers=headers)

        stop = threading.Event()
        consumer = threading.Thread(target=_consume, args=(services, stop), daemon=True)
        consumer.start()
        job = services.jobs.get_by_external_id(external_id)
        status = _follow(services, job)
        stop.set()
        consumer.join(30)

        if status != "completed":
            print(f"\njob ended {status}", file=sys.stderr)
            return 1
        manuscript = client.http.get(f"/jobs/{external_id}/manuscript", headers=headers).body.decode()
        usage = client.http.get(f"/jobs/{external_id}", headers=headers).json_body["usage"]
    path = Path(output or f"manuscript-{external_id}.md")
    path.write_text(manuscript, encoding="utf-8")
    print(f"\nmanuscript written to {path} ({len(manuscript)} characters, {usage['total_tokens']} tokens"
          f"{' (estimated)' if usage['estimated'] else ''})")
    return 0


def _consume(services: Services, stop: threading.Event) -> None:
    consumer = Consumer(services, name="demo-consumer")
    while not stop.is_set():
        consumer.drain(_Budget(30).get_remaining_time_in_millis)


def _follow(services: Services, job) -> str:
    """Print the job's events as they arrive; return its final status."""
    for frame in JobEventStream(services.events, services.jobs, job, None).frames(heartbeat_s=5):
        for line in frame.splitlines():
            if line.startswith("event: "):
                kind = line[len("event: "):]
            elif line.startswith("data: "):
                data = json.loads(line[len("data: "):])
                if kind == "outline":
                    print("outline:")
                    for entry in data["sections"]:
                        print(f"  {entry['index'] + 1}. {entry['title']}")
                elif kind == "section.started":
                    print(f"\n## {data['title']}\n", flush=True)
                elif kind == "section.delta":
                    print(data["text"], end="", flush=True)
                elif kind == "section.completed":
                    print(f"\n[section {data['index'] + 1} done: {data['usage']['total_tokens']} tokens]", flush=True)
                elif kind == "done":
                    return data["status"]
    return "unknown"
