"""Postgres access: a statement with parameters is prepared once on each connection and sent in
one round trip after; the connection keeps a bounded number of them; one the server forgot (a
pooler that reset the session) is prepared again. TLS as DATABASE_URL's sslmode says: a server
without it is asked once, not at every connection. Real Postgres."""

from __future__ import annotations

import re
import socket
import ssl
import threading
from urllib.parse import urlsplit, urlunsplit

import pytest
from rtqcc.errors import ConfigError, ServiceUnavailable
from rtqcc.store import db as db_module
from rtqcc.store.db import Database, connect_kwargs
from rtqcc.store.migrate import ensure_database

PREPARED = "SELECT COUNT(*)::int AS n FROM pg_prepared_statements"


def prepared_on(conn) -> int:
    return conn.row(PREPARED)["n"]  # no parameters: the simple protocol, nothing prepared


def test_a_statement_run_again_on_a_connection_is_prepared_once(database):
    with database.connection() as conn:
        before = prepared_on(conn)
        answers = [conn.row("SELECT CAST(:n AS int) + 1 AS next", n=n)["next"] for n in range(5)]
        assert answers == [1, 2, 3, 4, 5]
        assert prepared_on(conn) == before + 1


def test_a_connection_keeps_at_most_its_bound_of_prepared_statements(database, monkeypatch):
    monkeypatch.setattr(db_module, "PREPARED_PER_CONNECTION", 3)
    with database.connection() as conn:
        conn.run("DEALLOCATE ALL")
        for n in range(6):  # six different texts
            assert conn.row(f"SELECT CAST(:n AS int) * {n} AS product", n=2)["product"] == 2 * n
        assert prepared_on(conn) == 3
        # The most recent are kept, and still answer.
        assert conn.row("SELECT CAST(:n AS int) * 5 AS product", n=3)["product"] == 15
        assert prepared_on(conn) == 3


def test_a_statement_the_server_forgot_is_prepared_again(database):
    with database.connection() as conn:
        assert conn.row("SELECT CAST(:word AS text) AS echo", word="one")["echo"] == "one"
        conn.run("DEALLOCATE ALL")  # what a pooler resetting the session does
        assert conn.row("SELECT CAST(:word AS text) AS echo", word="two")["echo"] == "two"


def test_inside_a_transaction_a_forgotten_statement_fails_it_as_a_passing_outage_and_is_prepared_again_after(
        database):
    with database.connection() as conn:
        conn.row("SELECT CAST(:word AS text) AS echo", word="one")
        conn.run("DEALLOCATE ALL")
        conn.raw.run("BEGIN")
        with pytest.raises(ServiceUnavailable, match="try again"):
            conn.row("SELECT CAST(:word AS text) AS echo", word="two")
        conn.raw.run("ROLLBACK")
        assert conn.row("SELECT CAST(:word AS text) AS echo", word="three")["echo"] == "three"


def test_a_statement_whose_table_changed_under_it_is_prepared_again(database):
    with database.connection() as conn:
        conn.run("CREATE TEMPORARY TABLE shapes (id int PRIMARY KEY, name text)")
        conn.run("INSERT INTO shapes VALUES (1, 'square')")
        assert conn.row("SELECT * FROM shapes WHERE id = :id", id=1) == {"id": 1, "name": "square"}
        conn.run("ALTER TABLE shapes ADD COLUMN sides int DEFAULT 4")  # the prepared plan's rows no longer fit
        assert conn.row("SELECT * FROM shapes WHERE id = :id", id=1) == {"id": 1, "name": "square", "sides": 4}


# ---- TLS ----------------------------------------------------------------------------------------

TLS_REQUEST = (8).to_bytes(4, "big") + (80877103).to_bytes(4, "big")  # the protocol's SSLRequest


class CountingRelay:
    """A TCP relay to Postgres that plays a server without TLS, whatever the real one offers: it
    answers a request for TLS with no itself (as Postgres with ssl=off does) and passes the rest
    on. It counts the connections through it and those that opened by asking for TLS."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.connections = 0
        self.tls_requests = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str, query: str = "") -> str:
        parts = urlsplit(database_url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{self.port}" if userinfo else f"127.0.0.1:{self.port}"
        return urlunsplit((parts.scheme, netloc, parts.path, query, ""))

    def close(self) -> None:
        self.listener.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            self.connections += 1
            server = socket.create_connection(self.target)
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        first = True
        try:
            while data := source.recv(65536):
                if first and from_client and data.startswith(TLS_REQUEST):
                    self.tls_requests += 1
                    source.sendall(b"N")
                    data = data[len(TLS_REQUEST):]
                first = False
                if data:
                    sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass


@pytest.fixture
def relay(base_settings):
    target = connect_kwargs(base_settings.database_url)
    relay = CountingRelay(target["host"], target["port"])
    yield relay
    relay.close()


def test_a_server_without_tls_is_asked_for_it_once_then_connected_to_plainly(base_settings, relay):
    db = Database(relay.url(base_settings.database_url), max_size=3)  # sslmode unset: libpq's prefer
    try:
        with db.connection() as one, db.connection() as two, db.connection() as three:
            for conn in (one, two, three):
                assert conn.row("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")["ssl"] is False
        assert relay.tls_requests == 1
        assert relay.connections == 4  # the one refused TLS, then three plain ones
    finally:
        db.close()


def test_connections_opened_at_once_against_a_server_without_tls_all_succeed(base_settings, relay):
    db = Database(relay.url(base_settings.database_url), max_size=8)
    start, answers, failures = threading.Barrier(8), [], []

    def query() -> None:
        start.wait()
        try:
            with db.connection() as conn:
                answers.append(conn.row("SELECT 1 AS n")["n"])
        except Exception as exc:  # one refused TLS must not fail the others, asked at the same time
            failures.append(exc)

    threads = [threading.Thread(target=query) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert failures == [] and answers == [1] * 8
    finally:
        db.close()


def test_sslmode_disable_never_asks_for_tls(base_settings, relay):
    db = Database(relay.url(base_settings.database_url, "sslmode=disable"), max_size=2)
    try:
        with db.connection() as one, db.connection() as two:
            assert one.row("SELECT 1 AS n")["n"] == two.row("SELECT 1 AS n")["n"] == 1
        assert (relay.tls_requests, relay.connections) == (0, 2)
    finally:
        db.close()


def test_sslmode_require_does_not_connect_to_a_server_without_tls_and_says_why(base_settings, relay):
    with pytest.raises(ServiceUnavailable, match="does not offer TLS, which DATABASE_URL's sslmode asks for"):
        Database(relay.url(base_settings.database_url, "sslmode=require")).ping()
    assert relay.tls_requests == 1


def test_the_database_is_looked_for_and_created_under_the_urls_sslmode_too(base_settings, relay):
    with pytest.raises(ServiceUnavailable, match="does not offer TLS, which DATABASE_URL's sslmode asks for"):
        ensure_database(relay.url(base_settings.database_url, "sslmode=require"))
    assert ensure_database(relay.url(base_settings.database_url, "sslmode=disable")) is False  # it exists
    assert relay.tls_requests == 1


def test_a_root_certificate_given_makes_require_check_the_server_as_libpq_does(tmp_path):
    root = tmp_path / "root.pem"
    root.write_bytes(_self_signed_certificate("db.example"))
    assert connect_kwargs("postgresql://app@db.example/rtqcc?sslmode=require")["ssl_context"].verify_mode == ssl.CERT_NONE
    checked = connect_kwargs(f"postgresql://app@db.example/rtqcc?sslmode=require&sslrootcert={root}")["ssl_context"]
    assert checked.verify_mode == ssl.CERT_REQUIRED and not checked.check_hostname
    full = connect_kwargs(f"postgresql://app@db.example/rtqcc?sslmode=verify-full&sslrootcert={root}")["ssl_context"]
    assert full.verify_mode == ssl.CERT_REQUIRED and full.check_hostname


@pytest.mark.parametrize("query, message", [
    ("sslmode=on", "sslmode='on' is not one of disable, allow, prefer, require, verify-ca, verify-full"),
    ("sslcert=client.pem", "option 'sslcert' is not supported; the options are sslmode, sslrootcert"),
    ("sslmode=verify-full&sslrootcert=/nonexistent/root.pem", "sslrootcert='/nonexistent/root.pem' is not a readable"),
])
def test_a_database_url_option_that_would_not_be_applied_is_refused_naming_it(query, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as refused:
        connect_kwargs(f"postgresql://app:s3cret@db.example:5432/rtqcc?{query}")
    assert "s3cret" not in str(refused.value)


def _self_signed_certificate(name: str) -> bytes:
    from datetime import datetime, timedelta, timezone

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.now(timezone.utc)
    certificate = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                   .serial_number(x509.random_serial_number()).not_valid_before(now)
                   .not_valid_after(now + timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                   .sign(key, hashes.SHA256()))
    return certificate.public_bytes(serialization.Encoding.PEM)
