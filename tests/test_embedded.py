"""Embedded services, for real: each test starts real processes on 127.0.0.1 and checks they are gone after."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlsplit

import pg8000.native
import pytest
from redis import Redis

from rtqcc_emulator.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServiceError, LocalServices


def _alive(pid: int) -> bool:
    """True while `pid` is a live process (a zombie counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def _children(pid: int) -> list[int]:
    found = []
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat_file.parent.name))
    return found


def _connect(url: str, database: str | None = None) -> pg8000.native.Connection:
    parts = urlsplit(url)
    return pg8000.native.Connection(parts.username, host=parts.hostname, port=parts.port,
                                    database=database or parts.path.lstrip("/"), timeout=5)


@pytest.fixture
def redis_server(tmp_path) -> EmbeddedRedis:
    server = EmbeddedRedis(tmp_path / "redis")
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture
def postgres_server(tmp_path) -> EmbeddedPostgres:
    server = EmbeddedPostgres(tmp_path / "postgres")
    try:
        yield server.start()
    finally:
        server.stop()


def test_redis_answers_on_loopback_and_stop_leaves_no_process(redis_server):
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}/0"
    assert redis_server.port not in (0, 6379)
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.set("greeting", "hello")
        assert client.get("greeting") == "hello"
        assert client.config_get("bind")["bind"] == "127.0.0.1"
        assert client.config_get("save")["save"] == ""
    finally:
        client.close()
    pid = redis_server.process.pid
    assert _alive(pid)

    redis_server.stop()

    assert not _alive(pid)
    redis_server.stop()  # a second stop is harmless


def test_postgres_serves_rtqcc_over_tcp_and_stop_leaves_no_process(postgres_server):
    assert postgres_server.url == f"postgresql://postgres@127.0.0.1:{postgres_server.port}/rtqcc"
    assert postgres_server.port not in (0, 5432)
    connection = _connect(postgres_server.url)
    try:
        assert connection.run("SELECT 1") == [[1]]
        assert connection.run("SELECT current_database(), current_setting('listen_addresses')") == [
            ["rtqcc", "127.0.0.1"]]
        connection.run("CREATE TABLE notes (id serial PRIMARY KEY, body text NOT NULL)")
        connection.run("INSERT INTO notes (body) VALUES (:body)", body="kept")
        assert connection.run("SELECT body FROM notes") == [["kept"]]
    finally:
        connection.close()
    pid = postgres_server.process.pid
    backends = _children(pid)
    assert _alive(pid) and backends  # checkpointer, walwriter, ...
    if os.geteuid() == 0:
        assert Path(f"/proc/{pid}/status").read_text().count("\nUid:\t0\t") == 0  # not running as root

    postgres_server.stop()

    assert not _alive(pid)
    assert not [child for child in backends if _alive(child)]


def test_postgres_restarts_on_its_data_without_initdb(tmp_path):
    server = EmbeddedPostgres(tmp_path / "postgres")
    try:
        server.start()
        connection = _connect(server.url)
        connection.run("CREATE TABLE survivors (name text)")
        connection.run("INSERT INTO survivors VALUES ('first run')")
        connection.close()
        server.stop()
        initdb_runs = (tmp_path / "postgres" / "postgres.log").read_text().count("creating subdirectories")

        server.start()
        connection = _connect(server.url)
        try:
            assert connection.run("SELECT name FROM survivors") == [["first run"]]
        finally:
            connection.close()
        assert (tmp_path / "postgres" / "postgres.log").read_text().count("creating subdirectories") == initdb_runs == 1
    finally:
        server.stop()


def test_local_services_embeds_only_what_is_not_configured(tmp_path):
    configured = {
        "REDIS_URL": "redis://127.0.0.1:6379/7",
        "DATABASE_URL": "postgresql://postgres@127.0.0.1:5432/rtqcc_configured",
    }
    local = LocalServices(tmp_path / ".rtqcc", configured)
    try:
        local.start()
        assert local.redis is None and local.postgres is None
        assert local.s3 is not None and local.s3.process.poll() is None
        env = local.env()
        assert env["REDIS_URL"] == configured["REDIS_URL"]
        assert env["DATABASE_URL"] == configured["DATABASE_URL"]
        assert env["S3_ENDPOINT_URL"] == f"http://127.0.0.1:{local.s3.port}"
        assert env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
        assert env["S3_CREATE_BUCKET"] == "true"
        assert sorted(path.name for path in (tmp_path / ".rtqcc").iterdir()) == ["s3"]
        weed_pid = local.s3.process.pid
    finally:
        local.stop()
    assert not _alive(weed_pid)


def test_local_services_stops_the_others_when_one_fails(tmp_path):
    root = tmp_path / ".rtqcc"
    root.mkdir()
    (root / "redis").write_text("a file where Redis wants its folder")
    local = LocalServices(root, {"S3_ENDPOINT_URL": "http://127.0.0.1:9"})

    with pytest.raises(EmbeddedServiceError, match="redis"):
        local.start()

    # Whatever had started is stopped: no process runs on that data folder any more.
    assert _processes_using(root) == []
    assert local.s3 is None


def _processes_using(folder) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as handle:
                    if str(folder).encode() in handle.read():
                        found.append(int(entry))
            except OSError:
                pass
    return found
