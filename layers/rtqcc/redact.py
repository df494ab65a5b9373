"""Credentials out of text that goes to logs or error messages: the standard library only, since
settings use it before anything else is importable."""

from __future__ import annotations

import re

_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@\"']+@")
_TOKEN_PARAM = re.compile(r"(?P<name>\b(?:access_token|token|api_key|key)=)[^&\s\"']+")
_PROVIDER_KEY = re.compile(r"\bsk-[A-Za-z0-9_*-]{8,}")


def redact_urls(text: str) -> str:
    """`text` without credentials: userinfo in URLs, token query parameters, provider keys."""
    text = _USERINFO.sub(r"\g<scheme>***@", text)
    text = _TOKEN_PARAM.sub(r"\g<name>***", text)
    return _PROVIDER_KEY.sub("sk-***", text)
