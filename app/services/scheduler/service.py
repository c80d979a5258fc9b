"""The scheduler's public API on one replica: validate, append to its log, read the applied state, serve data nodes."""

from __future__ import annotations

import bisect
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from app.bus import subjects
from app.bus.connection import Bus
from app.config import SchedulerConfig, SnapshotConfig
from app.decisions import current_trace_id
from app.errors import Unavailable
from app.log.batcher import AppendError
from app.log.engine import LogFailed, SharedLog
from app.log.host import LogEngine, SnapshotPolicy
from app.services.scheduler import checks, protocol
from app.services.scheduler.errors import (
    BadSchedulerRequest,
    NoSuchDataNode,
    NoSuchShard,
    SchedulerError,
)
from app.services.scheduler.messages import (
    Cancel,
    ClusterSpec,
    ClusterUpdate,
    Command,
    CreateCluster,
    CreateTable,
    DropCluster,
    DropTable,
    NodeSpec,
    NodeStateName,
    Operator,
    Propose,
    RegisterNode,
    Report,
    SetNodeState,
    UpdateCluster,
)
from app.services.scheduler.model import Cluster, Procedure, Shard
from app.services.scheduler.replicated import Changes, SchedulerLog
from app.services.scheduler.schedulers import Verdict, diagnose
from app.services.scheduler.state import SchedulerState
from app.services.scheduler.store import SchedulerStore
from app.services.scheduler.views import (
    ClusterView,
    Election,
    LeaderView,
    NodeView,
    ShardView,
    cluster_view,
    node_view,
    shard_view,
)
from app.storage.snapshots.base import SnapshotStore
from app.storage.snapshots.memory import MemorySnapshotStore

log = logging.getLogger("fleetmate.scheduler")

LOG_NAME = "scheduler"
QUEUE = "fleetmate-scheduler"
WRITE_TIMEOUT_S = 10.0
_json = msgspec.json.Encoder()


def now_ms() -> int:
    """Wall-clock milliseconds: the appender's clock, carried in commands (apply stays pure)."""
    return int(time.time() * 1000)


async def _no_peers() -> list[int]:
    return []


class SchedulerService:
    """One replica's scheduler: every change goes through its log; reads come from the applied state.

    Data nodes reach it over NATS (app/services/scheduler/protocol.py) or REST; the leader's
    duties (lease judgement, placement, procedure steps, the schedulers, pushes) are in leader.py.
    """

    def __init__(
        self,
        bus: Bus,
        cfg: SchedulerConfig,
        data_dir: Path,
        node_id: str,
        engine: LogEngine,
        *,
        replicas: int,
        snapshot_store: SnapshotStore | None = None,
        snapshot_cfg: SnapshotConfig | None = None,
        peers_applied: Callable[[], Awaitable[list[int]]] | None = None,
    ) -> None:
        self.bus = bus
        self.cfg = cfg
        self.node_id = node_id
        self.engine = engine
        self.state = SchedulerState()
        self._store = SchedulerStore(data_dir / "scheduler.sqlite")
        self.changes = Changes()
        self.leading = False  # set by the leader duties (leader.py)
        self.term = 0
        opened = engine.add(
            LOG_NAME,
            SchedulerLog(self.state, self._store, self.changes),
            stream=subjects.SCHEDULER_STREAM,
            subject=subjects.SCHEDULER_LOG,
            replicas=replicas,
            snapshots=SnapshotPolicy(
                snapshot_store or MemorySnapshotStore(),
                snapshot_cfg or SnapshotConfig(),
                is_leader=lambda: self.leading,
                peers_applied=peers_applied or _no_peers,
            ),
        )
        self.log: SharedLog[Command] = opened.log
        self.snapshots = opened.snapshots
        # Heard on this replica: (cluster, node) -> (monotonic time, the heartbeat).
        self.heard: dict[tuple[str, str], tuple[float, protocol.Heartbeat]] = {}
        self._subs: list[Subscription] = []
        self._routes: dict[str, tuple[tuple[int, int], list[str], list[Shard]]] = {}

    async def start(self) -> None:
        """Catch up with the scheduler log and answer data nodes."""
        await self.engine.start(LOG_NAME)
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(protocol.SUBJECT_REGISTER, QUEUE, cb=self._on_register),
            await nc.subscribe(protocol.SUBJECT_ACK, QUEUE, cb=self._on_ack),
            await nc.subscribe(protocol.SUBJECT_SYNC, QUEUE, cb=self._on_sync),
            await nc.subscribe(protocol.SUBJECT_ROUTE, QUEUE, cb=self._on_route),
            await nc.subscribe(protocol.SUBJECT_HEARTBEAT, cb=self._on_heartbeat),  # every replica hears them
        ]
        log.info(
            "scheduler ready",
            extra={"clusters": len(self.state.clusters), "applied_seq": self.log.applied_seq},
        )

    async def stop(self) -> None:
        """Stop answering, then stop applying (a last snapshot), then close the file."""
        for sub in self._subs:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be closing
                log.debug("unsubscribe failed", extra={"error": str(exc)})
        self._subs = []
        await self.engine.close(LOG_NAME)
        self._store.close()

    @property
    def applied_seq(self) -> int:
        """The last scheduler log sequence this replica applied."""
        return self.log.applied_seq

    # ---- writes -------------------------------------------------------------------------------

    async def append(self, cmd: Command, timeout: float = WRITE_TIMEOUT_S) -> Any:
        """Append a command and wait for it to apply here; its refusal is raised."""
        try:
            result = await self.log.append(cmd, timeout=timeout)
        except (TimeoutError, AppendError, LogFailed) as exc:
            raise Unavailable(f"the scheduler log did not apply the change: {exc}") from exc
        if isinstance(result, SchedulerError):
            raise result
        if isinstance(result, Exception):
            raise SchedulerError(str(result))
        return result

    async def create_cluster(self, spec: ClusterSpec) -> ClusterView:
        """Create a scheduling domain (checked here, and again in apply)."""
        checks.cluster_spec(spec)
        await self.append(CreateCluster(spec, now_ms()))
        return self.cluster_view(spec.name)

    async def update_cluster(self, name: str, update: ClusterUpdate) -> ClusterView:
        """Change a cluster's settings."""
        checks.cluster_update(update)
        self.cluster(name)
        await self.append(UpdateCluster(name, update, now_ms()))
        return self.cluster_view(name)

    async def drop_cluster(self, name: str) -> None:
        """Forget a cluster: its nodes are told to drop everything."""
        self.cluster(name)
        await self.append(DropCluster(name, now_ms()))

    async def register(self, cluster: str, spec: NodeSpec) -> NodeView:
        """A data node joins (or comes back)."""
        checks.node_spec(spec)
        self.cluster(cluster)
        await self.append(RegisterNode(cluster, spec, now_ms()))
        self._heard(protocol.Heartbeat(cluster, spec.name, time.time()))
        return self.node_view(cluster, spec.name)

    async def set_node_state(self, cluster: str, node: str, state: NodeStateName, reason: str = "") -> NodeView:
        """An operator drains, undrains (online) or removes a node."""
        self._node(cluster, node)
        await self.append(SetNodeState(cluster, node, state, reason, 0, now_ms(), current_trace_id()))
        return self.node_view(cluster, node)

    async def propose(self, cluster: str, op: Operator) -> Procedure:
        """A manual operator: its procedure is created now and started by the leader."""
        if op.source not in ("manual", "split", "merge"):
            raise BadSchedulerRequest(
                "an operator asked for over the API has source manual (or split/merge, from a store)"
            )
        self.cluster(cluster)
        proc_id = await self.append(Propose(cluster, op, 0, now_ms(), current_trace_id()))
        return self.state.procedure(proc_id)

    async def cancel(self, proc_id: int, reason: str = "") -> Procedure:
        """Cancel a procedure (what it added and nothing acknowledged is rolled back)."""
        self.state.procedure(proc_id)
        await self.append(Cancel(proc_id, reason or "canceled by an operator", now_ms(), current_trace_id()))
        return self.state.procedure(proc_id)

    async def ack(self, ack: protocol.Ack) -> int:
        """A data node says it opened (or closed) a replica at an epoch."""
        return int(await self.append(Report(ack.cluster, ack.node, ack.shard, ack.epoch, ack.status, now_ms())))

    async def create_table(self, cluster: str, table: str) -> int:
        """Put a table on the cluster's shard with the fewest tables; its shard id."""
        checks.name(table, "table")
        self.cluster(cluster)
        return int(await self.append(CreateTable(cluster, table, now_ms())))

    async def drop_table(self, cluster: str, table: str) -> None:
        """Drop a table from its shard."""
        self.cluster(cluster)
        await self.append(DropTable(cluster, table, now_ms()))

    def heartbeat(self, hb: protocol.Heartbeat) -> None:
        """Note a heartbeat heard over REST (over NATS every replica hears it itself)."""
        self._node(hb.cluster, hb.node)
        self._heard(hb)

    def _heard(self, hb: protocol.Heartbeat) -> None:
        self.heard[(hb.cluster, hb.node)] = (time.monotonic(), hb)

    # ---- reads --------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Linearizable read point: everything appended before this call is applied here."""
        try:
            await self.log.barrier()
        except (TimeoutError, LogFailed) as exc:
            raise Unavailable(f"the scheduler log did not answer: {exc}") from exc

    def cluster(self, name: str) -> Cluster:
        """A cluster (NoSuchCluster when none)."""
        return self.state.cluster(name)

    def _node(self, cluster: str, node: str) -> None:
        if node not in self.cluster(cluster).nodes:
            raise NoSuchDataNode(f"cluster {cluster} has no node {node!r}")

    def leader_view(self) -> LeaderView:
        """Who leads scheduling as this replica applied it."""
        st = self.state
        elections = [Election(t, n, at) for t, n, at in st.elections]
        elected = elections[-1].time_ms if elections else 0
        return LeaderView(st.term, st.leader, elected, st.revision, self.log.applied_seq, elections)

    def cluster_view(self, name: str) -> ClusterView:
        """A cluster's summary."""
        return cluster_view(self.state, self.cluster(name))

    def cluster_views(self) -> list[ClusterView]:
        """Every cluster's summary."""
        return [cluster_view(self.state, c) for _, c in sorted(self.state.clusters.items())]

    def heard_ago(self, cluster: str, node: str) -> float | None:
        """Seconds since this replica heard the node (None: not since it started)."""
        got = self.heard.get((cluster, node))
        return round(time.monotonic() - got[0], 3) if got else None

    def node_view(self, cluster: str, node: str) -> NodeView:
        """One data node."""
        self._node(cluster, node)
        return node_view(self.cluster(cluster), node, self.heard_ago(cluster, node))

    def node_views(self, cluster: str) -> list[NodeView]:
        """Every data node of a cluster."""
        c = self.cluster(cluster)
        return [node_view(c, n, self.heard_ago(cluster, n)) for n in sorted(c.nodes)]

    def shard_views(self, cluster: str, node: str | None = None) -> list[ShardView]:
        """Every shard of a cluster (or those with a replica on `node`)."""
        c = self.cluster(cluster)
        return [
            shard_view(self.state, c, s)
            for _, s in sorted(c.shards.items())
            if node is None or s.replica(node) is not None
        ]

    def shard(self, cluster: str, shard_id: int) -> ShardView:
        """One shard."""
        c = self.cluster(cluster)
        s = c.shards.get(shard_id)
        if s is None:
            raise NoSuchShard(f"cluster {cluster} has no shard {shard_id}")
        return shard_view(self.state, c, s)

    def procedures(self, cluster: str, status: str | None = None, limit: int = 1000) -> list[Procedure]:
        """A cluster's procedures, newest first (optionally of one status)."""
        self.cluster(cluster)
        out = [
            p
            for p in reversed(self.state.procedures.values())
            if p.cluster == cluster and (status is None or p.status == status)
        ]
        return out[:limit]

    def diagnose(self, cluster: str) -> list[Verdict]:
        """Why each scheduler would or would not act now (the same pure code the leader runs)."""
        c = self.cluster(cluster)
        return diagnose(c, self.state.running(cluster), now_ms())

    def route(self, cluster: str, key: str | None = None, table: str | None = None) -> protocol.Route:
        """Which shard holds a key (or a table) and where its leader is, from this replica's applied state."""
        c = self.cluster(cluster)
        if (key is None) == (table is None):
            raise BadSchedulerRequest("give a key or a table")
        if table is not None:
            sid = c.tables.get(table)
            if sid is None:
                raise NoSuchShard(f"cluster {cluster} has no table {table!r}")
            shard = c.shards[sid]
        else:
            shard = self._shard_for_key(c, key or "")
        leader = shard.leader
        rec = c.nodes.get(leader)
        return protocol.Route(
            cluster,
            shard.id,
            shard.epoch,
            shard.start,
            shard.end,
            leader,
            rec.spec.address if rec else "",
            [r.node for r in shard.replicas],
            self.state.revision,
            shard.group,
        )

    def _shard_for_key(self, c: Cluster, key: str) -> Shard:
        shape = (len(c.shards), c.next_shard)
        cached = self._routes.get(c.spec.name)
        if cached is None or cached[0] != shape:
            ordered = sorted(c.shards.values(), key=lambda s: s.start)
            cached = (shape, [s.start for s in ordered], ordered)
            self._routes[c.spec.name] = cached
        _, starts, ordered = cached
        i = bisect.bisect_right(starts, key) - 1
        return ordered[max(i, 0)]

    def assignment(self, cluster: str, node: str) -> protocol.Assignment:
        """A node's whole assignment at this replica's revision."""
        c = self.cluster(cluster)
        held, drop = self.state.assignment(cluster, node)
        rec = c.nodes.get(node)
        return protocol.Assignment(
            cluster,
            node,
            self.state.revision,
            [protocol.Assigned(s.id, r.role, s.epoch, s.start, s.end, list(s.tables), s.group) for s, r in held],
            drop,
            rec.state if rec else "unknown",
        )

    # ---- data nodes over NATS -----------------------------------------------------------------

    async def _answer(self, msg: Msg, make: Callable[[], Awaitable[bytes]]) -> None:
        try:
            body = await make()
        except SchedulerError as exc:
            body = _json.encode(protocol.NodeReply(False, exc.code, exc.message))
        except Unavailable as exc:
            body = _json.encode(protocol.NodeReply(False, exc.code, exc.message))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            body = _json.encode(protocol.NodeReply(False, "bad_request", str(exc)))
        except Exception as exc:
            log.exception("a data node request failed", extra={"subject": msg.subject})
            body = _json.encode(protocol.NodeReply(False, "internal", repr(exc)))
        if msg.reply:
            await self.bus.nc.publish(msg.reply, body)

    async def _on_register(self, msg: Msg) -> None:
        async def make() -> bytes:
            req = msgspec.json.decode(msg.data, type=protocol.RegisterRequest)
            spec = NodeSpec(req.node, req.address, dict(req.labels), req.capacity, req.lease_s)
            view = await self.register(req.cluster, spec)
            return _json.encode(protocol.NodeReply(True, revision=self.state.revision, lease_s=view.lease_s))

        await self._answer(msg, make)

    async def _on_ack(self, msg: Msg) -> None:
        async def make() -> bytes:
            ack = msgspec.json.decode(msg.data, type=protocol.Ack)
            await self.ack(ack)
            return _json.encode(protocol.NodeReply(True, revision=self.state.revision))

        await self._answer(msg, make)

    async def _on_sync(self, msg: Msg) -> None:
        async def make() -> bytes:
            req = msgspec.json.decode(msg.data, type=protocol.SyncRequest)
            await self.sync()
            return _json.encode(self.assignment(req.cluster, req.node))

        await self._answer(msg, make)

    async def _on_route(self, msg: Msg) -> None:
        async def make() -> bytes:
            req = msgspec.json.decode(msg.data, type=protocol.RouteRequest)
            return _json.encode(self.route(req.cluster, req.key, req.table))

        await self._answer(msg, make)

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            hb = msgspec.json.decode(msg.data, type=protocol.Heartbeat)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        c = self.state.clusters.get(hb.cluster)
        if c is not None and hb.node in c.nodes:
            self._heard(hb)
