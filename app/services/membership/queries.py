"""Reads for the API on any replica: nodes as recorded, last_seen refreshed from what this replica heard."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec

from app.config import NODE_ID_RE
from app.services.membership.errors import NoSuchNode
from app.services.membership.heard import Heard
from app.services.membership.messages import FACT_NAMES, HistoryData
from app.services.membership.records import Records
from app.services.membership.state import NodeRecord
from app.services.registry.service import RegistryService


class NodeView(msgspec.Struct, frozen=True):
    """A node as the API shows it: its recorded state, with last_seen refreshed from this replica's ears."""

    node_id: str
    kind: str
    state: str
    since: float
    last_seen: float
    reason: str
    labels: dict[str, str]


class NodeDetail(msgspec.Struct, frozen=True):
    """A node with its facts (as its agent reported them) and its state history, oldest first."""

    node: NodeView
    facts: dict[str, Any]
    history: list[HistoryData]


class NodeQueries:
    """The public reads: node lists, one node's detail, histories and states."""

    def __init__(self, registry: RegistryService, records: Records, heard: dict[str, Heard]) -> None:
        self.registry = registry
        self.records = records
        self.heard = heard

    def view(self, record: NodeRecord) -> NodeView:
        """A record as the API shows it."""
        heard = self.heard.get(record.node_id)
        last_seen = max(record.last_seen, heard.at if heard else 0.0)
        raw = self.records.data(record.node_id, "labels")
        labels: dict[str, str] = {}
        if raw:
            with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
                labels = msgspec.json.decode(raw, type=dict[str, str])
        return NodeView(record.node_id, record.kind, record.state, record.since, last_seen, record.reason, labels)

    async def nodes(self, linearizable: bool = True) -> list[NodeView]:
        """Every node recorded under /fleet/nodes, by id."""
        if linearizable:
            await self.registry.sync()
        return [self.view(record) for _, (record, _) in sorted(self.records.read_all().items())]

    def find(self, node_id: str) -> tuple[NodeRecord, int]:
        """A node's record and its version; NoSuchNode for a bad or unregistered id."""
        if not NODE_ID_RE.match(node_id):
            raise NoSuchNode(f"no node {node_id!r}: node ids are 1-64 letters, digits, '_' or '-'")
        found = self.records.read(node_id)
        if found is None:
            raise NoSuchNode(f"no node {node_id!r} is registered")
        return found

    async def node(self, node_id: str, linearizable: bool = True) -> NodeDetail:
        """One node with its facts and state history."""
        if linearizable:
            await self.registry.sync()
        record, _ = self.find(node_id)
        facts: dict[str, Any] = {}
        for name in FACT_NAMES:
            data = self.records.data(node_id, name)
            if data:
                with contextlib.suppress(msgspec.DecodeError):
                    facts[name] = msgspec.json.decode(data)
        history = [entry for _, entry in self.records.history(node_id)]
        return NodeDetail(self.view(record), facts, history)

    def histories(self, node_id: str | None = None) -> dict[str, list[HistoryData]]:
        """Every recorded node's state changes, oldest first (or one node's; local applied state, no barrier)."""
        ids = self.records.ids() if node_id is None else [node_id]
        return {n: [entry for _, entry in self.records.history(n)] for n in ids}

    def states(self) -> dict[str, str]:
        """Each recorded node's state (local applied state, no barrier), for /metrics."""
        return {node_id: record.state for node_id, (record, _) in self.records.read_all().items()}
