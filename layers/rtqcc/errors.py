"""The exception tree. Each error knows its HTTP status and code; the API edge turns it into
`{"error": {"code", "message"}}`. Nothing here formats a response."""

from __future__ import annotations


class RtqccError(Exception):
    """Base of every error this package raises on purpose."""


class ConfigError(RtqccError):
    """A setting is missing or malformed; the message names the variable."""


class ApiError(RtqccError):
    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class BadRequest(ApiError):
    status = 400
    code = "bad_request"


class Unauthorized(ApiError):
    status = 401
    code = "unauthorized"


class JobNotFound(ApiError):
    status = 404
    code = "job_not_found"


class NotFound(ApiError):
    status = 404
    code = "not_found"


class NotAcceptable(ApiError):
    """The Accept header names no format the resource comes in."""
    status = 406
    code = "not_acceptable"


class InvalidTransition(ApiError):
    status = 409
    code = "invalid_transition"


class NotReady(ApiError):
    status = 409
    code = "not_ready"


class SectionLocked(ApiError):
    status = 409
    code = "section_locked"


class Conflict(ApiError):
    """The request is well formed but the job's state does not allow it now."""
    status = 409
    code = "conflict"


class PreconditionFailed(ApiError):
    """If-Match names a version that is no longer current: someone else changed it first."""
    status = 412
    code = "precondition_failed"


class PreconditionRequired(ApiError):
    status = 428
    code = "precondition_required"


class PayloadTooLarge(ApiError):
    status = 413
    code = "payload_too_large"


class UnsupportedMediaType(ApiError):
    status = 415
    code = "unsupported_media_type"


class ValidationFailed(ApiError):
    status = 422
    code = "validation_failed"


class TooManyRequests(ApiError):
    status = 429
    code = "rate_limited"


class QuotaExceeded(ApiError):
    """A tenant's quota (tokens or cost today, jobs queued or running at once) is used up."""

    status = 429
    code = "quota_exceeded"


class ServiceUnavailable(ApiError):
    status = 503
    code = "service_unavailable"


class LeaseLost(RtqccError):
    """A fenced write was refused: another consumer holds a newer lease on the job."""


class SectionWithdrawn(LeaseLost):
    """The section a run just wrote is done already: a cancelled revision put its earlier version
    back. The run stops there, announcing nothing, as if its lease were lost."""


class ProviderError(RtqccError):
    """The provider failed in a way a retry will not fix."""


class OutlineInvalid(ProviderError):
    """The provider's outline did not match the required structure."""


class StreamCut(RtqccError):
    """The provider's stream ended without a finish reason and nobody asked it to stop."""
