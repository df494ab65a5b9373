"""Embedded services, for real: each test starts real processes on 127.0.0.1 and checks they are gone after."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import urlsplit

import pg8000.native
import pytest
from redis import Redis

from rtqcc_emulator import embedded
from rtqcc_emulator.embedded import EmbeddedPostgres, EmbeddedRedis, EmbeddedServiceError, LocalServices, SeaweedS3


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
    return pg8000.native.Connection(parts.username, password=parts.password, host=parts.hostname, port=parts.port,
                                    database=database or parts.path.lstrip("/"), timeout=5)


def _listening_on(port: int) -> list[str]:
    """The addresses a TCP socket of this machine listens on at `port`, from /proc/net/tcp{,6}."""
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.rsplit(":", 1)
            if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                found.append(socket.inet_ntop(socket.AF_INET if len(address) == 8 else socket.AF_INET6,
                                              bytes.fromhex(address)[::-1] if len(address) == 8 else
                                              b"".join(bytes.fromhex(address[i:i + 8])[::-1] for i in range(0, 32, 8))))
    return found


@pytest.fixture
def postgres_server(tmp_path) -> EmbeddedPostgres:
    server = EmbeddedPostgres(tmp_path / "postgres")
    try:
        yield server.start()
    finally:
        server.stop()


def test_redis_answers_on_loopback_and_stop_leaves_no_process(redis_server):
    assert redis_server.url == f"redis://:{redis_server.password}@127.0.0.1:{redis_server.port}/0"
    assert redis_server.port not in (0, 6379)
    client = Redis.from_url(redis_server.url, decode_responses=True)
    try:
        assert client.set("greeting", "hello")
        assert client.get("greeting") == "hello"
        assert client.info("persistence")["aof_enabled"] == 0
        assert client.info("server")["config_file"] == str(redis_server.config_path)
    finally:
        client.close()
    assert _listening_on(redis_server.port) == ["127.0.0.1"]
    assert 'save ""' in redis_server.config_path.read_text().splitlines()
    pid = redis_server.process.pid
    assert _alive(pid)

    redis_server.stop()

    assert not _alive(pid)
    redis_server.stop()  # a second stop is harmless


def test_postgres_serves_rtqcc_over_tcp_and_stop_leaves_no_process(postgres_server):
    password = urlsplit(postgres_server.url).password
    assert password and postgres_server.url == f"postgresql://postgres:{password}@127.0.0.1:{postgres_server.port}/rtqcc"
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
    assert _listening_on(postgres_server.port) == ["127.0.0.1"]
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
        assert env["AWS_ACCESS_KEY_ID"] == local.s3.credentials["access_key_id"]
        assert env["AWS_SECRET_ACCESS_KEY"] == local.s3.credentials["secret_access_key"]
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
    assert local.postgres.process is None or not _alive(local.postgres.process.pid)  # under root its cluster
    assert local.s3 is None                                                         # lives elsewhere


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


def test_a_cluster_an_older_version_made_with_trust_gets_a_password_and_keeps_its_data(tmp_path):
    probe = EmbeddedPostgres(tmp_path / "probe")  # where this machine runs Postgres from, and as whom
    probe.start()
    probe.stop()
    placement = probe.placement
    # An older version's data folder: pgdata/ made by initdb --auth=trust, no credentials. It is built in a
    # folder the Postgres user can enter, then moved into a data folder in tmp_path.
    staging = Path(tempfile.mkdtemp(prefix="rtqcc-legacy-"))
    try:
        staging.chmod(0o711)
        legacy = staging / "pgdata"
        legacy.mkdir(mode=0o700)
        placement.give(legacy)
        bin_dir = placement.install_dir / "bin"
        subprocess.run([str(bin_dir / "initdb"), "-D", str(legacy), "-U", "postgres", "--auth=trust", "--encoding=UTF8",
                        "--locale=C", "--no-instructions"], check=True, capture_output=True, cwd=legacy,
                       **placement.popen_kwargs())
        control = subprocess.run([str(bin_dir / "pg_controldata"), "-D", str(legacy)], check=True, capture_output=True,
                                 text=True, cwd=legacy, **placement.popen_kwargs()).stdout
        system_id = next(line.split(":", 1)[1].strip() for line in control.splitlines()
                         if line.startswith("Database system identifier"))
        (tmp_path / "older").mkdir(mode=0o700)
        shutil.move(legacy, tmp_path / "older" / "pgdata")
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    server = EmbeddedPostgres(tmp_path / "older")
    try:
        server.start()

        connection = _connect(server.url)
        try:
            assert connection.run("SELECT system_identifier::text FROM pg_control_system()") == [[system_id]]
        finally:
            connection.close()
        with pytest.raises(pg8000.native.DatabaseError, match="password authentication failed"):
            pg8000.native.Connection("postgres", password="not-the-password", host="127.0.0.1", port=server.port,
                                     database="rtqcc", timeout=5)
        hba = (server.pgdata / "pg_hba.conf").read_text()
        assert "trust" not in [word for line in hba.splitlines() for word in line.split("#", 1)[0].split()]
    finally:
        server.stop()


# ---- a port another process takes between its choice and the bind ------------------------------

SERVICES = [EmbeddedRedis, EmbeddedPostgres, SeaweedS3]


@pytest.fixture
def taken_port():
    """A port of 127.0.0.1 someone else listens on (a socket of this process stands for them)."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        yield holder.getsockname()[1]


@pytest.mark.parametrize("service", SERVICES, ids=["redis", "postgres", "seaweedfs"])
def test_a_service_whose_chosen_port_is_taken_before_it_binds_starts_on_another(tmp_path, taken_port, monkeypatch,
                                                                                 service):
    # The race, made certain: the port free_port chose first is taken before the server binds it.
    choose = embedded.free_port
    first_choice = iter([taken_port])
    monkeypatch.setattr(embedded, "free_port", lambda: next(first_choice, None) or choose())
    server = service(tmp_path / "data")
    try:
        server.start()
        assert server.port != taken_port
        assert _listening_on(server.port) == ["127.0.0.1"]
        assert server.process.poll() is None
    finally:
        server.stop()


@pytest.mark.parametrize("service", SERVICES, ids=["redis", "postgres", "seaweedfs"])
def test_a_service_told_to_use_a_taken_port_says_which_and_leaves_no_process(tmp_path, taken_port, service):
    server = service(tmp_path / "data", port=taken_port)
    with pytest.raises(EmbeddedServiceError, match=f"127.0.0.1:{taken_port}: another process has it"):
        server.start()
    assert server.process is not None and server.process.poll() is not None
