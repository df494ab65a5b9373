"""Named crash points for fault tests. `RTQCC_CRASH_AT=after_s3_put:2` makes the process kill
itself (SIGKILL: no cleanup, like a power cut) the 2nd time it passes `after_s3_put`. Unset,
every check is one comparison."""

from __future__ import annotations

import os
import signal

from ..errors import ConfigError

POINTS = (
    "mid_token",      # inside a section's stream, after the given number of deltas
    "after_s3_put",   # a section's content is in S3, its row not yet marked done
    "after_commit",   # the section's row is marked done, its events not yet published
    "before_ack",     # the job is finished, its queue message not yet acknowledged
)


class Failpoints:
    def __init__(self, spec: str | None = None):
        self._point: str | None = None
        self._remaining = 0
        if spec:
            name, _, count = spec.partition(":")
            if name not in POINTS or (count and not count.isdigit()):
                raise ConfigError(f"RTQCC_CRASH_AT must be one of {', '.join(POINTS)}, optionally ':N'; got {spec!r}")
            self._point, self._remaining = name, int(count or 1)

    def hit(self, name: str) -> None:
        if self._point != name:
            return
        self._remaining -= 1
        if self._remaining <= 0:
            os.kill(os.getpid(), signal.SIGKILL)


DISABLED = Failpoints()
