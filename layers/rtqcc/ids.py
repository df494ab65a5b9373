"""External job ids: `RTQCC-` plus a ULID, so ids sort by creation time."""

from __future__ import annotations

import re

from ulid import ULID

PREFIX = "RTQCC-"
_PATTERN = re.compile(r"RTQCC-[0-9A-HJKMNP-TV-Z]{26}\Z")  # \Z: `$` would let a trailing newline in


def new_external_id() -> str:
    return PREFIX + str(ULID())


def is_external_id(value: str) -> bool:
    return bool(_PATTERN.match(value))
