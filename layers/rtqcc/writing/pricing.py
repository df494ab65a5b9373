"""What tokens cost: a price table per model, in US dollars per million tokens.

The defaults are OpenAI's published list prices for a few common models; they change, so
deployments override or extend them with `RTQCC_PRICES_FILE` (a JSON file) or `RTQCC_PRICES`
(the same JSON inline), shaped like

    {"gpt-4o-mini": {"input_per_1m": 0.15, "output_per_1m": 0.60},
     "llama3.1:8b": {"input_per_1m": 0, "output_per_1m": 0}}

A model with no price has no cost (None), and the usage says so; it is never guessed."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from ..errors import ConfigError

__all__ = ["DEFAULT_PRICES", "Price", "cost_usd", "load_prices", "price_for"]


@dataclass(frozen=True)
class Price:
    input_per_1m: float   # USD per million prompt tokens
    output_per_1m: float  # USD per million completion tokens

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m) / 1_000_000


DEFAULT_PRICES: Mapping[str, Price] = {
    "gpt-4o-mini": Price(0.15, 0.60),
    "gpt-4o": Price(2.50, 10.00),
    "gpt-4.1": Price(2.00, 8.00),
    "gpt-4.1-mini": Price(0.40, 1.60),
    "gpt-4.1-nano": Price(0.10, 0.40),
    "gpt-5": Price(1.25, 10.00),
    "gpt-5-mini": Price(0.25, 2.00),
    "gpt-5-nano": Price(0.05, 0.40),
    "o3-mini": Price(1.10, 4.40),
    "o4-mini": Price(1.10, 4.40),
    "gpt-4-turbo": Price(10.00, 30.00),
    "gpt-3.5-turbo": Price(0.50, 1.50),
}

_SNAPSHOT = re.compile(r"-[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")


def price_for(model: str, prices: Mapping[str, Price]) -> Price | None:
    """The price of `model`: its own entry, else that of the model it is a dated snapshot of
    (`gpt-4o-mini-2024-07-18` is priced as `gpt-4o-mini`), else None."""
    if model in prices:
        return prices[model]
    return prices.get(_SNAPSHOT.sub("", model))


def cost_usd(model: str, prompt_tokens: int, completion_tokens: int, prices: Mapping[str, Price]) -> float | None:
    price = price_for(model, prices)
    return None if price is None else price.cost(prompt_tokens, completion_tokens)


def load_prices(env: Mapping[str, str]) -> dict[str, Price]:
    """The default table, overridden entry by entry by `RTQCC_PRICES_FILE`, then `RTQCC_PRICES`."""
    prices = dict(DEFAULT_PRICES)
    path = env.get("RTQCC_PRICES_FILE")
    if path:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"RTQCC_PRICES_FILE: cannot read {path!r}: {exc.strerror or exc}") from None
        prices.update(_parse(raw, f"RTQCC_PRICES_FILE ({path})"))
    inline = env.get("RTQCC_PRICES")
    if inline:
        prices.update(_parse(inline, "RTQCC_PRICES"))
    return prices


def _parse(raw: str, source: str) -> dict[str, Price]:
    try:
        table = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{source} is not valid JSON: {exc}") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{source} must be a JSON object of model -> {{input_per_1m, output_per_1m}}")
    parsed: dict[str, Price] = {}
    for model, entry in table.items():
        if not isinstance(entry, dict):
            raise ConfigError(f"{source}: the price of {model!r} must be an object with input_per_1m and output_per_1m")
        values = []
        for key in ("input_per_1m", "output_per_1m"):
            value = entry.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise ConfigError(f"{source}: {model}.{key} must be a number of US dollars, at least 0, got {value!r}")
            values.append(float(value))
        parsed[model] = Price(*values)
    return parsed
