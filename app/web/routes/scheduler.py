"""Scheduler routes (/api/v1/scheduler): clusters, data nodes, shards, routes, procedures, what-if, changes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Annotated, Any

import msgspec
from litestar import delete, get, patch, post, websocket
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from app.errors import FleetmateError, Unavailable
from app.node import Node
from app.services.scheduler import protocol
from app.services.scheduler.messages import ClusterSpec, ClusterUpdate, NodeSpec, Operator
from app.services.scheduler.model import Event, Procedure
from app.services.scheduler.schedulers import Verdict
from app.services.scheduler.service import SchedulerService
from app.services.scheduler.views import ClusterView, LeaderView, NodeView, ShardView, WhatIf, WhatIfResult
from app.services.scheduler.whatif import what_if
from app.web.errors import ErrorBody
from app.web.routes.scheduler_models import (
    AckBody,
    CancelBody,
    HeartbeatBody,
    NodeBody,
    OperatorBody,
    StateBody,
    TableBody,
)
from app.web.sockets import drain, fail

BASE = "/api/v1/scheduler"
C = BASE + "/clusters/{cluster:str}"
_enc = msgspec.json.Encoder()
ERRORS = {
    400: ResponseSpec(data_container=ErrorBody, description="Malformed or out of range"),
    404: ResponseSpec(data_container=ErrorBody, description="No such cluster, node, shard or procedure"),
    409: ResponseSpec(data_container=ErrorBody, description="Refused by the cluster's state (busy, down, static)"),
}


class RouteAnswer(msgspec.Struct, frozen=True):
    """Where a key or table lives (protocol.Route)."""

    route: protocol.Route


def scheduler_routes(node: Node) -> list[BaseRouteHandler]:
    """The handlers, closing over the node."""

    def svc() -> SchedulerService:
        s = node.scheduler
        if s is None:
            raise Unavailable("the scheduler is disabled (scheduler.enabled) or starting")
        return s

    @post(
        BASE + "/clusters",
        tags=["scheduler"],
        summary="Create a scheduling domain",
        status_code=HTTP_201_CREATED,
        responses=ERRORS,
    )
    async def create_cluster(data: ClusterSpec) -> ClusterView:
        """A cluster of `shard_count` shards over the 32-bit key space, placed once enough data nodes
        are online (static: `node_count` of them, fixed from then on). A dynamic topology is refused
        for local data (moving such a shard would corrupt it)."""
        return await svc().create_cluster(data)

    @get(BASE + "/leader", tags=["scheduler"], summary="The scheduling leader, its term and the elections before")
    async def leader() -> LeaderView:
        """The replica holding the lease leads scheduling; each took a new term (a LeaderElected
        command): a command from an older term is refused."""
        await svc().sync()
        return svc().leader_view()

    @get(BASE + "/clusters", tags=["scheduler"], summary="List scheduling domains")
    async def list_clusters() -> list[ClusterView]:
        await svc().sync()
        return svc().cluster_views()

    @get(C, tags=["scheduler"], summary="One cluster: settings, nodes by state, what runs", responses=ERRORS)
    async def one_cluster(cluster: str) -> ClusterView:
        await svc().sync()
        return svc().cluster_view(cluster)

    @patch(
        C,
        tags=["scheduler"],
        summary="Change settings: schedule on/off, pause, freeze, limits, affinity",
        responses=ERRORS,
    )
    async def update_cluster(cluster: str, data: ClusterUpdate) -> ClusterView:
        """`paused` stops the balancing schedulers (failover and repair go on); `frozen` (deploy mode)
        starts no procedure but leader failover; `limits` are PD's, hot-reloaded; `affinity` maps a
        shard id to the labels its leader's node must have."""
        return await svc().update_cluster(cluster, data)

    @delete(C, tags=["scheduler"], summary="Drop a cluster", status_code=HTTP_200_OK, responses=ERRORS)
    async def drop_cluster(cluster: str) -> None:
        await svc().drop_cluster(cluster)

    @post(
        C + "/nodes",
        tags=["scheduler"],
        summary="Register a data node (with a lease)",
        status_code=HTTP_201_CREATED,
        responses=ERRORS,
    )
    async def register(cluster: str, data: NodeBody) -> NodeView:
        """The node must heartbeat within its lease (lease_s, else the cluster's) or it is suspect,
        then down; leaders leave a down node at once, replicas after max_down_time."""
        spec = NodeSpec(data.node, data.address, dict(data.labels), data.capacity, data.lease_s)
        return await svc().register(cluster, spec)

    @get(C + "/nodes", tags=["scheduler"], summary="A cluster's data nodes", responses=ERRORS)
    async def list_nodes(cluster: str) -> list[NodeView]:
        await svc().sync()
        return svc().node_views(cluster)

    @get(C + "/nodes/{name:str}", tags=["scheduler"], summary="One data node", responses=ERRORS)
    async def one_node(cluster: str, name: str) -> NodeView:
        await svc().sync()
        return svc().node_view(cluster, name)

    @post(
        C + "/nodes/{name:str}/heartbeat",
        tags=["scheduler"],
        summary="A heartbeat over REST",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def heartbeat(cluster: str, name: str, data: HeartbeatBody) -> NodeView:
        loads = [protocol.ShardLoad(s.id, s.size, s.writes_per_s, s.reads_per_s) for s in data.shards]
        svc().heartbeat(protocol.Heartbeat(cluster, name, 0.0, loads))
        if node.bus is not None:  # every replica hears it, as a heartbeat sent over NATS
            body = protocol.Heartbeat(cluster, name, 0.0, loads)
            await node.bus.nc.publish(protocol.SUBJECT_HEARTBEAT, _enc.encode(body))
        return svc().node_view(cluster, name)

    async def _state(cluster: str, name: str, state: str, data: StateBody | None) -> NodeView:
        return await svc().set_node_state(cluster, name, state, data.reason if data else "")  # type: ignore[arg-type]

    @post(
        C + "/nodes/{name:str}/drain",
        tags=["scheduler"],
        summary="Drain a node: leaders, then replicas, move off",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def drain_node(cluster: str, name: str, data: StateBody | None = None) -> NodeView:
        return await _state(cluster, name, "draining", data)

    @post(
        C + "/nodes/{name:str}/undrain",
        tags=["scheduler"],
        summary="Put a draining node back online",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def undrain_node(cluster: str, name: str, data: StateBody | None = None) -> NodeView:
        return await _state(cluster, name, "online", data)

    @delete(
        C + "/nodes/{name:str}",
        tags=["scheduler"],
        summary="Remove a node: its replicas are re-created elsewhere",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def remove_node(cluster: str, name: str) -> NodeView:
        return await _state(cluster, name, "removed", None)

    @get(C + "/nodes/{name:str}/assignment", tags=["scheduler"], summary="A node's whole assignment", responses=ERRORS)
    async def assignment(cluster: str, name: str) -> protocol.Assignment:
        await svc().sync()
        svc().node_view(cluster, name)
        return svc().assignment(cluster, name)

    @post(
        C + "/nodes/{name:str}/acks",
        tags=["scheduler"],
        summary="A node opened (or closed) a replica",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def ack(cluster: str, name: str, data: AckBody) -> protocol.NodeReply:
        await svc().ack(protocol.Ack(cluster, name, data.shard, data.epoch, data.status))  # type: ignore[arg-type]
        return protocol.NodeReply(True, revision=svc().state.revision)

    @get(C + "/shards", tags=["scheduler"], summary="The shard table", responses=ERRORS)
    async def shards(cluster: str, node_name: Annotated[str | None, Parameter(query="node")] = None) -> list[ShardView]:
        await svc().sync()
        return svc().shard_views(cluster, node_name)

    @get(C + "/shards/{shard:int}", tags=["scheduler"], summary="One shard", responses=ERRORS)
    async def one_shard(cluster: str, shard: int) -> ShardView:
        await svc().sync()
        return svc().shard(cluster, shard)

    @get(C + "/route", tags=["scheduler"], summary="Which shard holds a key or table, and its leader", responses=ERRORS)
    async def route(
        cluster: str,
        key: Annotated[str | None, Parameter(max_length=1024)] = None,
        table: Annotated[str | None, Parameter(max_length=64)] = None,
    ) -> protocol.Route:
        """Served from this replica's applied state (no leader hop, no log round trip): a client storm
        spreads over every replica. The route carries the shard's epoch: a data node refuses an
        older one, and the client asks again."""
        return svc().route(cluster, key, table)

    @post(
        C + "/tables",
        tags=["scheduler"],
        summary="Create a table on the shard with the fewest",
        status_code=HTTP_201_CREATED,
        responses=ERRORS,
    )
    async def create_table(cluster: str, data: TableBody) -> protocol.Route:
        await svc().create_table(cluster, data.table)
        return svc().route(cluster, table=data.table)

    @delete(
        C + "/tables/{table:str}", tags=["scheduler"], summary="Drop a table", status_code=HTTP_200_OK, responses=ERRORS
    )
    async def drop_table(cluster: str, table: str) -> None:
        await svc().drop_table(cluster, table)

    @post(
        C + "/procedures",
        tags=["scheduler"],
        summary="A manual operator",
        status_code=HTTP_201_CREATED,
        responses=ERRORS,
    )
    async def propose(cluster: str, data: OperatorBody) -> Procedure:
        """Created now, started by the leader at its next round; one procedure per shard at a time."""
        op = Operator(
            data.kind, tuple(data.shards), "manual", data.node_from, data.node_to, data.split_key, tuple(data.targets)
        )
        return await svc().propose(cluster, op)

    @get(C + "/procedures", tags=["scheduler"], summary="Procedures, newest first", responses=ERRORS)
    async def procedures(
        cluster: str,
        status: Annotated[str | None, Parameter(max_length=16)] = None,
        limit: Annotated[int, Parameter(ge=1, le=10_000)] = 1000,
    ) -> list[Procedure]:
        await svc().sync()
        return svc().procedures(cluster, status, limit)

    @get(
        BASE + "/procedures/{proc:int}",
        tags=["scheduler"],
        summary="One procedure with its steps and history",
        responses=ERRORS,
    )
    async def one_procedure(proc: int) -> Procedure:
        await svc().sync()
        return svc().state.procedure(proc)

    @post(
        BASE + "/procedures/{proc:int}/cancel",
        tags=["scheduler"],
        summary="Cancel a procedure",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def cancel(proc: int, data: CancelBody | None = None) -> Procedure:
        return await svc().cancel(proc, data.reason if data else "")

    @get(C + "/diagnose", tags=["scheduler"], summary="Why each scheduler did or did not act", responses=ERRORS)
    async def diagnose(cluster: str) -> list[Verdict]:
        await svc().sync()
        return svc().diagnose(cluster)

    @post(
        C + "/what-if",
        tags=["scheduler"],
        summary="The operators a change would cause, and an ETA",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def whatif(cluster: str, data: WhatIf) -> WhatIfResult:
        """Runs the same schedulers on a copy of the cluster with nodes down, added or draining;
        nothing changes. The ETA comes from the store limits and the round interval."""
        await svc().sync()
        c = svc().cluster(cluster)
        return await asyncio.to_thread(what_if, c, data, node.cfg.scheduler.interval)

    @websocket(BASE + "/changes")
    async def changes(socket: WebSocket[Any, Any, Any]) -> None:
        """Every applied change as JSON ({"type": "ready", "revision"} first, then {"type": "change",
        "cluster", "kind", "nodes", "proc", "text", "revision"}); `?cluster=NAME` for one cluster."""
        await socket.accept()
        only = socket.query_params.get("cluster")
        try:
            s = svc()
            if only is not None:
                s.cluster(only)
        except FleetmateError as exc:
            await fail(socket, exc.code, exc.message)
            return

        def change(event: Event) -> dict[str, Any] | None:
            return {"type": "change", **msgspec.to_builtins(event)} if only in (None, event.cluster) else None

        await _stream(socket, s, lambda: {"type": "ready", "revision": s.state.revision}, change)

    @websocket(C + "/nodes/{name:str}/assignments")
    async def assignments(socket: WebSocket[Any, Any, Any], cluster: str, name: str) -> None:
        """The node's whole assignment now, then again on every change to it (as over NATS)."""
        await socket.accept()
        try:
            s = svc()
            s.node_view(cluster, name)
        except FleetmateError as exc:
            await fail(socket, exc.code, exc.message)
            return

        def change(event: Event) -> protocol.Assignment | None:
            return s.assignment(cluster, name) if event.cluster == cluster and name in event.nodes else None

        await _stream(socket, s, lambda: s.assignment(cluster, name), change)

    return [
        leader,
        create_cluster,
        list_clusters,
        one_cluster,
        update_cluster,
        drop_cluster,
        register,
        list_nodes,
        one_node,
        heartbeat,
        drain_node,
        undrain_node,
        remove_node,
        assignment,
        ack,
        shards,
        one_shard,
        route,
        create_table,
        drop_table,
        propose,
        procedures,
        one_procedure,
        cancel,
        diagnose,
        whatif,
        changes,
        assignments,
    ]


async def _stream(
    socket: WebSocket[Any, Any, Any],
    s: SchedulerService,
    first: Callable[[], Any],
    message: Callable[[Event], Any],
) -> None:
    """Send first(), then message(event) for each applied change (None: skipped), until the client
    goes away, the scheduler drops it for falling behind, or a change cannot be shown any more."""
    queue = s.changes.subscribe()
    reader = asyncio.create_task(drain(socket))
    reader.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        await socket.send_text(_enc.encode(first()).decode())
        while (event := await queue.get()) is not None:
            body = message(event)
            if body is not None:
                await socket.send_text(_enc.encode(body).decode())
    except (WebSocketDisconnect, OSError, FleetmateError):
        return
    finally:
        s.changes.unsubscribe(queue)
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
