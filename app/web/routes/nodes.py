"""Membership routes (/api/v1/nodes): node states, facts and history, agent requests, a WebSocket of changes.

The WebSocket `/api/v1/nodes/watch` (query: `node` to follow one node) sends
{"type": "ready", "revision", "nodes": [...]} and then, for every recorded change,
{"type": "state", "revision", "node": {...}} or {"type": "removed", "revision", "node_id"}.
Errors come as {"type": "error", "error", "message"} before the server closes the socket.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import delete, get, post, put, websocket
from litestar.connection import WebSocket
from litestar.handlers import BaseRouteHandler
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import Parameter
from litestar.status_codes import HTTP_200_OK

from app.errors import FleetmateError, Unavailable
from app.node import Node
from app.services.membership.errors import BadNodeRequest
from app.services.membership.messages import CleanRequest, FreePortsRequest
from app.services.membership.queries import NodeDetail, NodeView
from app.services.membership.records import ROOT, node_id_of, state_path
from app.services.membership.service import MembershipService
from app.services.membership.state import State
from app.services.registry.messages import Event
from app.web.errors import ErrorBody
from app.web.sockets import fail, stream_changes

WATCH_PATH = "/api/v1/nodes/watch"
SLOW_TIMEOUT_S = 60.0  # engine scans run binaries; cleanups walk directories
RANGE_RE = re.compile(r"^(\d{1,5})-(\d{1,5})$")
_enc = msgspec.json.Encoder()

Serializable = Annotated[
    bool, Parameter(query="serializable", description="answer from local state without the read barrier")
]
Timeout = Annotated[float, Parameter(gt=0, le=300, description="seconds to wait for the agent's answer")]

ERRORS = {
    404: ResponseSpec(data_container=ErrorBody, description="No such node"),
}
RELAY_ERRORS = {
    **ERRORS,
    400: ResponseSpec(data_container=ErrorBody, description="Bad request, or the agent refused it"),
    502: ResponseSpec(data_container=ErrorBody, description="The agent failed the request"),
    504: ResponseSpec(data_container=ErrorBody, description="The agent did not answer in time"),
}


class MaintenanceBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Put a node in maintenance (on: no state alarms) or take it out (off: judged from its last heartbeat)."""

    on: bool
    reason: Annotated[str, msgspec.Meta(max_length=500)] = ""


class CleanBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Run the agent's log cleanup: one rule by name (or all rules), possibly as a dry run."""

    dry_run: bool = False
    rule: Annotated[str, msgspec.Meta(min_length=1, max_length=500)] | None = None


class AgentAnswer(msgspec.Struct, frozen=True):
    """A node agent's answer to a relayed request, as the agent sent it."""

    node_id: str
    request: str
    answer: Any


def parse_range(text: str) -> tuple[int, int]:
    """'3306-3400' as (3306, 3400); BadNodeRequest naming what is wrong."""
    match = RANGE_RE.match(text.strip())
    if match is None:
        raise BadNodeRequest(f"free must be a port range START-END such as 3306-3400, not {text!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if not 1 <= start <= end <= 65535:
        raise BadNodeRequest(f"free range {text!r} must satisfy 1 <= START <= END <= 65535")
    return start, end


def node_routes(node: Node) -> list[BaseRouteHandler]:
    """The handlers, closing over the node."""

    def ms() -> MembershipService:
        members = node.membership
        if members is None:
            raise Unavailable("membership is starting")
        return members

    @get("/api/v1/nodes", tags=["nodes"], summary="List nodes with their states")
    async def list_nodes(
        only: Annotated[State | None, Parameter(query="state", description="only nodes in this state")] = None,
        serializable: Serializable = False,
    ) -> list[NodeView]:
        """Every registered node (agents and fleetmate replicas): state, since, last_seen, labels, kind.

        Changes stream on the WebSocket /api/v1/nodes/watch.
        """
        views = await ms().nodes(linearizable=not serializable)
        return [v for v in views if only is None or v.state == only]

    @get("/api/v1/nodes/{node_id:str}", tags=["nodes"], summary="One node: state, facts, history", responses=ERRORS)
    async def one_node(node_id: str, serializable: Serializable = False) -> NodeDetail:
        """The node's recorded state, its agent's facts (ports, engines, network, logs) and its state history."""
        return await ms().node(node_id, linearizable=not serializable)

    @post(
        "/api/v1/nodes/{node_id:str}/scan",
        tags=["nodes"],
        summary="Ask the node's agent to scan installed engines",
        status_code=HTTP_200_OK,
        responses=RELAY_ERRORS,
    )
    async def scan(node_id: str, timeout: Timeout = SLOW_TIMEOUT_S) -> AgentAnswer:
        """Relayed over the bus to the agent; its new facts follow on their own."""
        return AgentAnswer(node_id, "scan", await ms().relay(node_id, "scan", None, timeout))

    @post(
        "/api/v1/nodes/{node_id:str}/clean",
        tags=["nodes"],
        summary="Ask the node's agent to run its log cleanup",
        status_code=HTTP_200_OK,
        responses=RELAY_ERRORS,
    )
    async def clean(node_id: str, data: CleanBody | None = None, timeout: Timeout = SLOW_TIMEOUT_S) -> AgentAnswer:
        """With dry_run nothing is deleted: the answer says what would be. rule names one rule (default: all)."""
        body = data or CleanBody()
        request = CleanRequest(dry_run=body.dry_run, rule=body.rule)
        return AgentAnswer(node_id, "clean", await ms().relay(node_id, "clean", request, timeout))

    @get(
        "/api/v1/nodes/{node_id:str}/ports",
        tags=["nodes"],
        summary="Listening ports, or free ports in a range, asked of the node's agent",
        responses=RELAY_ERRORS,
    )
    async def ports(
        node_id: str,
        free: Annotated[str | None, Parameter(description="a range START-END: find free ports in it")] = None,
        count: Annotated[int, Parameter(ge=1, le=1000, description="how many free ports")] = 1,
        proto: Literal["tcp", "udp"] = "tcp",
        timeout: Timeout = 5.0,
    ) -> AgentAnswer:
        """Without `free`: the ports the host listens on. With `free=3306-3400`: up to `count` free ones."""
        if free is None:
            return AgentAnswer(node_id, "ports", await ms().relay(node_id, "ports", None, timeout))
        start, end = parse_range(free)
        request = FreePortsRequest(start=start, end=end, proto=proto, count=count)
        return AgentAnswer(node_id, "free_ports", await ms().relay(node_id, "free_ports", request, timeout))

    @put(
        "/api/v1/nodes/{node_id:str}/maintenance",
        tags=["nodes"],
        summary="Put a node in maintenance, or take it out",
        responses=ERRORS,
    )
    async def maintenance(node_id: str, data: MaintenanceBody) -> NodeView:
        """Recorded in the log like every state change; a node in maintenance raises no alarm."""
        return await ms().set_maintenance(node_id, data.on, data.reason)

    @delete(
        "/api/v1/nodes/{node_id:str}",
        tags=["nodes"],
        summary="Remove a node",
        status_code=HTTP_200_OK,
        responses=ERRORS,
    )
    async def remove(node_id: str, reason: str = "") -> NodeView:
        """Its /fleet/nodes/<id> folder goes; if its agent still runs, its next heartbeat registers it again."""
        return await ms().remove(node_id, reason)

    @websocket(WATCH_PATH)
    async def watch_nodes(socket: WebSocket[Any, Any, Any]) -> None:
        """Stream node state changes as JSON (see the module docstring)."""
        await socket.accept()
        only = socket.query_params.get("node")
        try:
            members = ms()
            await members.registry.sync()
        except FleetmateError as exc:
            await fail(socket, exc.code, exc.message)
            return

        async def ready() -> dict[str, Any]:
            views = await members.nodes(linearizable=False)
            nodes = [v for v in views if only is None or v.node_id == only]
            return {"type": "ready", "revision": members.registry.revision, "nodes": nodes}

        await stream_changes(socket, members.registry, ROOT, ready, lambda event: _change(members, event, only))

    return [list_nodes, one_node, scan, clean, ports, maintenance, remove, watch_nodes]


def _change(members: MembershipService, event: Event, only: str | None) -> dict[str, Any] | None:
    """The message for a registry event on a node's state znode; None for anything else or a superseded event."""
    node_id = node_id_of(event.path)
    if node_id is None or event.path != state_path(node_id) or (only is not None and node_id != only):
        return None
    found = members.records.read(node_id)
    if event.type == "deleted":
        if found is not None:
            return None  # created again since
        return {"type": "removed", "revision": event.revision, "node_id": node_id}
    if event.type not in ("created", "changed") or found is None or found[1] != event.version:
        return None  # a later event carries the newer state
    return {"type": "state", "revision": event.revision, "node": members.view(found[0])}
