"""The base of fleetmate's error hierarchy: each error carries its code and HTTP status, mapped once."""

from __future__ import annotations


class FleetmateError(Exception):
    """An error a client can act on: a stable code, an HTTP status and a message."""

    code = "internal"
    status = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class Unavailable(FleetmateError):
    """The process is not (yet) able to serve: bus down, services starting or stopping."""

    code = "unavailable"
    status = 503


class NotFound(FleetmateError):
    """The named thing does not exist."""

    code = "not_found"
    status = 404


class BadRequest(FleetmateError):
    """The input is malformed."""

    code = "bad_request"
    status = 400
