"""HA errors, each with its code and HTTP status (mapped once by app/web/errors.py)."""

from __future__ import annotations

from app.errors import BadRequest, FleetmateError, NotFound


class UnknownCluster(NotFound):
    """No cluster by that name is registered under /fleet/clusters."""


class BadClusterRequest(BadRequest):
    """A malformed name, DSN or instance, or a request that does not apply to this cluster."""


class ClusterExists(FleetmateError):
    """A cluster by that name is already registered."""

    code = "conflict"
    status = 409


class DiscoveryFailed(FleetmateError):
    """The seed instance could not be reached or its topology makes no sense (no or two primaries)."""

    code = "discovery_failed"
    status = 502


class RecoveryRefused(FleetmateError):
    """A manual failover that does not apply now: the primary is alive, or the leader recovers it itself."""

    code = "conflict"
    status = 409
