"""The scheduler's applied records: clusters, nodes, shards with their replicas, procedures and their steps."""

from __future__ import annotations

from typing import Literal

import msgspec

from app.services.scheduler.messages import ClusterSpec, Limits, NodeSpec, NodeStateName, Operator

Role = Literal["leader", "follower", "learner"]
Action = Literal["place", "add_learner", "promote", "transfer_leader", "remove", "split", "merge"]
# PD's operator statuses.
Status = Literal["created", "started", "success", "canceled", "replaced", "timeout", "expired"]
FINISHED: frozenset[str] = frozenset({"success", "canceled", "replaced", "timeout", "expired"})
LIVE_STATES: frozenset[str] = frozenset({"online", "suspect", "draining"})


class Replica(msgspec.Struct):
    """One copy of a shard on a node; `acked` is the newest epoch the node said it opened."""

    node: str
    role: Role
    acked: int = 0


class Shard(msgspec.Struct):
    """A shard: its key range [start, end) ("" unbounded), tables, replicas and epoch (bumped by every change)."""

    id: int
    start: str
    end: str
    epoch: int = 0
    replicas: list[Replica] = []
    tables: list[str] = []
    moved_ms: int = 0  # when a procedure last changed its replicas (the balancing cool-down)
    group: int = 0  # the log partition its data lives in (a split keeps it; see ClusterSpec.groups)

    def replica(self, node: str) -> Replica | None:
        """The replica on `node`, if any."""
        for r in self.replicas:
            if r.node == node:
                return r
        return None

    @property
    def leader(self) -> str:
        """The node of the leader replica ("" if none)."""
        for r in self.replicas:
            if r.role == "leader":
                return r.node
        return ""


class NodeRecord(msgspec.Struct):
    """A data node of a cluster and its state (lease-judged by the leader, or set by an operator)."""

    spec: NodeSpec
    state: NodeStateName = "online"
    since_ms: int = 0
    registered_ms: int = 0
    down_ms: int = 0  # when it went down (0: not down)
    reason: str = ""
    draining: bool = False  # an operator drains it: it stays draining through a down spell until undrained


class Spend(msgspec.Struct, array_like=True):
    """One unit of a node's store limit spent: an add or a remove, at a time, at a cost."""

    time_ms: int
    kind: Literal["add", "remove"]
    cost: float


class Step(msgspec.Struct):
    """One step of a procedure: its action on one shard, when it started, its epoch and deadline."""

    action: Action
    shard: int
    node: str = ""  # add_learner/promote/remove: the replica's node; transfer_leader: the new leader's node
    leader: str = ""  # remove of the leader replica: the follower that leads from this step on
    other: int = 0  # merge: the shard merged in; split: the new shard's id (set when started)
    key: str = ""  # split: the split key
    epoch: int = 0  # the shard's epoch once this step's change was applied
    started_ms: int = 0
    deadline_ms: int = 0
    done_ms: int = 0

    @property
    def started(self) -> bool:
        """Whether its change was applied (its epoch is set then: started_ms may be 0 at time 0)."""
        return self.epoch > 0


class HistoryEntry(msgspec.Struct, array_like=True):
    """What happened to a procedure, when, and under which trace."""

    time_ms: int
    what: str
    trace_id: str = ""


class Procedure(msgspec.Struct):
    """A procedure: its operator, steps, current step and PD status; one per shard at a time."""

    id: int
    cluster: str
    op: Operator
    steps: list[Step]
    at: int = -1  # the step running now (-1: not started)
    status: Status = "created"
    reason: str = ""
    created_ms: int = 0
    updated_ms: int = 0
    term: int = 0
    trace_id: str = ""
    history: list[HistoryEntry] = []
    epochs: dict[int, int] = {}  # shard -> the epoch its last change (or the creation) left it at

    @property
    def finished(self) -> bool:
        """Whether it reached an end status."""
        return self.status in FINISHED

    @property
    def shard_ids(self) -> tuple[int, ...]:
        """The shards it holds (one procedure per shard at a time)."""
        ids = set(self.op.shards)
        ids.update(s.other for s in self.steps if s.action in ("merge", "split") and s.other)
        return tuple(sorted(ids))


class Cluster(msgspec.Struct):
    """A scheduling domain: its spec, settings, nodes, shards, tables and store-limit spending."""

    spec: ClusterSpec
    created_ms: int = 0
    placed: bool = False
    paused: bool = False
    frozen: bool = False
    limits: Limits = Limits()
    max_down_time_s: float = 1800.0
    enable_schedule: bool = True
    affinity: dict[str, dict[str, str]] = {}
    nodes: dict[str, NodeRecord] = {}
    shards: dict[int, Shard] = {}
    next_shard: int = 0
    tables: dict[str, int] = {}  # table -> shard
    spend: dict[str, list[Spend]] = {}  # node -> store-limit units spent in the last minute
    stale: dict[str, list[int]] = {}  # node -> shards it still holds and must drop when it is back
    sizes: dict[int, int] = {}  # shard -> bytes, as the leader last recorded from heartbeats
    load: dict[int, float] = {}  # shard -> reads + writes a second, as last recorded
    hot_rounds: dict[int, int] = {}  # shard -> consecutive load records it was hot in

    def live(self, node: str) -> bool:
        """Whether the node can hold replicas (online, suspect or draining)."""
        rec = self.nodes.get(node)
        return rec is not None and rec.state in LIVE_STATES


class Event(msgspec.Struct, frozen=True):
    """What an applied command changed, for the pushes to data nodes and the WebSocket of changes."""

    cluster: str
    kind: Literal["cluster", "node", "shards", "procedure", "table"]
    nodes: tuple[str, ...] = ()  # data nodes whose assignment changed
    proc: int = 0
    text: str = ""
    revision: int = 0
