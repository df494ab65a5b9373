"""`rtqcc up` is the platform of the local stack: where docker-compose or Kubernetes would restart a
dead Redis, Postgres or S3 server, this does.

A service that dies is started again on its own data folder and the same port, so every client
keeps its URL (its connection pool reconnects). Restarts wait longer each time (exponential
backoff); a service that died more than `max_restarts` times within `window_s` stops the stack with
one message naming it and its log, as does a port another process took meanwhile: the stack never
hangs on a part that will not come back."""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .embedded import LocalServices, PortTaken
from .local_secrets import write_private

log = logging.getLogger(__name__)

STATE_FILE = "services.json"  # in the data folder: each embedded service's pid, port and log


@dataclass(frozen=True)
class RestartPolicy:
    max_restarts: int = 5
    window_s: float = 60.0
    first_backoff_s: float = 0.5
    max_backoff_s: float = 8.0

    def backoff_s(self, recent_deaths: int) -> float:
        return min(self.max_backoff_s, self.first_backoff_s * 2 ** max(0, recent_deaths - 1))


class ServiceSupervisor:
    """Watches the embedded services of `services` from a thread of its own.

    `report(line)` is told when a part goes down and when it is back; `on_back(name)` runs after a
    restart (the stack sweeps when Redis came back empty); `on_fatal(message)` once, when the stack
    must stop because a service will not come back."""

    def __init__(self, services: LocalServices, policy: RestartPolicy, *, report: Callable[[str], None],
                 on_back: Callable[[str], None], on_fatal: Callable[[str], None], poll_s: float = 0.2):
        self.services = services
        self.policy = policy
        self.report = report
        self.on_back = on_back
        self.on_fatal = on_fatal
        self.poll_s = poll_s
        self.failure: str | None = None
        self._deaths: dict[str, deque[float]] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="service-supervisor", daemon=True)

    @property
    def state_path(self) -> Path:
        return self.services.root / STATE_FILE

    def start(self) -> "ServiceSupervisor":
        self.write_state()
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop watching; a restart under way finishes first (its start is bounded by its own deadline)."""
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(120)

    def write_state(self) -> None:
        """Each embedded service's pid, port and log, for whoever must find or stop them (tests; a user
        whose stack was killed). No credential: those stay in each service's credentials.json."""
        state = {name: {"pid": service.process.pid if service.process else None, "port": service.port,
                        "log": str(service.log_path)}
                 for name, service in self.services.embedded()}
        write_private(self.state_path, json.dumps(state, indent=2) + "\n")

    def _watch(self) -> None:
        while not self._stopping.wait(self.poll_s):
            for name, service in self.services.embedded():
                if service.process is not None and service.process.poll() is not None:
                    if not self._bring_back(name, service):
                        return

    def _bring_back(self, name: str, service) -> bool:
        """Restart a dead service; False once the stack must stop (or is stopping)."""
        self.report(f"{name} is down (exit code {service.process.returncode}); restarting it on port {service.port}")
        deaths = self._deaths.setdefault(name, deque())
        while True:
            now = time.monotonic()
            deaths.append(now)
            while deaths and deaths[0] < now - self.policy.window_s:
                deaths.popleft()
            if len(deaths) > self.policy.max_restarts:
                return self._give_up(f"{name} died {len(deaths)} times within {self.policy.window_s:g} s; "
                                     f"the stack stops. See its log: {service.log_path}")
            if self._stopping.wait(self.policy.backoff_s(len(deaths))):
                return False
            try:
                service.start()
            except PortTaken as error:
                return self._give_up(f"{name} cannot come back: {error}; the stack stops so that no client "
                                     f"talks to another server there. See its log: {service.log_path}")
            except Exception as error:  # noqa: BLE001 - any failed start is one more death, reported
                log.debug("restart of %s failed", name, exc_info=True)  # the line below says why
                self.report(f"{name} did not start again: {str(error).splitlines()[0]}")
                continue
            self.write_state()
            self.report(f"{name} is back")
            self.on_back(name)
            return True

    def _give_up(self, message: str) -> bool:
        self.failure = message
        self.on_fatal(message)
        return False
