"""Membership errors, each with its code and HTTP status (mapped once by app/web/errors.py)."""

from __future__ import annotations

from app.errors import BadRequest, FleetmateError, NotFound


class NoSuchNode(NotFound):
    """No node by that id is registered under /fleet/nodes."""


class BadNodeRequest(BadRequest):
    """The request is malformed (bad range, bad id) or does not apply to this node."""


class AgentTimeout(FleetmateError):
    """The node's agent did not answer a relayed request in time (or nothing listens for it)."""

    code = "gateway_timeout"
    status = 504


class AgentFailed(FleetmateError):
    """The node's agent answered a relayed request with an error."""

    code = "bad_gateway"
    status = 502


class Conflict(FleetmateError):
    """The node changed concurrently too many times in a row; try again."""

    code = "conflict"
    status = 409
