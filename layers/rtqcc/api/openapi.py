"""The OpenAPI document, generated from the request and response models. Every Chalice route
has an entry here and every entry a route (tests check both ways)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from .. import __version__
from ..delivery.formats import FORMATS
from . import models


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    responses: dict[int, type[BaseModel] | str | tuple[str, ...]]  # a model (JSON), or media types of text
    body: type[BaseModel] | None = None
    auth: bool = True
    query: tuple[str, ...] = field(default=())
    query_values: dict[str, tuple[str, ...]] = field(default_factory=dict)  # the values a query parameter takes


_ERRORS = {400: models.ErrorBody, 401: models.ErrorBody, 404: models.ErrorBody}
_JOB = "/jobs/{external_id}"
_SECTION = f"{_JOB}/sections/{{index}}"
_WEBHOOK = "/webhooks/{webhook_id}"
# Verbs that put a job in the queue are checked against the tenant's quotas (quota_exceeded).
_QUEUEING = {verb: {429: models.ErrorBody} for verb in ("start", "resume", "retry")}

OPERATIONS = (
    Operation("POST", "/jobs", "Create a job", {201: models.JobCreated, 413: models.ErrorBody, 415: models.ErrorBody,
                                               422: models.ErrorBody, 429: models.ErrorBody, **_ERRORS},
              body=models.CreateJobIn),
    Operation("GET", "/jobs", "List jobs, newest first", {200: models.JobPage, **_ERRORS},
              query=("status", "limit", "cursor")),
    Operation("GET", _JOB, "Get a job", {200: models.JobDocument, **_ERRORS}),
    Operation("DELETE", _JOB, "Delete a job for good: stopped if running, then its rows, objects and events",
              {202: models.JobDeleted, **_ERRORS}),
    *(Operation("POST", f"{_JOB}/{verb}", f"{verb.capitalize()} a job",
                {202: models.JobDocument, 409: models.ErrorBody, **_QUEUEING.get(verb, {}), **_ERRORS})
      for verb in ("start", "pause", "resume", "cancel", "retry")),
    Operation("GET", f"{_JOB}/stream", "Follow a job's events (Server-Sent Events)",
              {200: "text/event-stream", 204: "text/plain", **_ERRORS}, query=("lastEventId", "last_event_id", "access_token")),
    Operation("POST", f"{_JOB}/stream-token", "Get a short-lived token for EventSource", {201: models.StreamToken, **_ERRORS}),
    Operation("GET", f"{_JOB}/manuscript", "Get the finished manuscript: markdown, HTML, DOCX or PDF (?format=, else Accept)",
              {200: tuple(f.media_type for f in FORMATS.values()), 303: "text/plain", 406: models.ErrorBody,
               409: models.ErrorBody, **_ERRORS},
              query=("format",), query_values={"format": tuple(FORMATS)}),
    Operation("GET", f"{_JOB}/sections/{{index}}", "Get one section", {200: models.SectionDocument, **_ERRORS}),
    Operation("PUT", f"{_JOB}/outline", "Replace the outline (created or awaiting review)",
              {200: models.JobDocument, 409: models.ErrorBody, 422: models.ErrorBody, **_ERRORS}, body=models.OutlineIn),
    Operation("POST", f"{_JOB}/approve", "Approve the outline and queue the writing",
              {202: models.JobDocument, 409: models.ErrorBody, 429: models.ErrorBody, **_ERRORS}),
    Operation("POST", f"{_SECTION}/regenerate", "Write a new version of a section (and, with cascade, of the later ones)",
              {202: models.JobDocument, 409: models.ErrorBody, 422: models.ErrorBody, 429: models.ErrorBody, **_ERRORS},
              body=models.RegenerateIn),
    Operation("PUT", _SECTION, "Store a person's version of a section (If-Match: its ETag)",
              {200: models.SectionVersion, 409: models.ErrorBody, 412: models.ErrorBody, 422: models.ErrorBody,
               428: models.ErrorBody, **_ERRORS}, body=models.EditSectionIn),
    *(Operation("POST", f"{_SECTION}/{verb}", f"{verb.capitalize()} a section against rewriting by the model",
                {200: models.SectionLock, 409: models.ErrorBody, **_ERRORS}) for verb in ("lock", "unlock")),
    Operation("GET", f"{_SECTION}/versions", "List a section's versions", {200: models.VersionList, **_ERRORS}),
    Operation("GET", f"{_SECTION}/versions/{{version}}", "Get one version of a section, with its text",
              {200: models.SectionVersionWithContent, **_ERRORS}),
    Operation("POST", f"{_SECTION}/versions/{{version}}/restore", "Make an earlier version current again, as a new one",
              {201: models.SectionVersion, 409: models.ErrorBody, 412: models.ErrorBody, **_ERRORS}),
    Operation("POST", f"{_JOB}/fork", "Create a job that shares this one's first sections and writes the rest",
              {201: models.JobDocument, 409: models.ErrorBody, 422: models.ErrorBody, **_ERRORS}, body=models.ForkIn),
    Operation("POST", "/webhooks", "Register a webhook endpoint (its signing secret is shown once)",
              {201: models.WebhookWithSecret, 409: models.ErrorBody, 413: models.ErrorBody, 415: models.ErrorBody,
               422: models.ErrorBody, **_ERRORS}, body=models.WebhookIn),
    Operation("GET", "/webhooks", "List the tenant's webhook endpoints (no secrets)", {200: models.WebhookList, **_ERRORS}),
    Operation("GET", _WEBHOOK, "Get a webhook endpoint", {200: models.Webhook, **_ERRORS}),
    Operation("DELETE", _WEBHOOK, "Delete a webhook endpoint and its delivery log", {204: "text/plain", **_ERRORS}),
    Operation("POST", f"{_WEBHOOK}/rotate-secret",
              "A new signing secret, shown once; the previous one signs beside it for a grace period",
              {200: models.WebhookWithSecret, **_ERRORS}),
    Operation("GET", f"{_WEBHOOK}/deliveries", "An endpoint's deliveries, newest first",
              {200: models.WebhookDeliveryPage, **_ERRORS}, query=("limit", "cursor")),
    Operation("POST", f"{_WEBHOOK}/deliveries/{{delivery_id}}/redeliver",
              "Send a delivery again now, with the same webhook-id", {202: models.WebhookDelivery, **_ERRORS}),
    Operation("GET", "/usage", "The tenant's usage per UTC day or model (billed as reported, else counted)",
              {200: models.UsageReport, **_ERRORS}, query=("from", "to", "group_by")),
    Operation("GET", "/metrics", "Prometheus metrics", {200: "text/plain"}, auth=False),
    Operation("GET", "/openapi.json", "This document", {200: "application/json"}, auth=False),
    Operation("GET", "/healthz", "Liveness", {200: models.Health}, auth=False),
    Operation("GET", "/readyz", "Readiness: Redis, Postgres and S3", {200: models.Readiness, 503: models.Readiness},
              auth=False),
)


@lru_cache(maxsize=1)
def openapi_document() -> dict:
    used = {op.body for op in OPERATIONS if op.body} | {
        r for op in OPERATIONS for r in op.responses.values() if isinstance(r, type)}
    _, definitions = models_json_schema([(m, "validation" if m.__name__.endswith("In") else "serialization")
                                         for m in sorted(used, key=lambda m: m.__name__)],
                                        ref_template="#/components/schemas/{model}")
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        entry: dict = {"summary": op.summary, "operationId": _operation_id(op), "responses": {}}
        params = [{"name": name[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
                  for name in op.path.split("/") if name.startswith("{")]
        params += [{"name": name, "in": "query", "required": False,
                    "schema": {"type": "string", **({"enum": list(op.query_values[name])} if name in op.query_values
                                                    else {})}} for name in op.query]
        if params:
            entry["parameters"] = params
        if op.body:
            entry["requestBody"] = {"required": True, "content": {"application/json": {
                "schema": {"$ref": f"#/components/schemas/{op.body.__name__}"}}}}
        for status, answer in op.responses.items():
            if isinstance(answer, (str, tuple)):
                content = {media: {"schema": {"type": "string"}} for media in
                           ((answer,) if isinstance(answer, str) else answer)}
            else:
                content = {"application/json": {"schema": {"$ref": f"#/components/schemas/{answer.__name__}"}}}
            entry["responses"][str(status)] = {"description": _describe(status), "content": content}
        if op.auth:
            entry["security"] = [{"bearer": []}]
        paths.setdefault(op.path, {})[op.method.lower()] = entry
    return {
        "openapi": "3.1.0",
        "info": {"title": "RTQCC", "version": __version__,
                 "description": "Durable long-document generation jobs: create, watch live, pause, resume, cancel,"
                                " review the outline, regenerate, edit and lock sections, keep every version, fork; signed webhooks."
                                " Field names are snake_case; `externalId` keeps its historical camelCase; the query"
                                " parameter `lastEventId` mirrors the SSE `Last-Event-ID` header (EventSource's name)"
                                " and `last_event_id` is accepted too."},
        "paths": paths,
        "components": {"schemas": definitions.get("$defs", {}),
                       "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}},
    }


def _operation_id(op: Operation) -> str:
    words = [p.strip("{}") for p in op.path.split("/") if p]
    return op.method.lower() + "_" + "_".join(words).replace("-", "_").replace(".", "_")


def _describe(status: int) -> str:
    return {200: "OK", 201: "Created", 202: "Accepted", 204: "No content", 400: "Bad request",
            303: "See the Location header: a presigned download, past the size a function may answer",
            406: "The Accept header names no format this comes in",
            401: "Missing or invalid API key", 404: "Not found", 409: "Conflict with the job's state (webhooks: the"
            " tenant has as many endpoints as it may)",
            412: "If-Match names a version that is no longer current", 413: "Body too large", 415: "Not JSON", 422: "Invalid body (also: a model not allowed, a budget above the"
            " tenant's cap, a cost limit on a model without a price)",
            429: "A quota is used up (quota_exceeded: tokens or cost today, with Retry-After until 00:00 UTC; jobs"
            " queued or running at once) or too many requests (rate_limited, with Retry-After)",
            428: "If-Match is required", 503: "A dependency is unavailable"}[status]
