"""System routes: health, readiness, the cluster view, a replica's live info, the effective config."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Response, get
from litestar.datastructures import State
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from app import config as config_mod
from app.errors import NotFound, Unavailable
from app.node import Node
from app.services.system.messages import NodeInfo
from app.storage.diskspace import guard as disk_guard
from app.web.errors import ErrorBody


class Health(msgspec.Struct, frozen=True):
    """The process is alive."""

    status: str
    node_id: str


class Ready(msgspec.Struct, frozen=True):
    """Whether the replica can serve, and why not."""

    ready: bool
    reason: str = ""
    # Set while client writes are refused (a data directory short of space): reads still work,
    # so the replica stays ready; this says why writes answer 503 DiskFull.
    writes_refused: str = ""


class LeaderView(msgspec.Struct, frozen=True):
    """Who leads and where to reach it."""

    node_id: str
    http_url: str


class ReplicaView(msgspec.Struct, frozen=True):
    """A replica as last announced, with its lag behind the most advanced replica (log entries)."""

    node_id: str
    role: str
    http_url: str
    version: str
    started_at: float
    seen_at: float
    pid: int
    host: str
    revision: int
    applied_seq: int
    lag: int
    zk_address: str = ""
    zk_secure_address: str = ""  # the ZooKeeper TLS port (zk.secure_enabled), "" when off


class ClusterView(msgspec.Struct, frozen=True):
    """This replica, the leader, the NATS servers, and every replica announced on the bus."""

    node_id: str
    role: str
    leader: LeaderView
    version: str
    uptime_s: float
    http_url: str
    nats_servers: tuple[str, ...]
    nats_connected_url: str
    embedded_nats: bool
    revision: int
    applied_seq: int
    replicas: list[ReplicaView]
    zk_address: str = ""
    zk_secure_address: str = ""


def _node(state: State) -> Node:
    node: Node = state.node
    return node


class SystemController(Controller):
    """/api/v1 system endpoints."""

    path = "/api/v1"
    tags = ["system"]

    @get("/health", opt={"public": True}, summary="Process alive")
    async def health(self, state: State) -> Health:
        """Answers 200 while the process runs."""
        return Health(status="ok", node_id=_node(state).node_id)

    @get(
        "/ready",
        opt={"public": True},
        summary="Ready to serve",
        responses={503: ResponseSpec(data_container=Ready, description="Not ready; reason says why")},
    )
    async def ready(self, state: State) -> Response[Ready]:
        """200 when the bus is connected, JetStream answers and services run; 503 with the reason otherwise."""
        reason = await _node(state).not_ready()
        refused = disk_guard.reason or ""
        if reason is None:
            return Response(Ready(ready=True, writes_refused=refused))
        return Response(Ready(ready=False, reason=reason, writes_refused=refused), status_code=503)

    @get("/cluster", summary="This replica, the leader and the replicas")
    async def cluster(self, state: State) -> ClusterView:
        """The cluster as this replica sees it."""
        node = _node(state)
        info = node.describe()
        if node.system is None:
            raise Unavailable("services are starting")
        records = await node.system.replicas()
        leader_url = next((r.http_url for r in records if r.node_id == info.leader_id), info.http_url)
        # This replica's own record is up to 2 s old: use its live position instead.
        live = {info.node_id: (info.revision, info.applied_seq)}
        position = {r.node_id: live.get(r.node_id, (r.revision, r.applied_seq)) for r in records}
        newest = max([info.applied_seq, *(seq for _, seq in position.values())])
        replicas = [
            ReplicaView(
                node_id=r.node_id,
                role="leader" if r.node_id == info.leader_id else "follower",
                http_url=r.http_url,
                version=r.version,
                started_at=r.started_at,
                seen_at=r.seen_at,
                pid=r.pid,
                host=r.host,
                revision=position[r.node_id][0],
                applied_seq=position[r.node_id][1],
                lag=newest - position[r.node_id][1],
                zk_address=r.zk_address,
                zk_secure_address=r.zk_secure_address,
            )
            for r in records
        ]
        return ClusterView(
            node_id=info.node_id,
            role=info.role,
            leader=LeaderView(node_id=info.leader_id, http_url=leader_url),
            version=info.version,
            uptime_s=info.uptime_s,
            http_url=info.http_url,
            nats_servers=info.nats_servers,
            nats_connected_url=info.nats_connected_url,
            embedded_nats=info.embedded_nats,
            revision=info.revision,
            applied_seq=info.applied_seq,
            replicas=replicas,
            zk_address=info.zk_address,
            zk_secure_address=info.zk_secure_address,
        )

    @get(
        "/cluster/replicas/{node_id:str}",
        summary="Live information from one replica, asked over the bus",
        responses={404: ResponseSpec(data_container=ErrorBody, description="No such replica answered")},
    )
    async def replica(self, state: State, node_id: FromPath[str]) -> NodeInfo:
        """Ask the named replica (any replica on the bus) for its NodeInfo."""
        node = _node(state)
        if node.system is None:
            raise Unavailable("services are starting")
        if not config_mod.NODE_ID_RE.match(node_id):
            raise NotFound(f"no replica named {node_id!r}")
        try:
            return await node.system.ask(node_id)
        except (NoRespondersError, NatsTimeout):
            raise NotFound(f"replica {node_id!r} did not answer") from None

    @get("/config", opt={"scope": "admin"}, summary="The effective configuration, secrets masked")
    async def config(self, state: State) -> dict[str, Any]:
        """Admin only: what this replica runs with."""
        return config_mod.to_dict(_node(state).cfg)
