"""How many of a consumer's runs do their own work at once: statements, S3 PUTs, events, prompts;
everything but waiting on a provider stream. The others wait asleep for their turn.

Why: runs started together reach their section boundaries together. A hundred threads of one
process then all wanted the GIL for a few milliseconds each, and the threads that carry every
run's tokens (the stream loop, the delta flusher) waited behind all of them: with 200 jobs in
flight, tokens reached Redis up to 300 ms late. With a few runs busy at a time the same work takes
the same CPU, and the token carriers wait for a few threads instead of a hundred. A run gives its
turn back while it waits on a stream, or on section workers of its own."""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator


class BusyRuns:
    def __init__(self, size: int):
        self.size = size
        self._turns = threading.Semaphore(size)
        self._holding = threading.local()

    @contextmanager
    def busy(self) -> Iterator[None]:
        """This thread's run works: wait for a turn, and hold it until the block ends."""
        self._turns.acquire()
        self._holding.turn = True
        try:
            yield
        finally:
            self._holding.turn = False
            self._turns.release()

    @contextmanager
    def waiting(self) -> Iterator[None]:
        """This thread's run waits (a stream, its section workers): its turn goes to another
        meanwhile. A thread without a turn (a run started outside a consumer) just waits."""
        held = getattr(self._holding, "turn", False)
        if held:
            self._holding.turn = False
            self._turns.release()
        try:
            yield
        finally:
            if held:
                self._turns.acquire()
                self._holding.turn = True


UNLIMITED = BusyRuns(1 << 30)
