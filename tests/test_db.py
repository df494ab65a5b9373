"""Postgres access: a statement with parameters is prepared once on each connection and sent in
one round trip after; the connection keeps a bounded number of them; one the server forgot (a
pooler that reset the session) is prepared again. Real Postgres."""

from __future__ import annotations

import pytest
from rtqcc.errors import ServiceUnavailable
from rtqcc.store import db as db_module

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
