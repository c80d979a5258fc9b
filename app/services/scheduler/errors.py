"""Scheduler errors, each with its code and HTTP status (mapped once by app/web/errors.py)."""

from __future__ import annotations

from app.errors import BadRequest, FleetmateError, NotFound


class SchedulerError(FleetmateError):
    """Anything the scheduler refuses; a refused command changes nothing."""

    code = "scheduler_error"
    status = 500


class NoSuchCluster(NotFound, SchedulerError):
    """No scheduling domain by that name."""

    code = "no_such_cluster"


class NoSuchShard(NotFound, SchedulerError):
    """The cluster has no shard by that id."""

    code = "no_such_shard"


class NoSuchDataNode(NotFound, SchedulerError):
    """The cluster has no data node by that name."""

    code = "no_such_node"


class NoSuchTable(NotFound, SchedulerError):
    """The cluster has no table by that name."""

    code = "no_such_table"


class NoSuchProcedure(NotFound, SchedulerError):
    """No procedure by that id."""

    code = "no_such_procedure"


class BadSchedulerRequest(BadRequest, SchedulerError):
    """The request is malformed or out of range."""

    code = "bad_request"


class Refused(SchedulerError):
    """The request is well formed but the cluster's state does not allow it (a move to a down node,
    a static cluster asked to grow, a shard busy with another procedure)."""

    code = "refused"
    status = 409


class AlreadyExists(Refused):
    """A cluster or table by that name exists."""

    code = "already_exists"


class ShardBusy(Refused):
    """Another procedure holds the shard (one procedure per shard at a time)."""

    code = "shard_busy"


class LimitReached(Refused):
    """A schedule limit (concurrent procedures, a node's adds or removes per minute, the cool-down) is reached."""

    code = "limit_reached"


class StepNotReady(Refused):
    """The step a leader tried to finish is not acknowledged yet (or cannot start yet)."""

    code = "step_not_ready"


class StaleTerm(Refused):
    """A command from a scheduling leader whose term has passed."""

    code = "stale_term"
