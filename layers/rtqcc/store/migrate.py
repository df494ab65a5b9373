"""Versioned SQL migrations, applied in order, each once, under an advisory lock."""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources

from .db import Database

# Any constant works; it only has to be the same for every process migrating this database.
_LOCK_KEY = 0x5254_5143


@dataclass(frozen=True)
class Migration:
    version: str
    sql: str


def available_migrations() -> list[Migration]:
    folder = resources.files("rtqcc.store") / "migrations"
    found = [
        Migration(version=entry.name.removesuffix(".sql"), sql=entry.read_text(encoding="utf-8"))
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    ]
    return sorted(found, key=lambda m: m.version)


def pending_migrations(db: Database) -> list[str]:
    """The versions this code has and the database has not applied yet (all, on a new database).
    Reads only: safe against a live database, as a deploy pipeline's check."""
    with db.connection() as conn:
        if conn.row("SELECT to_regclass('schema_migrations') IS NOT NULL AS present")["present"]:
            done = {row["version"] for row in conn.rows("SELECT version FROM schema_migrations")}
        else:
            done = set()
    return [migration.version for migration in available_migrations() if migration.version not in done]


def migrate(db: Database) -> list[str]:
    """Apply the migrations this database lacks; return the versions applied now."""
    applied_now: list[str] = []
    with db.connection() as conn:
        conn.run("SELECT pg_advisory_lock(:key)", key=_LOCK_KEY)
        try:
            conn.run(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            done = {row["version"] for row in conn.rows("SELECT version FROM schema_migrations")}
            for migration in available_migrations():
                if migration.version in done:
                    continue
                conn.run("BEGIN")
                try:
                    conn.raw.execute_simple(migration.sql)
                    conn.run("INSERT INTO schema_migrations (version) VALUES (:v)", v=migration.version)
                    conn.run("COMMIT")
                except BaseException:
                    conn.run("ROLLBACK")
                    raise
                applied_now.append(migration.version)
        finally:
            conn.run("SELECT pg_advisory_unlock(:key)", key=_LOCK_KEY)
    return applied_now


def ensure_database(database_url: str) -> bool:
    """Create the database named in the URL when missing (local use); True if it was created."""
    from urllib.parse import urlparse, urlunparse

    import pg8000.native

    from .db import connect_kwargs

    name = connect_kwargs(database_url)["database"]
    # Through Database, so the URL's sslmode is applied as for every other connection.
    admin = Database(urlunparse(urlparse(database_url)._replace(path="/postgres")), max_size=1)
    try:
        if admin.row("SELECT 1 AS present FROM pg_database WHERE datname = :n", n=name):
            return False
        admin.run(f"CREATE DATABASE {pg8000.native.identifier(name)}")
        return True
    finally:
        admin.close()
