"""One error hierarchy for the daemon, its client and the CLI; each error has a stable code."""

from __future__ import annotations


class CodelmError(Exception):
    """Base error: `code` is stable for clients, `status` is the HTTP status it maps to."""

    code = "internal_error"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_json(self) -> dict[str, dict[str, str]]:
        return {"error": {"code": self.code, "message": self.message}}


class BadRequest(CodelmError):
    code = "bad_request"
    status = 400

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}" if field else reason)
        self.field = field
        self.reason = reason


class Unauthorized(CodelmError):
    code = "unauthorized"
    status = 401


class Forbidden(CodelmError):
    code = "forbidden"
    status = 403


class NotFound(CodelmError):
    code = "not_found"
    status = 404


class Conflict(CodelmError):
    code = "conflict"
    status = 409


class PayloadTooLarge(CodelmError):
    code = "payload_too_large"
    status = 413


class ConfigError(CodelmError):
    """A setting has the wrong type or value; the message names where it came from."""

    code = "config_error"
    status = 400


class Overloaded(CodelmError):
    """Too many documents are waiting for the engine."""

    code = "overloaded"
    status = 503


class ModelLoading(CodelmError):
    code = "model_loading"
    status = 503


class ModelLoadError(CodelmError):
    """The model file is missing, corrupt, or of an unsupported kind."""

    code = "model_load_error"
    status = 503


class DeviceUnavailable(CodelmError):
    code = "device_unavailable"
    status = 503


class DaemonUnavailable(CodelmError):
    """The client could not reach a running daemon."""

    code = "daemon_unavailable"
    status = 503


class ServerError(CodelmError):
    """The inference server that `model` names could not be reached or refused a request."""

    code = "server_error"
    status = 502
    upstream_status: int | None = None  # the HTTP status the server answered, if it did


class Cancelled(CodelmError):
    """The request was superseded by a newer one or its client went away."""

    code = "cancelled"
    status = 409
