"""Request bodies of the scheduler routes (/api/v1/scheduler), checked by msgspec before a handler runs."""

from __future__ import annotations

from typing import Annotated

import msgspec

from app.services.scheduler.messages import Limits, ProcKind

NAME = r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$"
Name = Annotated[str, msgspec.Meta(pattern=NAME, examples=["orders"])]


class NodeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A data node registering over REST (over NATS: fleetmate.sched.register, the same fields)."""

    node: Name
    address: Annotated[str, msgspec.Meta(max_length=256, examples=["10.0.0.7:8831"])] = ""
    labels: dict[str, str] = {}
    capacity: Annotated[int, msgspec.Meta(ge=0, le=1 << 60)] = 0
    lease_s: Annotated[float, msgspec.Meta(ge=0, le=3600)] = 0.0


class OperatorBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A manual operator: transfer_leader (node_to), add_replica (node_to), remove_replica (node_from),
    move (node_from, node_to), split (split_key, or the middle), merge (two adjacent shards), scatter (targets)."""

    kind: ProcKind
    shards: Annotated[list[Annotated[int, msgspec.Meta(ge=0, le=2**31)]], msgspec.Meta(min_length=1, max_length=2)]
    node_from: Annotated[str, msgspec.Meta(max_length=64)] = ""
    node_to: Annotated[str, msgspec.Meta(max_length=64)] = ""
    split_key: Annotated[str, msgspec.Meta(max_length=256)] = ""
    targets: Annotated[list[Annotated[str, msgspec.Meta(max_length=64)]], msgspec.Meta(max_length=7)] = []


class CancelBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why a procedure is canceled."""

    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class StateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Why a node is drained, undrained or removed."""

    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class TableBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A table to put on a shard."""

    table: Name


class HeartbeatBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A heartbeat over REST: each shard's load (over NATS: fleetmate.sched.heartbeat)."""

    shards: Annotated[list[ShardLoadBody], msgspec.Meta(max_length=100_000)] = []


class ShardLoadBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One shard's load."""

    id: Annotated[int, msgspec.Meta(ge=0, le=2**31)]
    size: Annotated[int, msgspec.Meta(ge=0, le=1 << 60)] = 0
    writes_per_s: Annotated[float, msgspec.Meta(ge=0, le=1e12)] = 0.0
    reads_per_s: Annotated[float, msgspec.Meta(ge=0, le=1e12)] = 0.0


class AckBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A data node opened (or closed) a replica at an epoch."""

    shard: Annotated[int, msgspec.Meta(ge=0, le=2**31)]
    epoch: Annotated[int, msgspec.Meta(ge=0, le=2**62)]
    status: Annotated[str, msgspec.Meta(pattern="^(opened|closed)$")] = "opened"


class LimitsBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """New limits (PD's names in the docs): every field is given (GET the cluster for the current ones)."""

    limits: Limits
