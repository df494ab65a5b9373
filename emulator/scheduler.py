"""Invokes the consumer function like a scheduled Lambda: N invocations at once, each in its own
process with a time budget; when one ends (or is killed), another starts in its place. One that
fails (a non-zero exit: Redis or Postgres away, a crash at start-up) is replaced after a pause that
doubles with each failure in a row, up to `max_restart_delay_s`, so a part that is down costs no
hot loop, and a clean end resets it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path


class ConsumerScheduler:
    def __init__(self, *, concurrency: int, budget_s: float, env: dict[str, str], log_dir: Path,
                 restart_delay_s: float = 0.2, max_restart_delay_s: float = 5.0):
        self.concurrency = concurrency
        self.budget_s = budget_s
        self.env = env
        self.log_dir = log_dir
        self.restart_delay_s = restart_delay_s
        self.max_restart_delay_s = max_restart_delay_s
        self.invocations = 0
        self.failures_in_a_row = 0
        self._processes: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name="consumer-scheduler", daemon=True)

    def start(self) -> "ConsumerScheduler":
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._thread.start()
        return self

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._processes if p.poll() is None]

    def _spawn(self) -> subprocess.Popen:
        log = open(self.log_dir / "consumers.log", "ab")
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", "rtqcc_emulator.invoke_consumer", "--budget-s", str(self.budget_s)],
                env=self.env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        finally:
            log.close()
        self.invocations += 1
        return process

    def _supervise(self) -> None:
        spawn_after = 0.0
        while not self._stopping.is_set():
            with self._lock:
                alive = [p for p in self._processes if p.poll() is None]
                for ended in (p for p in self._processes if p.poll() is not None):
                    self.failures_in_a_row = self.failures_in_a_row + 1 if ended.returncode else 0
                if len(alive) < len(self._processes):
                    spawn_after = time.monotonic() + self._restart_delay_s()
                self._processes = alive
                while (len(self._processes) < self.concurrency and not self._stopping.is_set()
                       and time.monotonic() >= spawn_after):
                    self._processes.append(self._spawn())
            self._stopping.wait(0.05)

    def _restart_delay_s(self) -> float:
        if not self.failures_in_a_row:
            return 0.0
        return min(self.max_restart_delay_s, self.restart_delay_s * 2 ** (self.failures_in_a_row - 1))

    def stop(self, grace_s: float = 10.0) -> None:
        self._stopping.set()
        self._thread.join(5)
        with self._lock:
            processes, self._processes = self._processes, []
        for process in processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(process.pid, signal.SIGKILL)
                process.wait(5)
