"""HA routes (/api/v1/ha/clusters): register a cluster by discovery, its topology and findings, its history."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import delete, get, post, put, websocket
from litestar.connection import WebSocket
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED

from app.errors import FleetmateError, Unavailable
from app.node import Node
from app.services.ha import layout
from app.services.ha.layout import HistoryEntry
from app.services.ha.messages import PromotionRule
from app.services.ha.service import ClusterView, HaService
from app.services.ha.topology import TopologyTree
from app.services.registry.messages import Event
from app.web.errors import ErrorBody
from app.web.sockets import fail, stream_changes

WATCH_PATH = "/api/v1/ha/watch"
_enc = msgspec.json.Encoder()

ERRORS = {404: ResponseSpec(data_container=ErrorBody, description="No such cluster")}
REGISTER_ERRORS = {
    400: ResponseSpec(data_container=ErrorBody, description="Bad name or DSN, or no login configured"),
    409: ResponseSpec(data_container=ErrorBody, description="A cluster by that name exists"),
    502: ResponseSpec(data_container=ErrorBody, description="The seed cannot be reached or has no single primary"),
}


class RegisterBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Register a cluster from one of its instances: `mysql://user@host:3306` (or mariadb://, postgresql://).

    The DSN carries no password: logins come from ha.secrets_file or [ha] user/password.
    """

    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_-]{1,64}$", examples=["orders"])]
    dsn: Annotated[str, msgspec.Meta(max_length=1000, examples=["mysql://fleetmate@10.0.0.1:3306"])]


class FailoverBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Recover the dead primary now: onto this replica (host:port), or the best candidate when omitted."""

    to: Annotated[str, msgspec.Meta(max_length=300, examples=["10.0.0.2:3306"])] | None = None


class SwitchoverBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Hand the primary role over: to this replica (host:port), or to the best candidate when omitted."""

    to: Annotated[str, msgspec.Meta(max_length=300, examples=["10.0.0.2:3306"])] | None = None


class RuleBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An instance's promotion rule."""

    rule: PromotionRule


class DowntimeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Downtime for an instance: no recovery of it or onto it for `seconds` (0 ends it)."""

    seconds: Annotated[float, msgspec.Meta(ge=0, le=31_536_000)]
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class AcknowledgeBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Acknowledge the last recovery, lifting the anti-flapping block."""

    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class ClusterSummary(msgspec.Struct, frozen=True):
    """One registered cluster in the list."""

    name: str
    engine: str
    primary: str
    instances: int
    findings: list[str]


def ha_routes(node: Node) -> list[BaseRouteHandler]:
    """The handlers, closing over the node."""

    def svc() -> HaService:
        ha = node.ha
        if ha is None:
            raise Unavailable("HA is disabled (ha.enabled) or starting")
        return ha

    @post(
        "/api/v1/ha/clusters",
        tags=["ha"],
        summary="Register a cluster by discovering it from one instance",
        status_code=HTTP_201_CREATED,
        responses=REGISTER_ERRORS,
    )
    async def register(data: RegisterBody) -> ClusterView:
        """Walks the topology from the DSN's instance (replicas, sources), records it under
        /fleet/clusters/<name>/ (the `primary` key holds the writable primary's host:port), and the
        leader keeps probing it every ha.poll_interval."""
        return await svc().register(data.name, data.dsn)

    @get("/api/v1/ha/clusters", tags=["ha"], summary="List registered clusters")
    async def list_clusters() -> list[ClusterSummary]:
        """Every cluster with its primary and the leader's current findings."""
        ha = svc()
        if node.registry is not None:
            await node.registry.sync()
        out = []
        for name in ha.names():
            view = ha.view(name)
            findings = [f"{a.kind} {a.instance}" for a in view.analyses]
            out.append(ClusterSummary(name, view.cluster.engine, view.primary, len(view.instances), findings))
        return out

    @get("/api/v1/ha/clusters/{name:str}", tags=["ha"], summary="One cluster: topology and findings", responses=ERRORS)
    async def one_cluster(name: str) -> ClusterView:
        """The cluster's record, primary, instances as last probed, and findings (analyses are
        computed by the leader; another replica shows none)."""
        if node.registry is not None:
            await node.registry.sync()
        return svc().view(name)

    @get(
        "/api/v1/ha/clusters/{name:str}/history",
        tags=["ha"],
        summary="Detections and recovery steps",
        responses=ERRORS,
    )
    async def history(name: str) -> list[HistoryEntry]:
        """Every detection and recovery step, oldest first, with the trace id it ran under."""
        if node.registry is not None:
            await node.registry.sync()
        return svc().history(name)

    @post(
        "/api/v1/ha/clusters/{name:str}/switchover",
        tags=["ha"],
        summary="Graceful switchover: nothing lost",
        status_code=HTTP_200_OK,
        responses={**ERRORS, **REGISTER_ERRORS},
    )
    async def switchover(name: str, data: SwitchoverBody | None = None) -> ClusterView:
        """The primary goes read-only, the candidate catches up to its last transaction and is
        promoted, the others (the old primary too) replicate from it, and the primary key is
        written. If the candidate does not catch up in ha.apply_timeout the old primary is made
        writable again and nothing changes."""
        return await svc().switchover(name, data.to if data else None)

    @get(
        "/api/v1/ha/clusters/{name:str}/topology",
        tags=["ha"],
        summary="The topology as a tree: who replicates from whom",
        responses=ERRORS,
    )
    async def topology(name: str) -> TopologyTree:
        """Each instance under the one it replicates from, the recorded primary first, with a
        one-line state per instance (as `orchestrator-client -c topology` draws it) and the
        leader's findings."""
        if node.registry is not None:
            await node.registry.sync()
        return svc().topology(name)

    @post(
        "/api/v1/ha/clusters/{name:str}/failover",
        tags=["ha"],
        summary="Manual failover of a dead primary",
        status_code=HTTP_200_OK,
        responses={
            **ERRORS,
            400: REGISTER_ERRORS[400],
            409: ResponseSpec(
                data_container=ErrorBody,
                description="The primary is alive, the leader recovers it itself, or no replica can be promoted",
            ),
        },
    )
    async def failover(name: str, data: FailoverBody | None = None) -> ClusterView:
        """For a primary the analysis finds dead (replicas agree) whose automatic recovery does not
        run: ha.auto_recover off, anti-flapping, downtime, or promotion rules. The request lifts
        those (and picks the replica with `to`); a replica missing an acknowledged transaction is
        still never promoted. A live primary is refused: use a switchover."""
        return await svc().failover(name, data.to if data else None)

    @put(
        "/api/v1/ha/clusters/{name:str}/instances/{address:str}/rule",
        tags=["ha"],
        summary="Set an instance's promotion rule",
        responses={**ERRORS, 400: REGISTER_ERRORS[400]},
    )
    async def set_rule(name: str, address: str, data: RuleBody) -> ClusterView:
        """prefer: promoted first among equally advanced replicas; must_not: never promoted."""
        return await svc().set_rule(name, address, data.rule)

    @put(
        "/api/v1/ha/clusters/{name:str}/instances/{address:str}/downtime",
        tags=["ha"],
        summary="Put an instance in downtime (or end it)",
        responses={**ERRORS, 400: REGISTER_ERRORS[400]},
    )
    async def set_downtime(name: str, address: str, data: DowntimeBody) -> ClusterView:
        """While an instance is in downtime it is not recovered (a primary) nor promoted (a replica)."""
        return await svc().set_downtime(name, address, data.seconds, data.reason)

    @post(
        "/api/v1/ha/clusters/{name:str}/acknowledge",
        tags=["ha"],
        summary="Acknowledge the last recovery (lifts anti-flapping)",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def acknowledge(name: str, data: AcknowledgeBody | None = None) -> ClusterView:
        return await svc().acknowledge(name, data.reason if data else "")

    @delete(
        "/api/v1/ha/clusters/{name:str}",
        tags=["ha"],
        summary="Forget a cluster (its instances are not touched)",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def forget(name: str) -> None:
        await svc().remove(name)

    @websocket(WATCH_PATH)
    async def watch_clusters(socket: WebSocket[Any, Any, Any]) -> None:
        """Stream topology changes as JSON: first {"type": "ready", "revision", "clusters": [ClusterView]},
        then "primary", "instance", "instance_removed", "history", "cluster" and "removed" messages
        as the leader records them (`?cluster=NAME` for one cluster). Not in the OpenAPI schema
        (WebSocket routes are not); see docs/ha.md."""
        await socket.accept()
        only = socket.query_params.get("cluster")
        try:
            ha = svc()
            if node.registry is not None:
                await node.registry.sync()
            if only is not None:
                ha.record(only)
        except FleetmateError as exc:
            await fail(socket, exc.code, exc.message)
            return
        root = layout.cluster_path(only) if only is not None else layout.ROOT

        async def ready() -> dict[str, Any]:
            names = [only] if only is not None else ha.names()
            return {"type": "ready", "revision": ha.registry.revision, "clusters": [_view(ha, n) for n in names]}

        await stream_changes(socket, ha.registry, root, ready, lambda event: _change(ha, event))

    return [
        register,
        list_clusters,
        one_cluster,
        history,
        topology,
        failover,
        switchover,
        set_rule,
        set_downtime,
        acknowledge,
        forget,
        watch_clusters,
    ]


def _view(ha: HaService, name: str) -> ClusterView | None:
    try:
        return ha.view(name)
    except FleetmateError:
        return None  # half-created or being removed


def _change(ha: HaService, event: Event) -> dict[str, Any] | None:
    """The message for a registry event under /fleet/clusters; None for folders and superseded events."""
    where = layout.parse_path(event.path)
    if where is None:
        return None
    name, part, child = where
    base: dict[str, Any] = {"revision": event.revision, "cluster": name}
    if part == "cluster":
        return {"type": "removed", **base} if event.type == "deleted" else None
    if event.type == "deleted":
        return {"type": "instance_removed", **base, "instance": child} if part == "instance" else None
    if event.type not in ("created", "changed"):
        return None
    found = ha.registry.node(event.path)
    if found is None or found.version != event.version:
        return None  # a later event carries the newer data
    data = bytes(found.data or b"")
    if part == "primary":
        return {"type": "primary", **base, "primary": data.decode()}
    if part == "config":
        return {"type": "cluster", **base, "record": msgspec.json.decode(data)}
    if part == "instance":
        return {"type": "instance", **base, "instance": msgspec.json.decode(data)}
    return {"type": "history", **base, "entry": msgspec.json.decode(data)}
