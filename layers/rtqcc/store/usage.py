"""Token usage in the API's shape: the billed figures (the provider's report where it made one,
else our own count, then flagged `estimated`), both sources side by side, their difference,
and the cost (None when a model has no price)."""

from __future__ import annotations


def money(value: float | None) -> float | None:
    return None if value is None else round(float(value), 8)


def public_usage(row: dict | None) -> dict:
    """One section's usage (or the outline step's), summed over its attempts."""
    if not row:
        empty = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "estimated": False, "attempts": 0}
        return {**empty, "cost_usd": 0.0}
    return {
        "prompt_tokens": row["prompt_tokens"],
        "completion_tokens": row["completion_tokens"],
        "total_tokens": row["prompt_tokens"] + row["completion_tokens"],
        "estimated": bool(row["estimated"]),
        "attempts": row["attempts"],
        "reported": {"prompt_tokens": row["reported_prompt_tokens"],
                     "completion_tokens": row["reported_completion_tokens"]},
        "counted": {"prompt_tokens": row["counted_prompt_tokens"],
                    "completion_tokens": row["counted_completion_tokens"]},
        # reported minus counted, over the attempts the provider reported (None: it reported none)
        "difference": {"prompt_tokens": row.get("prompt_difference"),
                       "completion_tokens": row.get("completion_difference")},
        "cost_usd": None if row.get("unpriced_models") else money(row.get("cost_usd") or 0.0),
    }


def public_job_usage(by_section: dict[int | None, dict]) -> dict:
    """The job's totals, with a note naming the models without a price when the cost is unknown."""
    rows = list(by_section.values())
    prompt = sum(row["prompt_tokens"] for row in rows)
    completion = sum(row["completion_tokens"] for row in rows)
    unpriced = sorted({model for row in rows for model in (row.get("unpriced_models") or [])})
    usage = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "estimated": any(row["estimated"] for row in rows),
        "reported": {"prompt_tokens": _sum(rows, "reported_prompt_tokens"),
                     "completion_tokens": _sum(rows, "reported_completion_tokens")},
        "counted": {"prompt_tokens": _sum(rows, "counted_prompt_tokens") or 0,
                    "completion_tokens": _sum(rows, "counted_completion_tokens") or 0},
    }
    usage["difference"] = {"prompt_tokens": _sum(rows, "prompt_difference"),
                           "completion_tokens": _sum(rows, "completion_difference")}
    usage["cost_usd"] = None if unpriced else money(sum(row.get("cost_usd") or 0.0 for row in rows))
    if unpriced:
        usage["cost_note"] = (f"No price for {', '.join(unpriced)}: the cost is unknown. "
                              "Add the model to the price table (RTQCC_PRICES_FILE or RTQCC_PRICES).")
    return usage


def _sum(rows: list[dict], key: str) -> int | None:
    values = [row.get(key) for row in rows if row.get(key) is not None]
    return sum(values) if values else None
