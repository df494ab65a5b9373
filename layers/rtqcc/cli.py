"""The `rtqcc` command."""

from __future__ import annotations

import argparse
import logging
import sys

from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtqcc", description="Durable long-document generation jobs.")
    commands = parser.add_subparsers(dest="command", required=True)

    migrate_cmd = commands.add_parser("migrate", help="apply database migrations (idempotent)")
    migrate_cmd.add_argument("--create-database", action="store_true",
                             help="create the database named in DATABASE_URL if it is missing")

    demo_cmd = commands.add_parser("demo", help="run a sample manuscript job on the local stack")
    demo_cmd.add_argument("--sections", type=int, default=4)
    demo_cmd.add_argument("--output", default=None, help="where to write the manuscript (default: ./manuscript-<id>.md)")
    demo_cmd.add_argument("--data-dir", default=".rtqcc", help="folder for embedded services' data")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "demo":
            from rtqcc_emulator.demo import run_demo

            return run_demo(sections=args.sections, output=args.output, data_dir=args.data_dir)
    except ConfigError as exc:
        print(f"rtqcc: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


def _migrate(args: argparse.Namespace) -> int:
    from .db import Database
    from .migrate import ensure_database, migrate
    from .settings import Settings

    settings = Settings.from_env()
    if args.create_database and ensure_database(settings.database_url):
        print("created the database")
    db = Database(settings.database_url)
    try:
        applied = migrate(db)
    finally:
        db.close()
    print(f"applied {', '.join(applied)}" if applied else "the database is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
