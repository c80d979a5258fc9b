"""Operator requests from any replica (maintenance, remove) and requests relayed to a node's agent."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec

from app.bus.connection import Bus
from app.decisions import current_trace_id
from app.services.membership.errors import BadNodeRequest, Conflict, NoSuchNode
from app.services.membership.heard import Heard, with_heard
from app.services.membership.messages import AgentRequest
from app.services.membership.queries import NodeQueries, NodeView
from app.services.membership.records import Records
from app.services.membership.relay import RELAY_TIMEOUT_S, ask_agent
from app.services.membership.state import Event, Remove, SetMaintenance, Timings, Transition, UnknownNode, step
from app.services.registry.errors import OperationTimeout, RegistryError
from app.services.registry.service import RegistryService

log = logging.getLogger("fleetmate.membership")

OPERATOR_TRIES = 5


class Operations:
    """Applies an operator's event with the same state machine and compare-and-set as the leader."""

    def __init__(
        self,
        bus: Bus,
        registry: RegistryService,
        records: Records,
        timings: Timings,
        heard: dict[str, Heard],
        queries: NodeQueries,
    ) -> None:
        self.bus = bus
        self.registry = registry
        self.records = records
        self.timings = timings
        self.heard = heard
        self.queries = queries
        self.written = 0  # state changes operators made through this replica

    async def _operate(self, node_id: str, make: Callable[[float], Event]) -> Transition | None:
        for _ in range(OPERATOR_TRIES):
            await self.registry.sync()
            record, version = self.queries.find(node_id)
            record = with_heard(self.heard, record)
            try:
                _, change = step(record, make(time.time()), self.timings)
            except UnknownNode:
                raise NoSuchNode(f"no node {node_id!r} is registered") from None
            if change is None:
                return None
            try:
                # The request's trace (its HTTP span's, continuing a caller's traceparent).
                await self.records.write(change, version, trace_id=current_trace_id())
            except OperationTimeout:
                raise
            except RegistryError as exc:
                log.info(
                    "operator change raced another writer; retrying", extra={"node": node_id, "error": exc.message}
                )
                continue
            self.written += 1
            log.info("node state set", extra={"node": node_id, "from": change.old, "to": change.new})
            return change
        raise Conflict(f"node {node_id!r} kept changing; try again")

    async def set_maintenance(self, node_id: str, on: bool, reason: str = "") -> NodeView:
        """Put a node in maintenance (no alarms) or take it out (judged again from its last heartbeat)."""
        await self._operate(node_id, lambda at: SetMaintenance(node_id, on, at, reason))
        record, _ = self.queries.find(node_id)
        return self.queries.view(record)

    async def remove(self, node_id: str, reason: str = "") -> NodeView:
        """Forget a node: its folder under /fleet/nodes goes. A later heartbeat registers it again."""
        record, _ = self.queries.find(node_id)
        before = self.queries.view(record)
        await self._operate(node_id, lambda at: Remove(node_id, at, reason))
        return msgspec.structs.replace(before, state="removed", since=time.time(), reason=reason or "removed")

    async def relay(
        self, node_id: str, request: AgentRequest, body: Any = None, timeout: float = RELAY_TIMEOUT_S
    ) -> Any:
        """Ask the node's agent over the bus; its JSON answer, decoded."""
        await self.registry.sync()
        record, _ = self.queries.find(node_id)
        if record.kind == "replica":
            raise BadNodeRequest(f"node {node_id!r} is a fleetmate replica; {request} requests go to agents")
        return await ask_agent(self.bus.nc, node_id, request, body, timeout)
