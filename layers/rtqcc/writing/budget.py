"""Spending limits watched while the provider streams, so a job pauses the moment it would pass
one: its own budget (`budget.max_tokens` / `budget.max_cost_usd`, status_reason
`budget_exceeded`) and its tenant's daily quota (tokens / cost per UTC day, status_reason
`quota_exceeded`, see quotas.py). Resume continues under the limits then in force, so raising the
job's stored budget (or waiting for the quota to reset) is what lets a paused job go on.

Tokens are billed tokens (the provider's figures where it reported them, else our count). Within
a call the meter counts the prompt when the call starts and each delta as it arrives; what a
provider spends on its own retries of a cut stream is counted when it is recorded, so the next
call's check sees it. A cost limit needs the model's price: the API refuses a cost limit on an
unpriced model, and should one reach a run anyway (a price removed since), the meter fails
closed: the call does not start."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Iterable, Mapping

from .abort import StopReason
from .pricing import Price

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Limit:
    """One spending limit, what was spent under it before this call, and the reason a run
    stops with when it would pass it."""

    reason: StopReason
    max_tokens: float | None
    max_cost_usd: float | None
    spent_tokens: int
    spent_cost_usd: float | None  # None: unknown (an attempt without a price)

    def plus(self, tokens: int, cost_usd: float | None) -> "Limit":
        """The same limit with more already spent under it."""
        cost = None if self.spent_cost_usd is None or cost_usd is None else self.spent_cost_usd + cost_usd
        return replace(self, spent_tokens=self.spent_tokens + tokens, spent_cost_usd=cost)

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_cost_usd is not None


def job_limit(budget: Mapping[str, object], *, spent_tokens: int, spent_cost_usd: float | None) -> Limit:
    """A job's stored budget as a Limit."""
    return Limit(StopReason.BUDGET_EXCEEDED, _number(budget.get("max_tokens")), _number(budget.get("max_cost_usd")),
                 spent_tokens, spent_cost_usd)


class BudgetMeter:
    """The spending of one provider call on top of what each limit had seen spent before it."""

    def __init__(self, limits: Iterable[Limit], *, price: Price | None, model: str):
        self.limits = [limit for limit in limits if limit.limited]
        self._price = price
        self._prompt = 0
        self._completion = 0
        # A cost limit we cannot price is not silently dropped: it stops the run before it spends.
        self._unenforceable = next((limit.reason for limit in self.limits if limit.max_cost_usd is not None
                                    and (price is None or limit.spent_cost_usd is None)), None)
        if self._unenforceable:
            log.warning("a cost limit (%s) cannot be enforced for model %s: no price known; not calling it",
                        self._unenforceable, model)

    @property
    def limited(self) -> bool:
        return bool(self.limits)

    def start_call(self, prompt_tokens: int) -> StopReason | None:
        """Count the prompt of a call about to start; the reason of the limit the call would pass
        with its first token (so it must not start), else None."""
        self._prompt, self._completion = prompt_tokens, 0
        return self._unenforceable or self._over(extra_tokens=1)

    def add_output(self, tokens: int) -> StopReason | None:
        """Count output as it arrives; the reason of the limit the next token would pass, else None."""
        self._completion += tokens
        return self._over(extra_tokens=1)

    def _over(self, *, extra_tokens: int) -> StopReason | None:
        for limit in self.limits:
            tokens = limit.spent_tokens + self._prompt + self._completion + extra_tokens
            if limit.max_tokens is not None and tokens > limit.max_tokens:
                return limit.reason
            if limit.max_cost_usd is not None and self._price is not None:
                cost = (limit.spent_cost_usd or 0.0) + self._price.cost(self._prompt, self._completion + extra_tokens)
                if cost > limit.max_cost_usd:
                    return limit.reason
        return None


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    return float(value) if isinstance(value, (int, float)) else None
