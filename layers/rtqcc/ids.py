"""External ids: jobs are `RTQCC-` plus a ULID, so ids sort by creation time; webhooks and their
deliveries have their own prefixes."""

from __future__ import annotations

import re

from ulid import ULID

PREFIX = "RTQCC-"
_PATTERN = re.compile(r"RTQCC-[0-9A-HJKMNP-TV-Z]{26}\Z")  # \Z: `$` would let a trailing newline in


def new_external_id() -> str:
    return PREFIX + str(ULID())


def is_external_id(value: str) -> bool:
    return bool(_PATTERN.match(value))


# Webhook endpoints (`wh_` and a ULID) and their deliveries (`msg_` and 32 hex digits, made by
# Postgres in the statement that writes the delivery: store/webhooks.py).
WEBHOOK_PREFIX = "wh_"
_WEBHOOK_PATTERN = re.compile(r"wh_[0-9A-HJKMNP-TV-Z]{26}\Z")
_DELIVERY_PATTERN = re.compile(r"msg_[0-9a-f]{32}\Z")


def new_webhook_id() -> str:
    return WEBHOOK_PREFIX + str(ULID())


def is_webhook_id(value: str) -> bool:
    return bool(_WEBHOOK_PATTERN.match(value))


def is_delivery_id(value: str) -> bool:
    return bool(_DELIVERY_PATTERN.match(value))
