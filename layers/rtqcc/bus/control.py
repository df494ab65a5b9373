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


def control_channel(external_id: str) -> str:
    """The pub/sub channel of one job's commands."""
    return f"job:{external_id}:control"


def send_control(redis: Redis, external_id: str, command: ControlCommand) -> None:
    redis.publish(control_channel(external_id), command.value)


class ControlListener:
    """The commands sent to one job, as they arrive (subscribe before relying on them)."""

    def __init__(self, redis: Redis, external_id: str):
        self.redis = redis
        self.external_id = external_id
        self._pubsub = redis.pubsub(ignore_subscribe_messages=True)

    def __enter__(self) -> "ControlListener":
        self._pubsub.subscribe(control_channel(self.external_id))
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            self._pubsub.close()
        except Exception:  # closing a connection Redis already dropped is not an error
            pass

    def wait(self, timeout_s: float) -> ControlCommand | None:
        """The next command within `timeout_s`, or None. Redis errors are the caller's to handle."""
        message = self._pubsub.get_message(timeout=timeout_s)
        if not message or message.get("type") != "message":
            return None
        try:
            return ControlCommand(message["data"])
        except ValueError:
            return None

    def wake(self) -> None:
        send_control(self.redis, self.external_id, ControlCommand.WAKE)
