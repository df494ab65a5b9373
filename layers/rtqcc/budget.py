"""A job's optional spending limit, `budget.max_tokens` and/or `budget.max_cost_usd`, watched while
the provider streams so the job pauses the moment it would pass it (status_reason
`budget_exceeded`). Resume continues under the budget stored on the job, so raising it there
first is what lets a paused job go on.

Tokens are billed tokens (the provider's figures where it reported them, else our count). Within
a call the meter counts the prompt when the call starts and each delta as it arrives; what a
provider spends on its own retries of a cut stream is counted when it is recorded, so the next
section's check sees it. A cost limit needs the model's price; without one it is not enforced
(and the usage says the cost is unknown)."""

from __future__ import annotations

import logging
from typing import Mapping

from .pricing import Price

log = logging.getLogger(__name__)

BUDGET_EXCEEDED = "budget_exceeded"


class BudgetMeter:
    """The spending of one provider call on top of what the job had spent before it."""

    def __init__(self, budget: Mapping[str, object], *, spent_tokens: int, spent_cost_usd: float | None,
                 price: Price | None, model: str):
        self.max_tokens = _limit(budget.get("max_tokens"))
        self.max_cost_usd = _limit(budget.get("max_cost_usd"))
        if self.max_cost_usd is not None and (price is None or spent_cost_usd is None):
            log.warning("budget.max_cost_usd is not enforced: no price for model %s", model)
            self.max_cost_usd = None
        self._spent_tokens = spent_tokens
        self._spent_cost = spent_cost_usd or 0.0
        self._price = price
        self._prompt = 0
        self._completion = 0

    @property
    def limited(self) -> bool:
        return self.max_tokens is not None or self.max_cost_usd is not None

    def start_call(self, prompt_tokens: int) -> bool:
        """Count the prompt of a call about to start; True if the call would pass the budget
        with its first token, so it must not start."""
        self._prompt, self._completion = prompt_tokens, 0
        return self._over(extra_tokens=1)

    def add_output(self, tokens: int) -> bool:
        """Count output as it arrives; True once the next token would pass the budget."""
        self._completion += tokens
        return self._over(extra_tokens=1)

    def _over(self, *, extra_tokens: int) -> bool:
        tokens = self._spent_tokens + self._prompt + self._completion + extra_tokens
        if self.max_tokens is not None and tokens > self.max_tokens:
            return True
        if self.max_cost_usd is not None and self._price is not None:
            cost = self._spent_cost + self._price.cost(self._prompt, self._completion + extra_tokens)
            if cost > self.max_cost_usd:
                return True
        return False


def _limit(value: object) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    return float(value) if isinstance(value, (int, float)) else None
