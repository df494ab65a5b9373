"""Postgres access through pg8000: a small pool of native connections and transactions.

pg8000 connections are not thread-safe, and the emulator serves requests on threads, so each
caller checks one out for the length of a `with` block. A connection that failed is dropped
rather than returned, so a Postgres restart costs one failed call, not a poisoned pool.

TLS follows libpq's `sslmode` (and `sslrootcert`) in DATABASE_URL's query, `prefer` by default,
as libpq's: `disable`; `prefer` (TLS when the server offers it, unverified; `allow` is taken as
`prefer`); `require` (TLS or no connection, unverified, unless `sslrootcert` is given: then, as
libpq, `verify-ca`); `verify-ca` (the server's certificate signed by `sslrootcert`, else by the
system's authorities); `verify-full` (that, and issued for the host connected to).
"""

from __future__ import annotations

import queue
import ssl
import threading
import weakref
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterator
from urllib.parse import parse_qs, unquote, urlparse

import pg8000.native
from pg8000.exceptions import DatabaseError, InterfaceError

from ..errors import ConfigError, ServiceUnavailable
from ..redact import redact_urls

Row = dict[str, Any]

# too_many_connections, cannot_connect_now (starting up or shutting down)
_BUSY_CODES = {"53300", "57P03"}


SSL_MODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")
_URL_OPTIONS = ("sslmode", "sslrootcert")


def connect_kwargs(database_url: str) -> dict[str, Any]:
    """pg8000's connection arguments for DATABASE_URL; `ssl_context` None means libpq's `prefer`
    (pg8000 tries TLS and falls back), which `Database` does more cheaply."""
    parsed = urlparse(database_url)
    if parsed.scheme not in ("postgresql", "postgres"):
        raise ConfigError(f"DATABASE_URL must start with postgresql://, got {redact_urls(database_url)!r}")
    database = parsed.path.lstrip("/")
    if not database:
        raise ConfigError(f"DATABASE_URL must name a database, got {redact_urls(database_url)!r}")
    kwargs: dict[str, Any] = {
        "user": unquote(parsed.username or "postgres"),
        "host": parsed.hostname or "127.0.0.1",
        "port": parsed.port or 5432,
        "database": unquote(database),
        "ssl_context": _tls_for(parse_qs(parsed.query, keep_blank_values=True)),
    }
    if parsed.password:
        kwargs["password"] = unquote(parsed.password)
    return kwargs


def _tls_for(options: dict[str, list[str]]) -> ssl.SSLContext | bool | None:
    # An option we do not apply is refused, not ignored: a `sslcert` silently dropped would
    # connect without the client certificate its author counted on.
    unknown = sorted(set(options) - set(_URL_OPTIONS))
    if unknown:
        raise ConfigError(f"DATABASE_URL option {unknown[0]!r} is not supported; the options are "
                          f"{', '.join(_URL_OPTIONS)}.")
    mode = options.get("sslmode", ["prefer"])[-1]
    if mode not in SSL_MODES:
        raise ConfigError(f"DATABASE_URL sslmode={mode!r} is not one of {', '.join(SSL_MODES)}.")
    root_cert = options.get("sslrootcert", [None])[-1]
    if mode == "disable":
        return False
    if mode in ("allow", "prefer"):
        return None
    if mode == "require" and root_cert is None:
        return _unverified_tls()
    try:
        context = ssl.create_default_context(cafile=root_cert)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"DATABASE_URL sslrootcert={root_cert!r} is not a readable PEM file of certificates: "
                          f"{exc}") from None
    context.check_hostname = mode == "verify-full"
    return context


def _unverified_tls() -> ssl.SSLContext:
    """Encryption without checking whom it is with (libpq's `prefer` and `require`): it needs no
    certificate authorities, so none are loaded (the system's take ~30 ms of CPU to load)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


class Connection:
    """One checked-out connection: `rows()`, `row()` and `run()` with named `:params`."""

    def __init__(self, raw: pg8000.native.Connection):
        self.raw = raw

    def rows(self, sql: str, **params: Any) -> list[Row]:
        result = _Pg8000.run(self.raw, sql, params)
        if not self.raw.columns:
            return []
        names = [column["name"] for column in self.raw.columns]
        return [dict(zip(names, values)) for values in result or ()]

    def row(self, sql: str, **params: Any) -> Row | None:
        found = self.rows(sql, **params)
        return found[0] if found else None

    def run(self, sql: str, **params: Any) -> int:
        _Pg8000.run(self.raw, sql, params)
        return self.raw.row_count


class Database:
    """At most `max_size` connections open at once; a caller beyond that waits up to
    `acquire_timeout_s` for one, then gets a 503: Postgres's own limit is never the one hit."""

    def __init__(self, database_url: str, *, max_size: int = 16, connect_timeout_s: float = 5.0,
                 query_timeout_s: float = 120.0, acquire_timeout_s: float = 10.0):
        self._kwargs = connect_kwargs(database_url)
        self._kwargs["timeout"] = connect_timeout_s
        # `prefer`: pg8000 would make a context with the system's authorities for every connection
        # (for TLS that verifies nothing): one context without them instead, and a server that
        # refuses TLS is not asked again.
        self._tls_if_offered = None
        if self._kwargs["ssl_context"] is None:
            self._tls_if_offered = self._kwargs["ssl_context"] = _unverified_tls()
        self._query_timeout_s = query_timeout_s
        self._acquire_timeout_s = acquire_timeout_s
        self._max_size = max_size
        self._slots = threading.BoundedSemaphore(max_size)
        self._idle: queue.LifoQueue[pg8000.native.Connection] = queue.LifoQueue(maxsize=max_size)
        self.url = database_url

    def _open(self) -> pg8000.native.Connection:
        where = f"Postgres at {self._kwargs['host']}:{self._kwargs['port']}"
        try:
            raw = self._connect(where)
        except (InterfaceError, OSError) as exc:
            raise ServiceUnavailable(f"{where} is unreachable: {exc}", headers={"Retry-After": "2"}) from exc
        except DatabaseError as exc:
            code = _error_code(exc)
            if code in _BUSY_CODES:
                raise ServiceUnavailable(f"{where} refuses new connections now ({code}); try again shortly.",
                                         headers={"Retry-After": "2"}) from exc
            raise
        # Connecting has its own short timeout; queries get a longer one, so a dead server is noticed.
        _Pg8000.set_query_timeout(raw, self._query_timeout_s)
        return raw

    def _connect(self, where: str) -> pg8000.native.Connection:
        kwargs = self._kwargs  # as this attempt found them: other threads may be connecting too
        try:
            return pg8000.native.Connection(**kwargs)
        except InterfaceError as exc:
            if not _Pg8000.refused_tls(exc):
                raise
            if kwargs["ssl_context"] is not self._tls_if_offered:  # TLS was required
                raise ServiceUnavailable(f"{where} does not offer TLS, which DATABASE_URL's sslmode asks for.",
                                         headers={"Retry-After": "2"}) from exc
        # `prefer`, and the server has no TLS: connections are plain from now on.
        self._kwargs = {**kwargs, "ssl_context": False}
        return pg8000.native.Connection(**self._kwargs)

    @contextmanager
    def connection(self) -> Iterator[Connection]:
        if not self._slots.acquire(timeout=self._acquire_timeout_s):
            raise ServiceUnavailable(f"All {self._max_size} Postgres connections are busy; try again shortly.",
                                     headers={"Retry-After": "1"})
        try:
            try:
                raw = self._idle.get_nowait()
            except queue.Empty:
                raw = self._open()
            try:
                yield Connection(raw)
            except (InterfaceError, OSError) as exc:
                _close_quietly(raw)
                raise ServiceUnavailable(f"Lost the connection to Postgres: {exc}",
                                         headers={"Retry-After": "2"}) from exc
            except BaseException:
                self._give_back(raw)
                raise
            else:
                self._give_back(raw)
        finally:
            self._slots.release()

    def _give_back(self, raw: pg8000.native.Connection) -> None:
        # A connection left inside a transaction (an error mid-way) is rolled back before reuse.
        if _Pg8000.in_transaction(raw):
            try:
                raw.run("ROLLBACK")
            except Exception:
                _close_quietly(raw)
                return
        try:
            self._idle.put_nowait(raw)
        except queue.Full:
            _close_quietly(raw)

    @contextmanager
    def transaction(self) -> Iterator[Connection]:
        with self.connection() as conn:
            conn.raw.run("BEGIN")
            try:
                yield conn
            except BaseException:
                if _Pg8000.in_transaction(conn.raw):
                    try:
                        conn.raw.run("ROLLBACK")
                    except (InterfaceError, OSError, DatabaseError):
                        pass
                raise
            conn.raw.run("COMMIT")

    def rows(self, sql: str, **params: Any) -> list[Row]:
        with self.connection() as conn:
            return conn.rows(sql, **params)

    def row(self, sql: str, **params: Any) -> Row | None:
        with self.connection() as conn:
            return conn.row(sql, **params)

    def run(self, sql: str, **params: Any) -> int:
        with self.connection() as conn:
            return conn.run(sql, **params)

    def ping(self) -> None:
        self.row("SELECT 1 AS ok")

    def close(self) -> None:
        while True:
            try:
                _close_quietly(self._idle.get_nowait())
            except queue.Empty:
                return


def _error_code(exc: DatabaseError) -> str | None:
    """The SQLSTATE of a server error."""
    return exc.args[0].get("C") if exc.args and isinstance(exc.args[0], dict) else None


def _stale(exc: DatabaseError) -> bool:
    """The server no longer has a statement prepared earlier (a pooler in front reset the
    session), or it no longer fits (a table changed under it)."""
    code = _error_code(exc)
    return code == "26000" or (code == "0A000" and "cached plan" in str(exc.args[0].get("M", "")))


def _close_quietly(raw: pg8000.native.Connection) -> None:
    try:
        raw.close()
    except Exception:
        pass


# Statements kept prepared on each connection, the least recently used closed past this many.
PREPARED_PER_CONNECTION = 128


class _Pg8000:
    """What pg8000's public API does not offer, from its private attributes, in this one place
    (so an upgrade that renames them breaks here, visibly)."""

    _prepared: "weakref.WeakKeyDictionary[pg8000.native.Connection, OrderedDict[str, Any]]" = weakref.WeakKeyDictionary()

    @staticmethod
    def run(raw: pg8000.native.Connection, sql: str, params: dict[str, Any]) -> list | None:
        """`raw.run(sql, **params)` as a statement prepared once per connection. pg8000 sends a
        statement with parameters in three round trips (parse, describe, bind and execute), and
        Postgres parses and plans it each time; prepared, it is one round trip, planned once."""
        if not params:
            return raw.run(sql)  # the simple protocol: one round trip
        statements = _Pg8000._prepared.setdefault(raw, OrderedDict())
        statement = statements.get(sql)
        if statement is None:
            statement = statements[sql] = raw.prepare(sql)
            while len(statements) > PREPARED_PER_CONNECTION:
                statements.popitem(last=False)[1].close()
        else:
            statements.move_to_end(sql)
        try:
            rows = statement.run(**params)
        except DatabaseError as exc:
            if not _stale(exc):
                raise
            del statements[sql]
            if _Pg8000.in_transaction(raw):  # the transaction is lost with it: the caller's to retry
                raise ServiceUnavailable("Postgres lost a statement prepared on this connection (a pooler in front"
                                         " reset its session); try again.", headers={"Retry-After": "1"}) from exc
            # Nothing ran: prepared again and sent again, once.
            statement = statements[sql] = raw.prepare(sql)
            rows = statement.run(**params)
        raw._context = statement._context  # where raw.columns and raw.row_count read it
        return rows

    @staticmethod
    def refused_tls(exc: InterfaceError) -> bool:
        """The server answered a request for TLS with no (pg8000 says so in words only)."""
        return str(exc) == "Server refuses SSL"

    @staticmethod
    def set_query_timeout(raw: pg8000.native.Connection, timeout_s: float) -> None:
        raw._usock.settimeout(timeout_s)

    @staticmethod
    def in_transaction(raw: pg8000.native.Connection) -> bool:
        return raw._transaction_status != b"I"  # I: idle, outside a transaction
