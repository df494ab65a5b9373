"""Structured JSON logs. Every record carries the externalId and request id in force, set with
`log_context(...)` where they become known (the API edge, the consumer's job loop), and the
trace and span ids when traces are on."""

from __future__ import annotations

import contextvars
import logging
import sys
from contextlib import contextmanager
from typing import Iterator

from pythonjsonlogger.json import JsonFormatter

from . import tracing
from .redact import redact_urls

_context: contextvars.ContextVar[dict[str, str]] = contextvars.ContextVar("rtqcc_log_context", default={})


@contextmanager
def log_context(**fields: str | None) -> Iterator[None]:
    token = _context.set({**_context.get(), **{k: v for k, v in fields.items() if v}})
    try:
        yield
    finally:
        _context.reset(token)


class _RedactingJsonFormatter(JsonFormatter):
    """Every line is redacted as a whole, tracebacks included: a credential in a URL that some
    library put in its exception message never reaches the log."""

    def format(self, record: logging.LogRecord) -> str:
        return redact_urls(super().format(record))


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        for key, value in _context.get().items():
            setattr(record, key, value)
        if (ids := tracing.current_ids()) is not None:  # a line joins its trace in the trace viewer
            record.trace_id, record.span_id = ids
        return True


def configure_logging(level: str = "INFO", stream=None) -> None:
    """JSON lines on stderr (what CloudWatch and `kubectl logs` want), once per process."""
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(_RedactingJsonFormatter(
        "{asctime}{levelname}{name}{message}", style="{", rename_fields={"levelname": "level", "asctime": "time"}))
    handler.addFilter(_ContextFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
