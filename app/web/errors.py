"""Every HTTP error as JSON {"error": code, "message": text}, mapped once from statuses and FleetmateError."""

from __future__ import annotations

import logging
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.status_codes import HTTP_500_INTERNAL_SERVER_ERROR

from app.errors import FleetmateError

log = logging.getLogger("fleetmate.web")

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    500: "internal",
    503: "unavailable",
}


class ErrorBody(msgspec.Struct, frozen=True, omit_defaults=True):
    """The body of every error response."""

    error: str
    message: str
    detail: Any = None


def error_response(
    status: int, code: str, message: str, detail: Any = None, headers: dict[str, str] | None = None
) -> Response[ErrorBody]:
    """A JSON error response."""
    return Response(ErrorBody(code, message, detail), status_code=status, headers=headers)


def _http_exception(request: Request[Any, Any, Any], exc: HTTPException) -> Response[ErrorBody]:
    status = exc.status_code
    detail = exc.extra if isinstance(exc, ValidationException) and exc.extra else None
    message = exc.detail or CODES.get(status, "error")
    if status == 404 and message == "Not Found":
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405:
        message = f"method {request.method} is not allowed on {request.url.path}"
    return error_response(status, CODES.get(status, f"http_{status}"), message, detail, exc.headers)


def fleetmate_error_parts(exc: FleetmateError) -> tuple[ErrorBody, dict[str, str] | None]:
    """The body and extra headers of the answer to a FleetmateError (its status is exc.status)."""
    detail = exc.detail() if hasattr(exc, "detail") else None
    headers = {"Retry-After": "1"} if exc.status == 429 else None
    return ErrorBody(exc.code, exc.message, detail), headers


def _fleetmate_error(request: Request[Any, Any, Any], exc: FleetmateError) -> Response[ErrorBody]:
    body, headers = fleetmate_error_parts(exc)
    return Response(body, status_code=exc.status, headers=headers)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[ErrorBody]:
    log.exception("unhandled error", extra={"path": request.url.path})
    return error_response(HTTP_500_INTERNAL_SERVER_ERROR, "internal", "internal server error")


HANDLERS: dict[Any, Any] = {
    HTTPException: _http_exception,
    FleetmateError: _fleetmate_error,
    Exception: _unexpected,
}
