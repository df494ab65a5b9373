"""The tenant's usage for billing: `GET /usage?from=&to=&group_by=day|model`. Each figure sums
the same calls as the jobs' own `usage` (billed as reported, else counted), and a deleted job's
usage stays counted (store/deletion.py keeps it without the job)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

from ..errors import BadRequest
from ..store.usage import money
from ..store.usage_report import usage_between
from .edge import ApiCall, route

MAX_DAYS = 366  # a year, leap day included: one statement over a bounded range
DEFAULT_DAYS = 30
GROUPINGS = ("day", "model")


@route("/usage", "GET")
def usage(call: ApiCall) -> dict:
    owner = call.tenant()
    params = call.params
    group_by = params.get("group_by", "day")
    if group_by not in GROUPINGS:
        raise BadRequest(f"group_by must be day or model, got {group_by[:40]!r}.")
    today = datetime.now(timezone.utc).date()
    last = _day(params, "to") or today
    first = _day(params, "from") or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise BadRequest(f"from ({first}) is after to ({last}).")
    if (last - first).days + 1 > MAX_DAYS:
        raise BadRequest(f"The range from {first} to {last} is {(last - first).days + 1} days; ask for at most "
                         f"{MAX_DAYS} at once.")
    db = call.svc.db
    groups = [{group_by: row["key"], **_figures(row)} for row in usage_between(db, owner, first, last, group_by)]
    total = usage_between(db, owner, first, last, "total")
    return {"from": first.isoformat(), "to": last.isoformat(), "group_by": group_by, "groups": groups,
            "total": _figures(total[0] if total else {})}


def _day(params: dict[str, str], name: str) -> date | None:
    """A UTC day, YYYY-MM-DD (ISO 8601's calendar date; a full timestamp counts its day)."""
    raw = params.get(name)
    if raw is None:
        return None
    try:
        return date.fromisoformat(raw) if len(raw) == 10 else datetime.fromisoformat(raw).astimezone(timezone.utc).date()
    except (ValueError, OverflowError):
        raise BadRequest(f"{name} must be an ISO 8601 date like 2026-12-01, got {raw[:40]!r}.") from None


def _figures(row: dict) -> dict:
    prompt, completion = int(row.get("prompt_tokens") or 0), int(row.get("completion_tokens") or 0)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "reported": {"prompt_tokens": int(row.get("reported_prompt_tokens") or 0),
                     "completion_tokens": int(row.get("reported_completion_tokens") or 0)},
        "counted": {"prompt_tokens": int(row.get("counted_prompt_tokens") or 0),
                    "completion_tokens": int(row.get("counted_completion_tokens") or 0)},
        "estimated_attempts": int(row.get("estimated_attempts") or 0),
        "cost_usd": None if row.get("unpriced_attempts") else money(row.get("cost_usd") or 0.0),
        "attempts": int(row.get("attempts") or 0),
        "jobs": int(row.get("jobs") or 0),
        "deleted_jobs": int(row.get("deleted_jobs") or 0),
    }
