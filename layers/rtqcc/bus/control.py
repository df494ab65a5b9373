"""Stopping a running job, in the manner of rq's `command.py`: the channel, the sending side (the
API's pause and cancel) and the listening side (the lease keeper beside a run) in one place.

A command is a hint, not the truth: Postgres has already recorded the new state when it is sent,
and the lease keeper also polls Postgres, so a command lost with Redis only costs a poll's delay."""

from __future__ import annotations

from enum import StrEnum

from redis import Redis


class ControlCommand(StrEnum):
    PAUSE = "pause"    # stop the run and keep the partial text for resume
    CANCEL = "cancel"  # stop the run for good
    WAKE = "wake"      # no command: wakes the listener so it notices it should stop listening


_PREFIX, _SUFFIX = "job:", ":control"
EVERY_JOB = f"{_PREFIX}*{_SUFFIX}"  # the pattern of every job's channel


def control_channel(external_id: str) -> str:
    """The pub/sub channel of one job's commands."""
    return f"{_PREFIX}{external_id}{_SUFFIX}"


def send_control(redis: Redis, external_id: str, command: ControlCommand) -> None:
    redis.publish(control_channel(external_id), command.value)


class ControlListener:
    """The commands sent to any job, on one connection for a whole consumer process: it
    subscribes to the pattern of every job's channel once, however many jobs it runs, so a job it
    takes after that has no window in which a command could pass unheard. Commands are few (a
    person pressed pause), so hearing those of jobs run elsewhere costs nothing worth a
    subscription per job. `wake()` interrupts a `wait()` from another thread."""

    def __init__(self, redis: Redis, name: str):
        self.redis = redis
        self._wake_channel = f"consumer:{name}:wake"
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)
        self.listening = False

    def listen(self) -> bool:
        """Subscribe, if not yet done; False while Redis is away (try again later)."""
        if not self.listening:
            try:
                self._pubsub.psubscribe(EVERY_JOB)
                self._pubsub.subscribe(self._wake_channel)
            except Exception:
                return False
            self.listening = True
        return True

    def __enter__(self) -> "ControlListener":
        self.listen()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._pubsub.close()
        except Exception:  # closing a connection Redis already dropped is not an error
            pass

    def wait(self, timeout_s: float) -> tuple[str, ControlCommand] | None:
        """The next (external id, command) within `timeout_s`, or None (also for a wake).
        Redis errors are the caller's to handle; the subscriptions are renewed on reconnection."""
        message = self._pubsub.get_message(timeout=timeout_s)
        if not message or message.get("type") != "pmessage":
            return None
        channel = message["channel"]
        try:
            command = ControlCommand(message["data"])
        except ValueError:
            return None
        return channel[len(_PREFIX):-len(_SUFFIX)], command

    def wake(self) -> None:
        self.redis.publish(self._wake_channel, ControlCommand.WAKE.value)
