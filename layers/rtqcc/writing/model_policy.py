"""Which models a job may ask for. `model` is a tenant's free text, and a model nobody priced
is a model nobody can hold to a cost limit, so only known models run:

- `RTQCC_ALLOWED_MODELS` (comma-separated) when it is set: exactly those names;
- else every model with a price (`RTQCC_PRICES_FILE` / `RTQCC_PRICES` over the defaults,
  dated snapshots of a priced model included, as pricing.price_for prices them).

`RTQCC_DEFAULT_MODEL` is allowed either way: it is what a job without `model` runs on."""

from __future__ import annotations

from ..errors import ValidationFailed
from .pricing import price_for
from ..settings import Settings

_LISTED_AT_MOST = 30  # names spelled out in a refusal; the rest are counted


def allowed_models(settings: Settings) -> list[str]:
    """The allowed names, sorted (for messages; `is_allowed` is the check)."""
    names = set(settings.allowed_models) if settings.allowed_models else set(settings.prices)
    return sorted(names | {settings.default_model})


def is_allowed(model: str, settings: Settings) -> bool:
    if model == settings.default_model:
        return True
    if settings.allowed_models:
        return model in settings.allowed_models
    return price_for(model, settings.prices) is not None


def check_model(model: str, settings: Settings) -> None:
    """Refuse (422) a model this deployment does not allow, saying which ones it does."""
    if is_allowed(model, settings):
        return
    names = allowed_models(settings)
    listed = ", ".join(names[:_LISTED_AT_MOST])
    more = f" and {len(names) - _LISTED_AT_MOST} more" if len(names) > _LISTED_AT_MOST else ""
    snapshots = "" if settings.allowed_models else " (and their dated snapshots, e.g. gpt-4o-mini-2024-07-18)"
    raise ValidationFailed(
        f"model: {model[:100]!r} is not allowed here. Allowed models: {listed}{more}{snapshots}. "
        f"Leave model out to use the default, {settings.default_model}.")
