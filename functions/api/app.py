"""Entry module of the API function (Chalice requires the name app.py).

Besides the HTTP routes it declares the scheduled functions, so `chalice package` puts them, their
schedules, timeouts and reserved concurrency into the same template:
- `consumer`: `rtqcc.run.consumer.lambda_handler` (deployed as `app.consumer`, the only consumer entry
  point); each invocation drains `jobs:pending` until its time is nearly spent.
- `sweeper`: `rtqcc.run.sweeper.sweep`, which re-enqueues the jobs Postgres says should run (after Redis
  lost data, or a lease expired with nobody to reclaim it).
- `pruner`: `rtqcc.run.deletion.prune`, which deletes finished jobs past their tenant's retention and
  finishes deletions left half-done (`rtqcc prune`).
And `migrate`, invoked by hand after a deploy (`aws lambda invoke`), since only the functions'
VPC reaches the database: it applies the schema migrations the database lacks (`rtqcc migrate`)."""

import json
import logging
import os

from chalice import Rate

from rtqcc import tracing
from rtqcc.api import create_app
from rtqcc.logs import configure_logging
from rtqcc.services import Services
from rtqcc.settings import Settings


def _services() -> Services:
    return Services(Settings.from_env())


def _api_services() -> Services:
    # Checked when the first request builds the clients (not at import, which `chalice package`
    # does too): a deployment missing a secret serves nothing and logs the variable to set.
    settings = Settings.from_env()
    settings.check_serving()
    return Services(settings)


configure_logging()  # JSON lines carrying externalId and requestId, for CloudWatch
# Only the OTEL_* variables are read here (the rest when the first request needs the clients);
# unset, nothing of OpenTelemetry is imported.
tracing.configure(tracing.TracingSettings.from_env(os.environ))
app = create_app(_api_services)

# Each is built on its first invocation: the API function's containers never import or open them.
_drain: list = []
_sweeper_services: list[Services] = []
_pruner_services: list[Services] = []


@app.schedule(Rate(1, unit=Rate.MINUTES), name="consumer",
              description="Drains jobs:pending until the invocation's time budget is nearly spent")
def consumer(event):
    if not _drain:
        from rtqcc.run.consumer import lambda_handler

        _drain.append(lambda_handler(_services))
    return _drain[0](event.to_dict(), event.context)


@app.schedule(Rate(5, unit=Rate.MINUTES), name="sweeper",
              description="Re-enqueues the jobs Postgres says should run")
def sweeper(event):
    from rtqcc.run.sweeper import sweep

    if not _sweeper_services:
        _sweeper_services.append(_services())
    result = sweep(_sweeper_services[0])
    summary = {"requeued": len(result.requeued), "queue_was_lost": result.queue_was_lost}
    logging.getLogger("rtqcc.run.sweeper").info("sweep finished %s", json.dumps(summary))
    return summary


@app.schedule(Rate(1, unit=Rate.HOURS), name="pruner",
              description="Deletes finished jobs past their tenant's retention; finishes interrupted deletions")
def pruner(event):
    from rtqcc.run.deletion import prune

    if not _pruner_services:
        _pruner_services.append(_services())
    result = prune(_pruner_services[0], limit=PRUNE_LIMIT)
    summary = {"deleted": result.deleted, "waiting": result.waiting, "failed": len(result.failed)}
    logging.getLogger("rtqcc.run.deletion").info("prune finished %s", json.dumps(summary))
    return summary


PRUNE_LIMIT = 500  # jobs per hourly run: well within the function's timeout


@app.lambda_function(name="migrate")
def migrate(event, context):
    from rtqcc.store.db import Database
    from rtqcc.store.migrate import migrate as apply_migrations

    db = Database(Settings.from_env().database_url)
    try:
        return {"applied": apply_migrations(db)}
    finally:
        db.close()
