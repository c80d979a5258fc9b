"""What data nodes and the scheduler say to each other over NATS (and the same bodies over REST/WebSocket).

Subjects (JSON bodies):
- `fleetmate.sched.register` (request): RegisterRequest -> NodeReply. Any replica answers; it appends.
- `fleetmate.sched.heartbeat` (publish): Heartbeat, every lease/3. Every replica listens; the leader
  judges leases and records loads.
- `fleetmate.sched.assign.<cluster>.<node>` (publish, by the scheduling leader): Assignment, the
  node's whole assignment, on every change to it and every few seconds.
- `fleetmate.sched.sync` (request): SyncRequest -> Assignment, from any replica's applied state
  (resync after a gap in revisions, or at start).
- `fleetmate.sched.ack` (request): Ack -> NodeReply: "opened shard S at epoch E" or "closed S".
- `fleetmate.sched.route` (request): RouteRequest -> Route, from any replica's applied state.
"""

from __future__ import annotations

import msgspec

from app.services.scheduler.messages import ReportStatus

SUBJECT_REGISTER = "fleetmate.sched.register"
SUBJECT_HEARTBEAT = "fleetmate.sched.heartbeat"
SUBJECT_ASSIGN = "fleetmate.sched.assign"  # .<cluster>.<node>
SUBJECT_SYNC = "fleetmate.sched.sync"
SUBJECT_ACK = "fleetmate.sched.ack"
SUBJECT_ROUTE = "fleetmate.sched.route"


def assign_subject(cluster: str, node: str) -> str:
    """The subject a node's assignments are published on."""
    return f"{SUBJECT_ASSIGN}.{cluster}.{node}"


class RegisterRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A data node joins a cluster with its address, labels (zone, rack, host), capacity and lease."""

    cluster: str
    node: str
    address: str = ""
    labels: dict[str, str] = {}
    capacity: int = 0
    lease_s: float = 0.0  # 0: the cluster's (10 s unless set)


class NodeReply(msgspec.Struct, frozen=True):
    """The answer to a register or an ack: ok, or the error's code and message."""

    ok: bool
    error: str = ""
    message: str = ""
    revision: int = 0
    lease_s: float = 0.0


class ShardLoad(msgspec.Struct, frozen=True):
    """One shard's load as its node reports it."""

    id: int
    size: int = 0
    writes_per_s: float = 0.0
    reads_per_s: float = 0.0


class Heartbeat(msgspec.Struct, frozen=True):
    """A data node is alive; the load of each shard it holds."""

    cluster: str
    node: str
    sent_at: float = 0.0
    shards: list[ShardLoad] = []


class Assigned(msgspec.Struct, frozen=True):
    """A shard a node must hold: its role there, epoch, key range and tables."""

    id: int
    role: str
    epoch: int
    start: str = ""
    end: str = ""
    tables: list[str] = []
    group: int = 0  # the log partition of its data


class Assignment(msgspec.Struct, frozen=True):
    """A node's whole assignment at a scheduler revision: the shards to hold, the shards to drop."""

    cluster: str
    node: str
    revision: int
    shards: list[Assigned] = []
    drop: list[int] = []
    state: str = ""  # the node's state as the scheduler sees it


class SyncRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node asks for its whole assignment."""

    cluster: str
    node: str


class Ack(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A node opened (or closed) its replica of a shard at an epoch."""

    cluster: str
    node: str
    shard: int
    epoch: int
    status: ReportStatus = "opened"


class RouteRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Which shard holds a key (or a table), and where its leader is."""

    cluster: str
    key: str | None = None
    table: str | None = None


class Route(msgspec.Struct, frozen=True):
    """A route: the shard, its range and epoch, its leader's node and address, every replica's node."""

    cluster: str
    shard: int
    epoch: int
    start: str
    end: str
    leader: str
    leader_address: str
    replicas: list[str]
    revision: int
    group: int = 0
