"""Membership messages: heartbeats and facts as heard on the bus, records under /fleet/nodes, agent requests."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from app.services.agent.messages import HostInfo
from app.services.membership.state import State

# The agent's request/reply endpoints (nats.micro); subjects in app/bus/subjects.py.
AgentRequest = Literal["info", "ports", "free_ports", "scan", "clean", "net", "facts"]
FACT_NAMES = ("ports", "engines", "network", "logs")


class HeardHeartbeat(msgspec.Struct, frozen=True):
    """A heartbeat as membership reads it: only the fields it needs, anything else ignored (JSON)."""

    node_id: str
    kind: str = "agent"
    labels: dict[str, str] = {}
    seq: int = 0
    sent_at: float = 0.0
    facts_rev: int | None = None
    started_at: float = 0.0


class HeardFacts(msgspec.Struct, frozen=True):
    """An agent's facts as membership reads them: each fact kept as the JSON the agent sent."""

    node_id: str
    ports: msgspec.Raw = msgspec.Raw(b"null")
    engines: msgspec.Raw = msgspec.Raw(b"null")
    network: msgspec.Raw = msgspec.Raw(b"null")
    logs: msgspec.Raw = msgspec.Raw(b"null")
    updated_at: float = 0.0
    rev: int = 0
    started_at: float = 0.0  # the agent process's start: a new one counts rev from 1 again


class ReplicaHeartbeat(msgspec.Struct, frozen=True):
    """The heartbeat a fleetmate replica publishes about itself: the agents' Heartbeat shape, kind "replica"."""

    node_id: str
    kind: Literal["replica"]
    labels: dict[str, str]
    seq: int
    sent_at: float
    started_at: float
    version: str
    host: HostInfo
    client_ip: str = ""
    http_url: str = ""
    zk_address: str = ""
    facts_rev: int = 0


class StateData(msgspec.Struct, frozen=True):
    """The JSON kept in /fleet/nodes/<id>/state."""

    state: State
    since: float
    last_seen: float
    reason: str = ""
    kind: str = "agent"


class HistoryData(msgspec.Struct, frozen=True):
    """The JSON of one /fleet/nodes/<id>/history/h-NNNNNNNNNN entry: a state change, with the trace
    id of what decided it (an operator's HTTP request, or the leader's detection round; "" in
    entries written before trace ids were kept)."""

    at: float
    state: State
    old: State | None
    reason: str = ""
    last_seen: float = 0.0
    trace_id: str = ""


# ---- requests relayed to agents (JSON bodies) -----------------------------------------------------

Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]


class FreePortsRequest(msgspec.Struct, frozen=True):
    """Ask an agent for up to `count` ports in [start, end] that nothing listens on."""

    start: Port
    end: Port
    proto: Literal["tcp", "udp"] = "tcp"
    count: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 1


class CleanRequest(msgspec.Struct, frozen=True):
    """Ask an agent to run its log cleanup (one named rule, or all), possibly as a dry run."""

    dry_run: bool = False
    rule: str | None = None


def to_json_value(raw: bytes) -> Any:
    """Decode JSON bytes kept in the registry ({} stays {}; empty bytes are None)."""
    if not raw:
        return None
    return msgspec.json.decode(raw)
