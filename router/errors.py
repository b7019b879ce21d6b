"""Typed router errors, mapped in one place to LoRAX's and OpenAI's error bodies and status codes."""

from __future__ import annotations

from typing import Any


class RouterError(Exception):
    """Base: `kind` is LoRAX's error_type; `status` the LoRAX HTTP status; `param` the offending field."""

    kind = "generation"
    status = 424
    openai_status = 500
    openai_type = "server_error"
    retry_after_s: int | None = None  # sent as Retry-After: the client may try again this much later

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


class ValidationError(RouterError):
    kind = "validation"
    status = 422
    openai_status = 400
    openai_type = "invalid_request_error"


class BadRequestError(ValidationError):
    """Malformed body (not JSON, wrong types): LoRAX answers 422 for these too."""


class BodyTimeoutError(BadRequestError):
    """The client sent its body slower than --body-read-timeout-s allows."""

    status = 408
    openai_status = 408


class NotFoundError(RouterError):
    kind = "not_found"
    status = 404
    openai_status = 404
    openai_type = "invalid_request_error"


class OverloadedError(RouterError):
    """More requests than --max-concurrent-requests: refused at once."""

    kind = "overloaded"
    status = 429
    openai_status = 429
    openai_type = "rate_limit_error"
    retry_after_s = 1


class QueueTimeoutError(OverloadedError):
    """The request waited longer than --max-queue-time-s for an adapter slot or its first step."""

    status = 503
    openai_status = 503
    openai_type = "server_error"


class UnauthorizedError(RouterError):
    kind = "unauthorized"
    status = 401
    openai_status = 401
    openai_type = "invalid_request_error"


class GenerationError(RouterError):
    kind = "generation"
    status = 424
    openai_status = 500
    openai_type = "server_error"


class UnavailableError(RouterError):
    """The server cannot serve now (its engine loop died, or a worker failed): /health answers 503."""

    kind = "healthcheck"
    status = 503
    openai_status = 503
    openai_type = "server_error"


class ShuttingDownError(UnavailableError):
    """The server is draining after SIGTERM: requests already running finish, new ones go elsewhere."""

    kind = "unavailable"
    retry_after_s = 5


class InternalError(RouterError):
    """Anything unexpected. Its message is generic on purpose: the exception itself goes to the log."""

    kind = "internal"
    status = 500
    openai_status = 500
    openai_type = "server_error"

    def __init__(self, message: str = "internal server error; the server log has the details") -> None:
        super().__init__(message)


def lorax_error_body(err: RouterError) -> tuple[int, dict[str, Any]]:
    return err.status, {"error": err.message, "error_type": err.kind}


def openai_error_body(err: RouterError) -> tuple[int, dict[str, Any]]:
    code = err.kind if err.kind not in ("validation", "generation") else None
    return err.openai_status, {
        "error": {"message": err.message, "type": err.openai_type, "param": err.param, "code": code}
    }
