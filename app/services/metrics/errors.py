"""Metrics errors: bad points or query parameters (400), a store that is not open (503)."""

from __future__ import annotations

from app.errors import BadRequest, Unavailable


class BadPoints(BadRequest):
    """Points that fail validation; nothing of the request was stored."""

    code = "bad_points"


class BadQuery(BadRequest):
    """Query parameters that cannot be answered as given."""

    code = "bad_query"


class MetricsUnavailable(Unavailable):
    """The metrics service is disabled, starting or stopping."""
