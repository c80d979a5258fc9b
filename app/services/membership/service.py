"""MembershipService: hears heartbeats and facts, heartbeats for this replica, and (on the leader) records node states.

Every replica subscribes to heartbeats and facts and remembers when it last heard each node,
so any replica can show a fresh last_seen and a replica that takes the lead starts from what it
heard itself. Only the lease holder runs the state machine (state.py) on a tick and writes each
change into the registry (records.py) with compare-and-set on the state znode's version: every
replica applies the same log, the states survive restarts, and registry watches fire. Operator
requests (maintenance, remove) from any replica take the same path and the same checks.

This module wires the collaborators together, each in its own module: the ears (heard.py), this
replica's heartbeat (replica_heartbeat.py), the leader's judge (judge.py), the public reads
(queries.py) and the operator and agent requests (operations.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from app.bus.connection import Bus
from app.config import MembershipConfig
from app.services.agent.messages import HostInfo
from app.services.membership.heard import Ears, Heard
from app.services.membership.judge import Judge
from app.services.membership.messages import AgentRequest, HistoryData
from app.services.membership.operations import Operations
from app.services.membership.queries import NodeDetail, NodeQueries, NodeView
from app.services.membership.records import Records
from app.services.membership.relay import RELAY_TIMEOUT_S
from app.services.membership.replica_heartbeat import ReplicaHeartbeater
from app.services.membership.state import NodeRecord, Timings
from app.services.registry.service import RegistryService


class MembershipService:
    """One replica's membership: ears on every replica, the state machine on the leader."""

    def __init__(
        self,
        bus: Bus,
        registry: RegistryService,
        cfg: MembershipConfig,
        node_id: str,
        started_at: float,
        host_info: Callable[[], HostInfo],
        addresses: Callable[[], tuple[str, str]] = lambda: ("", ""),
    ) -> None:
        self.registry = registry
        self.node_id = node_id
        self.timings = Timings(cfg.heartbeat_interval, cfg.suspect_after, cfg.down_after)
        self.records = Records(registry)
        self.heard: dict[str, Heard] = {}
        self.judge = Judge(registry, self.records, self.timings, self.heard)
        self.ears = Ears(bus, self.records, self.timings, self.heard, self.judge)
        self.queries = NodeQueries(registry, self.records, self.heard)
        self.operations = Operations(bus, registry, self.records, self.timings, self.heard, self.queries)
        self.heartbeat = ReplicaHeartbeater(
            bus, node_id, started_at, cfg.heartbeat_interval, host_info, addresses, self.ears.prune
        )

    @property
    def leading(self) -> bool:
        """True while this replica judges node states."""
        return self.judge.leading

    @property
    def written(self) -> int:
        """State changes this replica recorded (the leader's and operators')."""
        return self.judge.written + self.operations.written

    async def start(self) -> None:
        """Listen for heartbeats and facts, and start heartbeating for this replica."""
        await self.ears.start()
        self.heartbeat.start()

    async def stop(self) -> None:
        """Stop leading, heartbeating and listening."""
        await self.stop_leading()
        await self.heartbeat.stop()
        await self.ears.stop()

    async def lead(self) -> None:
        """Take over: rebuild the view from /fleet/nodes (with a grace period) and start judging."""
        await self.judge.lead()

    async def stop_leading(self) -> None:
        """The lease is gone: stop judging at once."""
        await self.judge.stop()
        self.ears.cancel_asks()

    # ---- reads for the API (any replica) -----------------------------------------------------

    def view(self, record: NodeRecord) -> NodeView:
        """A record as the API shows it."""
        return self.queries.view(record)

    async def nodes(self, linearizable: bool = True) -> list[NodeView]:
        """Every node recorded under /fleet/nodes, by id."""
        return await self.queries.nodes(linearizable)

    async def node(self, node_id: str, linearizable: bool = True) -> NodeDetail:
        """One node with its facts and state history."""
        return await self.queries.node(node_id, linearizable)

    def histories(self, node_id: str | None = None) -> dict[str, list[HistoryData]]:
        """Every recorded node's state changes, oldest first (or one node's; local applied state, no barrier)."""
        return self.queries.histories(node_id)

    def states(self) -> dict[str, str]:
        """Each recorded node's state (local applied state, no barrier), for /metrics."""
        return self.queries.states()

    # ---- operator requests and agent relays (any replica) ------------------------------------

    async def set_maintenance(self, node_id: str, on: bool, reason: str = "") -> NodeView:
        """Put a node in maintenance (no alarms) or take it out (judged again from its last heartbeat)."""
        return await self.operations.set_maintenance(node_id, on, reason)

    async def remove(self, node_id: str, reason: str = "") -> NodeView:
        """Forget a node: its folder under /fleet/nodes goes. A later heartbeat registers it again."""
        return await self.operations.remove(node_id, reason)

    async def relay(
        self, node_id: str, request: AgentRequest, body: Any = None, timeout: float = RELAY_TIMEOUT_S
    ) -> Any:
        """Ask the node's agent over the bus; its JSON answer, decoded."""
        return await self.operations.relay(node_id, request, body, timeout)
