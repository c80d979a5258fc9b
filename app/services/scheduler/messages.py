"""The scheduler's log commands: clusters, nodes, placement, procedures and the data nodes' reports."""

from __future__ import annotations

from typing import Literal

import msgspec

Topology = Literal["static", "dynamic"]
NodeStateName = Literal["online", "suspect", "down", "draining", "removed"]
ProcKind = Literal[
    "transfer_leader", "add_replica", "remove_replica", "move", "split", "merge", "scatter", "create_cluster"
]
# Who asked for a procedure: an operator by hand, or one of the schedulers (app/services/scheduler/schedulers.py).
Source = Literal[
    "manual",
    "placement",
    "failover",
    "repair",
    "evict-leader",
    "balance-leader",
    "balance-shard",
    "hot",
    "spread",
    "merge",
    "split",
]
ReportStatus = Literal["opened", "closed"]


class Limits(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """How much the schedulers may do at once, PD's defaults (pd/server/config): hot-reloadable per cluster."""

    leader: int = 4  # leader-schedule-limit: leader transfers running at once
    shard: int = 2048  # region-schedule-limit: replica moves running at once
    replica: int = 64  # replica-schedule-limit: repairs running at once
    merge: int = 8  # merge-schedule-limit
    hot: int = 4  # hot-region-schedule-limit
    node_adds_per_min: float = 15.0  # store-limit add-peer: replica adds per node per minute
    node_removes_per_min: float = 15.0  # store-limit remove-peer
    small_shard_bytes: int = 20 << 20  # a shard below this costs small_shard_cost of a store-limit unit
    small_shard_cost: float = 0.2
    cooldown_s: float = 600.0  # no shard is moved by a balancing scheduler twice within this
    step_timeout_s: float = 10.0  # a step's deadline: this plus the shard's size at step_bytes_per_s
    step_bytes_per_s: int = 16 << 20
    expire_s: float = 60.0  # a procedure created but not started within this expires


class ClusterSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A scheduling domain as created (HoraeMeta's cluster)."""

    name: str
    topology: Topology = "dynamic"
    shard_count: int = 8
    node_count: int = 3  # HoraeMeta's default_cluster_node_count: static clusters are fixed at this
    max_replicas: int = 3
    enable_schedule: bool = True
    local_data: bool = False  # shards' data lives on the nodes' disks: a dynamic topology would corrupt it
    max_down_time_s: float = 1800.0  # a node down longer has its replicas re-created elsewhere (PD, MatrixKV)
    lease_s: float = 10.0  # the default node lease (HoraeDB's)
    groups: int = 0  # log partitions the shards' data is spread over (the KV's); shard i starts in group i % groups
    split_keys: tuple[
        str, ...
    ] = ()  # the first shards' boundaries, in order (shard_count is one more); none: hex ranges
    limits: Limits = Limits()


class ClusterUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A change to a cluster's settings; a field left None is unchanged."""

    enable_schedule: bool | None = None
    paused: bool | None = None  # schedulers stop proposing; running procedures finish
    frozen: bool | None = None  # deploy mode: no procedure starts, nothing moves
    max_down_time_s: float | None = None
    limits: Limits | None = None
    affinity: dict[str, dict[str, str]] | None = None  # shard id (as text) -> labels its leader's node must have


class NodeSpec(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A data node as it registers."""

    name: str
    address: str = ""
    labels: dict[str, str] = {}  # zone, rack, host: spread replicas across them
    capacity: int = 0  # bytes; 0: unknown
    lease_s: float = 0.0  # 0: the cluster's lease_s


class Operator(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What a procedure should do, as proposed by a scheduler or asked for by hand."""

    kind: ProcKind
    shards: tuple[int, ...]
    source: Source = "manual"
    node_from: str = ""  # move/remove: the replica's node; transfer_leader: ignored
    node_to: str = ""  # move/add: the new replica's node; transfer_leader: the new leader's node
    split_key: str = ""  # split: "" for the middle of the key range
    targets: tuple[str, ...] = ()  # scatter: the nodes each shard ends on, leader first (chosen by the appender)


# ---- log commands ------------------------------------------------------------------------------


class LeaderElected(msgspec.Struct, frozen=True, tag="leader", array_like=True):
    """A replica took the lease for `term` and leads scheduling; older terms are fenced."""

    term: int
    node_id: str
    time_ms: int = 0


class CreateCluster(msgspec.Struct, frozen=True, tag="cluster", array_like=True):
    """Create a scheduling domain; its shards are placed once enough nodes registered."""

    spec: ClusterSpec
    time_ms: int = 0


class UpdateCluster(msgspec.Struct, frozen=True, tag="update", array_like=True):
    """Change a cluster's settings (schedule on/off, pause, deploy freeze, limits, affinity)."""

    name: str
    update: ClusterUpdate
    time_ms: int = 0


class DropCluster(msgspec.Struct, frozen=True, tag="drop", array_like=True):
    """Forget a cluster, its shards, nodes and procedures."""

    name: str
    time_ms: int = 0


class RegisterNode(msgspec.Struct, frozen=True, tag="register", array_like=True):
    """A data node joins a cluster (or comes back: it is online again)."""

    cluster: str
    node: NodeSpec
    time_ms: int = 0


class SetNodeState(msgspec.Struct, frozen=True, tag="node", array_like=True):
    """A node's state changes: by the leader (term > 0) from its lease, or by an operator (term 0)."""

    cluster: str
    node: str
    state: NodeStateName
    reason: str = ""
    term: int = 0
    time_ms: int = 0
    trace_id: str = ""


class Place(msgspec.Struct, frozen=True, tag="place", array_like=True):
    """The leader's first placement of a cluster's shards: per shard, its nodes (the leader's first)."""

    cluster: str
    nodes: tuple[tuple[str, ...], ...]
    term: int
    time_ms: int = 0
    trace_id: str = ""


class Propose(msgspec.Struct, frozen=True, tag="propose", array_like=True):
    """Create a procedure; the leader's (term > 0) starts at once, a manual one (term 0) when the leader starts it."""

    cluster: str
    op: Operator
    term: int = 0
    time_ms: int = 0
    trace_id: str = ""


class Advance(msgspec.Struct, frozen=True, tag="advance", array_like=True):
    """The leader finishes step `at` of a procedure, if it is complete, and starts the next (at -1: the first)."""

    proc: int
    at: int
    term: int
    time_ms: int = 0
    trace_id: str = ""


class Expire(msgspec.Struct, frozen=True, tag="expire", array_like=True):
    """The leader ends a procedure whose step `at` passed its deadline (timeout) or that never started (expired)."""

    proc: int
    at: int
    term: int
    time_ms: int = 0
    trace_id: str = ""


class Cancel(msgspec.Struct, frozen=True, tag="cancel", array_like=True):
    """An operator cancels a procedure; what it added and nothing acknowledged is rolled back."""

    proc: int
    reason: str = "canceled by an operator"
    time_ms: int = 0
    trace_id: str = ""


class Report(msgspec.Struct, frozen=True, tag="report", array_like=True):
    """A data node reports it opened (or closed) its replica of a shard at an epoch."""

    cluster: str
    node: str
    shard: int
    epoch: int
    status: ReportStatus = "opened"
    time_ms: int = 0


class RecordLoad(msgspec.Struct, frozen=True, tag="load", array_like=True):
    """The leader's summary of the data nodes' heartbeats: each shard's size and reads+writes a second."""

    cluster: str
    sizes: dict[int, int]
    load: dict[int, float]
    term: int
    time_ms: int = 0


class CreateTable(msgspec.Struct, frozen=True, tag="table", array_like=True):
    """A table is created: it goes to the cluster's shard with the fewest tables (HoraeDB's create table)."""

    cluster: str
    table: str
    time_ms: int = 0


class DropTable(msgspec.Struct, frozen=True, tag="droptable", array_like=True):
    """A table is dropped from its shard."""

    cluster: str
    table: str
    time_ms: int = 0


Command = (
    LeaderElected
    | CreateCluster
    | UpdateCluster
    | DropCluster
    | RegisterNode
    | SetNodeState
    | Place
    | Propose
    | Advance
    | Expire
    | Cancel
    | Report
    | RecordLoad
    | CreateTable
    | DropTable
)


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One log entry: a batch of commands."""

    commands: list[Command]
