"""What a tenant is told when a run fails or is interrupted: a stable code and a plain message.

The exception itself, with whatever it carries (the provider's base URL and credentials, the
upstream error text, SQL errors), goes to the log only; what is stored on the job and sent in
its events comes from here."""

from __future__ import annotations

from dataclasses import dataclass

from pg8000.exceptions import InterfaceError
from redis.exceptions import RedisError

from ..errors import OutlineInvalid, ServiceUnavailable, StreamCut
from ..writing.providers.base import ProviderRefused, ProviderUnavailable, QuotaExceeded


@dataclass(frozen=True)
class PublicFailure:
    code: str
    message: str


GAVE_UP = "gave_up"
# Our storage being away (not the provider, not a bug): a run interrupted by one is retried
# without counting toward the job's poison limit.
OUTAGE_ERRORS = (ServiceUnavailable, RedisError, InterfaceError)


def describe_failure(exc: BaseException) -> PublicFailure:
    if isinstance(exc, QuotaExceeded):
        return PublicFailure("provider_quota_exceeded",
                             "The model provider's account has no quota left; retry the job once the operator "
                             "has restored it.")
    if isinstance(exc, ProviderRefused):
        status = f" (HTTP {exc.status})" if exc.status else ""
        return PublicFailure("provider_refused", f"The model provider refused the request{status}; "
                                                 "check the job's model and parameters, then retry.")
    if isinstance(exc, OutlineInvalid):
        return PublicFailure("outline_invalid", "The model did not return an outline of the required shape; "
                                                "retry the job, or give an outline yourself.")
    if isinstance(exc, ProviderUnavailable):
        return PublicFailure("provider_unavailable", "The model provider could not be reached or kept refusing; "
                                                     "the job is retried later.")
    if isinstance(exc, StreamCut):
        return PublicFailure("stream_cut", "The model's stream ended early; the job continues from its text.")
    if isinstance(exc, OUTAGE_ERRORS):
        return PublicFailure("service_unavailable", "A storage service was unavailable; the job continues when "
                                                    "it is back.")
    if isinstance(exc, ConnectionError):
        return PublicFailure("connection_lost", "A connection was lost mid-run; the job is retried.")
    return PublicFailure("internal_error", "An internal error interrupted the run; it has been logged and the "
                                           "job is retried.")


def gave_up(failures: int, last: str | None) -> PublicFailure:
    return PublicFailure(GAVE_UP, f"Gave up after {failures} failed runs; the last: {last or 'unknown'}")
