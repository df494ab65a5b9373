"""Text that Postgres and UTF-8 can hold: no NUL characters, no unpaired surrogates."""

from __future__ import annotations

import re
from typing import Any

# Python strings hold code points: a surrogate found on its own is always unpaired.
_UNSTORABLE = re.compile("[\x00\ud800-\udfff]")


def strip_unstorable(text: str) -> str:
    """For provider output: drop what cannot be stored, keep the rest."""
    return _UNSTORABLE.sub("", text)


def find_unstorable(value: Any, path: str = "body") -> str | None:
    """For client input: the path of the first string (or key) that cannot be stored, if any."""
    if isinstance(value, str):
        return path if _UNSTORABLE.search(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and _UNSTORABLE.search(key):
                return f"{path} (a key)"
            found = find_unstorable(item, f"{path}.{key}")
            if found:
                return found
    if isinstance(value, list):
        for index, item in enumerate(value):
            found = find_unstorable(item, f"{path}.{index}")
            if found:
                return found
    return None


# XML 1.0 has no place for these (DOCX is XML; HTML parsers report them; PDF fonts lack them).
_NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def strip_xml_illegal(text: str) -> str:
    """For a document export: drop the control characters an XML document cannot hold."""
    return _NOT_IN_XML.sub("", text)
