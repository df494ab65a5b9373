"""The one event loop on which every provider stream of a process runs.

A run's thread asks for an answer and sleeps until it is complete; the tokens arrive on this
loop's thread, which hands each to the run's `on_delta`. Why not a thread per stream: with
hundreds of streams in flight, each token woke its stream's thread, and the wake-ups (futexes,
the GIL passed from thread to thread) were a consumer's largest single cost: measured with 250
streams at 50 tokens/s, 43 µs of CPU a token woken on a thread against 10 µs on one loop.

An abort cancels the stream's task from whichever thread raises it; the coroutine meets
`asyncio.CancelledError` where it waits and ends as an aborted answer."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextvars
import os
import threading
from typing import Awaitable, Callable, TypeVar

from ..abort import AbortSignal

T = TypeVar("T")

_lock = threading.Lock()
_loop: asyncio.AbstractEventLoop | None = None
_loop_pid: int | None = None


def _loop_of_this_process() -> asyncio.AbstractEventLoop:
    """Started at the first stream; a forked child starts its own (the parent's thread is not in it)."""
    global _loop, _loop_pid
    with _lock:
        if _loop is None or _loop_pid != os.getpid():
            loop = asyncio.new_event_loop()
            threading.Thread(target=loop.run_forever, name="provider-streams", daemon=True).start()
            _loop, _loop_pid = loop, os.getpid()
        return _loop


def run_stream(make: Callable[[], Awaitable[T]], abort: AbortSignal | None = None) -> T:
    """Run `make()` on the process's stream loop, in this thread's context (its log fields and
    trace), and return its result (or raise its error) once it ends. `abort` cancels it; the
    coroutine must catch `asyncio.CancelledError` and return what it has."""
    loop = _loop_of_this_process()
    context = contextvars.copy_context()
    finished: concurrent.futures.Future = concurrent.futures.Future()

    def start() -> None:
        task = loop.create_task(make(), context=context)
        # Scheduled, never run on the spot: an abort raised already reaches the task after its
        # first step, inside the coroutine's own handling.
        unregister = (abort.on_abort(lambda: loop.call_soon_threadsafe(task.cancel)) if abort is not None
                      else lambda: None)
        task.add_done_callback(lambda done: (unregister(), _settle(finished, done)))

    loop.call_soon_threadsafe(start)
    return finished.result()


def _settle(finished: concurrent.futures.Future, task: asyncio.Task) -> None:
    if task.cancelled():
        finished.set_exception(asyncio.CancelledError("the stream was cancelled outside its own handling"))
    elif task.exception() is not None:
        finished.set_exception(task.exception())
    else:
        finished.set_result(task.result())
