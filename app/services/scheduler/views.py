"""What the scheduler's API answers: clusters, nodes, shards, routes and what-if results, built from applied state."""

from __future__ import annotations

from collections import Counter

import msgspec

from app.services.scheduler.messages import Limits, NodeSpec, Operator
from app.services.scheduler.model import Cluster, Replica, Shard
from app.services.scheduler.state import SchedulerState


class ClusterView(msgspec.Struct, frozen=True):
    """A scheduling domain: its settings, its nodes by state, its shards and what runs."""

    name: str
    topology: str
    max_replicas: int
    node_count: int
    local_data: bool
    enable_schedule: bool
    paused: bool
    frozen: bool
    placed: bool
    lease_s: float
    max_down_time_s: float
    limits: Limits
    affinity: dict[str, dict[str, str]]
    shards: int
    tables: int
    nodes: dict[str, int]  # state -> how many
    procedures_running: int
    stale_copies: int
    revision: int


class NodeView(msgspec.Struct, frozen=True):
    """A data node: what it registered, its state, what it holds."""

    name: str
    address: str
    labels: dict[str, str]
    capacity: int
    lease_s: float
    state: str
    since_ms: int
    reason: str
    replicas: int
    leaders: int
    stale: list[int]
    heard_s_ago: float | None  # on this replica; None: not heard since it started


class ShardView(msgspec.Struct, frozen=True):
    """A shard: its range, epoch, replicas with roles and acknowledged epochs, tables, load and procedure."""

    id: int
    start: str
    end: str
    epoch: int
    leader: str
    replicas: list[Replica]
    tables: list[str]
    size: int
    load: float
    procedure: int | None
    group: int = 0


class Election(msgspec.Struct, frozen=True, array_like=True):
    """A scheduling leader election: its term, the replica and when (ms)."""

    term: int
    node: str
    time_ms: int


class LeaderView(msgspec.Struct, frozen=True):
    """Who leads scheduling, since when, and the elections before (the newest 100)."""

    term: int
    leader: str
    elected_ms: int
    revision: int
    applied_seq: int
    elections: list[Election]


class WhatIf(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Nodes to take down (past max_down_time), add, or drain, on a copy of the cluster."""

    down: list[str] = []
    add: list[NodeSpec] = []
    drain: list[str] = []


class WhatIfResult(msgspec.Struct, frozen=True):
    """The operators the schedulers would run, in rounds, and how long the limits make it take."""

    operators: list[Operator]
    by_kind: dict[str, int]
    rounds: int
    eta_s: float
    settled: bool  # the schedulers ran out of work within the simulated time
    replicas_after: dict[str, int]
    leaders_after: dict[str, int]


def cluster_view(state: SchedulerState, c: Cluster) -> ClusterView:
    """A cluster's summary."""
    spec = c.spec
    return ClusterView(
        name=spec.name,
        topology=spec.topology,
        max_replicas=spec.max_replicas,
        node_count=spec.node_count,
        local_data=spec.local_data,
        enable_schedule=c.enable_schedule,
        paused=c.paused,
        frozen=c.frozen,
        placed=c.placed,
        lease_s=spec.lease_s,
        max_down_time_s=c.max_down_time_s,
        limits=c.limits,
        affinity=c.affinity,
        shards=len(c.shards),
        tables=len(c.tables),
        nodes=dict(Counter(n.state for n in c.nodes.values())),
        procedures_running=len(state.running(spec.name)),
        stale_copies=sum(len(v) for v in c.stale.values()),
        revision=state.revision,
    )


def node_view(c: Cluster, name: str, heard_s_ago: float | None) -> NodeView:
    """One node of a cluster."""
    rec = c.nodes[name]
    replicas = leaders = 0
    for s in c.shards.values():
        for r in s.replicas:
            if r.node == name:
                replicas += 1
                leaders += r.role == "leader"
    return NodeView(
        name=name,
        address=rec.spec.address,
        labels=rec.spec.labels,
        capacity=rec.spec.capacity,
        lease_s=rec.spec.lease_s or c.spec.lease_s,
        state=rec.state,
        since_ms=rec.since_ms,
        reason=rec.reason,
        replicas=replicas,
        leaders=leaders,
        stale=sorted(set(c.stale.get(name, ()))),
        heard_s_ago=heard_s_ago,
    )


def shard_view(state: SchedulerState, c: Cluster, s: Shard) -> ShardView:
    """One shard."""
    return ShardView(
        id=s.id,
        start=s.start,
        end=s.end,
        epoch=s.epoch,
        leader=s.leader,
        replicas=list(s.replicas),
        tables=list(s.tables),
        size=c.sizes.get(s.id, 0),
        load=c.load.get(s.id, 0.0),
        procedure=state.busy.get((c.spec.name, s.id)),
        group=s.group,
    )


def shard_for_key(c: Cluster, key: str) -> Shard | None:
    """The shard whose range [start, end) holds the key."""
    for s in c.shards.values():
        if s.start <= key and (not s.end or key < s.end):
            return s
    return None
