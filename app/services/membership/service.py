"""MembershipService: hears heartbeats and facts, heartbeats for this replica, and (on the leader) records node states.

Every replica subscribes to heartbeats and facts and remembers when it last heard each node,
so any replica can show a fresh last_seen and a replica that takes the lead starts from what it
heard itself. Only the lease holder runs the state machine (state.py) on a tick and writes each
change into the registry (records.py) with compare-and-set on the state znode's version: every
replica applies the same log, the states survive restarts, and registry watches fire. Operator
requests (maintenance, remove) from any replica take the same path and the same checks.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from app import __version__
from app.bus import subjects
from app.bus.connection import Bus
from app.bus.micro import call
from app.config import NODE_ID_RE, MembershipConfig
from app.decisions import current_trace_id, decision_span
from app.services.agent.messages import HostInfo
from app.services.membership import records as layout
from app.services.membership.errors import BadNodeRequest, Conflict, NoSuchNode
from app.services.membership.messages import (
    FACT_NAMES,
    AgentRequest,
    HeardFacts,
    HeardHeartbeat,
    HistoryData,
    ReplicaHeartbeat,
)
from app.services.membership.records import Records, canonical
from app.services.membership.relay import ask_agent
from app.services.membership.state import (
    Event,
    Heartbeat,
    Membership,
    NodeRecord,
    Remove,
    SetMaintenance,
    Tick,
    Timings,
    Transition,
    UnknownNode,
    step,
)
from app.services.registry.errors import OperationTimeout, RegistryError
from app.services.registry.service import RegistryService
from app.supervise import supervisor

log = logging.getLogger("fleetmate.membership")

MAX_TICK_S = 1.0
MAX_LABELS = 64
OPERATOR_TRIES = 5
RELAY_TIMEOUT_S = 5.0
FORGET_AFTER_S = 3600.0  # a silent node with no record is forgotten by every replica's ears after this
_hb_dec = msgspec.json.Decoder(HeardHeartbeat)
_facts_dec = msgspec.json.Decoder(HeardFacts)
_enc = msgspec.json.Encoder()


@dataclass
class Heard:
    """What this replica last heard from a node (its own clock)."""

    at: float
    kind: str
    labels: dict[str, str]
    seq: int
    facts: dict[str, bytes] = field(default_factory=dict)  # canonical JSON per fact name
    facts_rev: int = 0  # the rev of the newest facts heard
    facts_started_at: float = 0.0  # the start time of the agent process those facts came from
    asked_at: float = 0.0  # when the leader last asked the agent for its facts


def forgettable(heard: dict[str, Heard], cutoff: float, recorded: Callable[[str], bool]) -> list[str]:
    """The nodes last heard before cutoff that have no record any more."""
    return [node_id for node_id, h in heard.items() if h.at < cutoff and not recorded(node_id)]


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
        self.bus = bus
        self.registry = registry
        self.cfg = cfg
        self.node_id = node_id
        self.started_at = started_at
        self.host_info = host_info
        self.addresses = addresses
        self.timings = Timings(cfg.heartbeat_interval, cfg.suspect_after, cfg.down_after)
        self.records = Records(registry)
        self.heard: dict[str, Heard] = {}
        self.machine = Membership(self.timings)
        self.leading = False
        self.written = 0  # state changes this replica recorded
        self._versions: dict[str, int] = {}
        self._pending: list[Transition] = []
        self._dirty: set[str] = set()  # nodes whose labels or facts may need writing
        self._wake = asyncio.Event()
        self._subs: list[Subscription] = []
        self._beat: asyncio.Task[None] | None = None
        self._leader: asyncio.Task[None] | None = None
        self._seq = 0
        self._asks: set[asyncio.Task[None]] = set()

    @property
    def tick_s(self) -> float:
        """How often the leader judges silence."""
        return min(MAX_TICK_S, self.timings.heartbeat_interval / 2)

    async def start(self) -> None:
        """Listen for heartbeats and facts, and start heartbeating for this replica."""
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(subjects.AGENT_HEARTBEATS, cb=self._on_heartbeat),
            await nc.subscribe(subjects.AGENT_FACTS, cb=self._on_facts),
        ]
        self._beat = supervisor.watch(
            asyncio.create_task(self._heartbeat_loop(), name="membership-heartbeat"), "the membership heartbeat"
        )

    async def stop(self) -> None:
        """Stop leading, heartbeating and listening."""
        await self.stop_leading()
        if self._beat is not None:
            self._beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._beat
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    # ---- this replica's heartbeat ------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        subject = subjects.agent_heartbeat(self.node_id)
        while True:
            try:
                host = await asyncio.to_thread(self.host_info)
                http_url, zk_address = self.addresses()
                self._seq += 1
                beat = ReplicaHeartbeat(
                    node_id=self.node_id,
                    kind="replica",
                    labels={},
                    seq=self._seq,
                    sent_at=time.time(),
                    started_at=self.started_at,
                    version=__version__,
                    host=host,
                    http_url=http_url,
                    zk_address=zk_address,
                )
                await self.bus.nc.publish(subject, _enc.encode(beat))
            except Exception as exc:  # the bus may be reconnecting; the next beat retries
                log.debug("replica heartbeat failed", extra={"error": repr(exc)})
            self._prune_heard()
            await asyncio.sleep(self.timings.heartbeat_interval)

    def _prune_heard(self) -> None:
        """Forget what was heard from nodes silent for FORGET_AFTER_S that have no record (removed ones)."""
        cutoff = time.time() - max(FORGET_AFTER_S, 10 * self.timings.down_after)
        for node_id in forgettable(self.heard, cutoff, lambda n: self.records.read(n) is not None):
            del self.heard[node_id]

    # ---- ears (every replica) ----------------------------------------------------------------

    async def _on_heartbeat(self, msg: Msg) -> None:
        try:
            beat = _hb_dec.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.debug("unreadable heartbeat dropped", extra={"subject": msg.subject, "error": str(exc)})
            return
        if msg.subject.rsplit(".", 1)[-1] != beat.node_id or not NODE_ID_RE.match(beat.node_id):
            log.debug("heartbeat with a bad or mismatched node id dropped", extra={"subject": msg.subject})
            return
        now = time.time()
        labels = beat.labels if len(beat.labels) <= MAX_LABELS else {}
        known = self.heard.get(beat.node_id)
        if known is None:
            self.heard[beat.node_id] = Heard(now, beat.kind, labels, beat.seq)
        else:
            known.at, known.kind, known.labels, known.seq = now, beat.kind, labels, beat.seq
        if self.leading:
            self._pending.extend(self.machine.apply(Heartbeat(beat.node_id, now, beat.kind)))
            if self.records.data(beat.node_id, "labels") != canonical(labels):
                self._dirty.add(beat.node_id)
            self._wake.set()
            heard = self.heard[beat.node_id]
            # The agent's facts moved on and their publication did not reach us: ask for them.
            restarted = bool(beat.started_at) and beat.started_at > heard.facts_started_at
            if (
                beat.facts_rev
                and (beat.facts_rev > heard.facts_rev or restarted)
                and now - heard.asked_at > 2 * self.cfg.heartbeat_interval
            ):
                heard.asked_at = now
                task = asyncio.create_task(self._ask_facts(beat.node_id), name="membership-ask-facts")
                self._asks.add(task)
                task.add_done_callback(self._asks.discard)

    async def _on_facts(self, msg: Msg) -> None:
        try:
            facts = _facts_dec.decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            log.debug("unreadable facts dropped", extra={"subject": msg.subject, "error": str(exc)})
            return
        if msg.subject.rsplit(".", 1)[-1] != facts.node_id or not NODE_ID_RE.match(facts.node_id):
            return
        self._keep_facts(facts)

    async def _ask_facts(self, node_id: str) -> None:
        try:
            reply = await call(self.bus.nc, subjects.agent_request(node_id, "facts"), b"", RELAY_TIMEOUT_S)
            facts = _facts_dec.decode(reply)
        except Exception as exc:  # a missing or slow agent: its next heartbeat asks again
            log.debug("asking an agent for its facts failed", extra={"node": node_id, "error": repr(exc)})
            return
        if facts.node_id == node_id:
            self._keep_facts(facts)

    def _keep_facts(self, facts: HeardFacts) -> None:
        heard = self.heard.setdefault(facts.node_id, Heard(0.0, "agent", {}, 0))
        if facts.started_at and facts.started_at != heard.facts_started_at:
            if facts.started_at < heard.facts_started_at:
                return  # from an agent process older than the one we hear
            heard.facts_started_at, heard.facts_rev = facts.started_at, 0  # a restarted agent counts again
        if facts.rev and facts.rev < heard.facts_rev:
            return  # older than what we have (a publication and an answer crossed)
        heard.facts_rev = max(heard.facts_rev, facts.rev)
        kept: dict[str, bytes] = {}
        for name in FACT_NAMES:
            raw: msgspec.Raw = getattr(facts, name)
            try:
                value = msgspec.json.decode(raw)
            except msgspec.DecodeError:
                continue
            if value is not None:
                kept[name] = canonical(value)
        heard.facts.update(kept)
        if self.leading:
            self._dirty.add(facts.node_id)
            self._wake.set()

    # ---- the leader --------------------------------------------------------------------------

    async def lead(self) -> None:
        """Take over: rebuild the view from /fleet/nodes (with a grace period) and start judging."""
        await self.registry.sync()
        now = time.time()
        stored = self.records.read_all()
        restored = [self._with_heard(record) for record, _ in stored.values()]
        self.machine.restore(restored, now)
        self._versions = {node_id: version for node_id, (_, version) in stored.items()}
        self._pending = []
        self.leading = True
        for node_id, heard in self.heard.items():
            if node_id not in stored and now - heard.at < self.timings.suspect_s:
                self._pending.extend(self.machine.apply(Heartbeat(node_id, heard.at, heard.kind)))
        self._dirty = set(self.heard)
        self._leader = supervisor.watch(
            asyncio.create_task(self._leader_loop(), name="membership-leader"), "the membership leader loop"
        )
        log.info("judging node states", extra={"nodes": len(stored), "grace_s": self.timings.suspect_s})

    async def stop_leading(self) -> None:
        """The lease is gone: stop judging at once."""
        self.leading = False
        task, self._leader = self._leader, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pending = []
        self._versions = {}
        for task in list(self._asks):
            task.cancel()

    async def _leader_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick_s)
            self._wake.clear()
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the log may be unavailable for a moment: the next round retries
                log.warning("membership round failed", extra={"error": repr(exc)})

    def _reconcile(self) -> None:
        """Adopt what other writers (operators, a previous leader) recorded since we last looked."""
        ids = set(self.records.ids()) | set(self._versions)
        registry = self.registry
        for node_id in ids:
            znode = registry.node(layout.state_path(node_id))
            if znode is not None and self._versions.get(node_id) == znode.version:
                continue  # unchanged since we wrote or read it: no need to decode
            found = self.records.read(node_id)
            if found is None:
                if node_id in self._versions:
                    del self._versions[node_id]
                    self.machine.forget(node_id)
                    self._drop_pending(node_id)
                continue
            record, version = found
            if self._versions.get(node_id) != version:
                self._versions[node_id] = version
                self.machine.adopt(self._with_heard(record))
                self._drop_pending(node_id)

    def _with_heard(self, record: NodeRecord) -> NodeRecord:
        heard = self.heard.get(record.node_id)
        if heard is not None and heard.at > record.last_seen:
            return msgspec.structs.replace(record, last_seen=heard.at)
        return record

    def _drop_pending(self, node_id: str) -> None:
        self._pending = [t for t in self._pending if t.node_id != node_id]

    async def _round(self) -> None:
        self._reconcile()
        self._pending.extend(self.machine.apply(Tick(time.time())))
        if self._pending and self.leading:
            # A round that decides something is one trace: its history entries and log lines carry
            # its id (a span only then, not one per tick).
            nodes = sorted({change.node_id for change in self._pending})[:100]  # a bounded attribute
            with decision_span(
                "membership.judge", {"membership.changes": len(self._pending), "membership.nodes": nodes}
            ) as trace_id:
                while self._pending and self.leading:
                    change = self._pending.pop(0)
                    await self._record(change, trace_id)
        dirty, self._dirty = self._dirty, set()
        for node_id in sorted(dirty):
            if self.leading:
                await self._write_facts(node_id)

    async def _record(self, change: Transition, trace_id: str = "") -> None:
        node_id = change.node_id
        heard = self.heard.get(node_id)
        labels = heard.labels if heard is not None else {}
        try:
            # Fenced by the lease term: once a newer leader exists this write is refused (StaleTerm).
            version = await self.records.write(
                change, self._versions.get(node_id), labels, self.registry.duty_term, trace_id
            )
        except OperationTimeout:
            return  # unknown outcome: the next round's reconcile reads what happened
        except RegistryError as exc:
            log.info(
                "state change lost a race; adopting the recorded state",
                extra={"node": node_id, "state": change.new, "error": exc.message},
            )
            self._versions.pop(node_id, None)
            self._drop_pending(node_id)
            found = self.records.read(node_id)
            if found is None:
                self.machine.forget(node_id)
            else:
                self._versions[node_id] = found[1]
                self.machine.adopt(self._with_heard(found[0]))
            return
        self.written += 1
        if version is None:
            self._versions.pop(node_id, None)
        else:
            self._versions[node_id] = version
            self._dirty.add(node_id)  # a new node's facts may have arrived before it registered
        log.info(
            "node state changed",
            extra={"node": node_id, "from": change.old, "to": change.new, "reason": change.reason},
        )

    async def _write_facts(self, node_id: str) -> None:
        heard = self.heard.get(node_id)
        if heard is None or node_id not in self._versions:
            return
        try:
            await self.records.put(node_id, "labels", canonical(heard.labels))
            for name, data in heard.facts.items():
                await self.records.put(node_id, name, data)
        except RegistryError as exc:  # removed meanwhile, or a race with another writer
            log.debug("facts not written", extra={"node": node_id, "error": exc.message})

    # ---- reads for the API (any replica) -----------------------------------------------------

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

    def _find(self, node_id: str) -> tuple[NodeRecord, int]:
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
        record, _ = self._find(node_id)
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

    # ---- operator requests (any replica) -----------------------------------------------------

    async def _operate(self, node_id: str, make: Callable[[float], Event]) -> Transition | None:
        for _ in range(OPERATOR_TRIES):
            await self.registry.sync()
            record, version = self._find(node_id)
            record = self._with_heard(record)
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
        record, _ = self._find(node_id)
        return self.view(record)

    async def remove(self, node_id: str, reason: str = "") -> NodeView:
        """Forget a node: its folder under /fleet/nodes goes. A later heartbeat registers it again."""
        record, _ = self._find(node_id)
        before = self.view(record)
        await self._operate(node_id, lambda at: Remove(node_id, at, reason))
        return msgspec.structs.replace(before, state="removed", since=time.time(), reason=reason or "removed")

    # ---- requests relayed to a node's agent --------------------------------------------------

    async def relay(
        self, node_id: str, request: AgentRequest, body: Any = None, timeout: float = RELAY_TIMEOUT_S
    ) -> Any:
        """Ask the node's agent over the bus; its JSON answer, decoded."""
        await self.registry.sync()
        record, _ = self._find(node_id)
        if record.kind == "replica":
            raise BadNodeRequest(f"node {node_id!r} is a fleetmate replica; {request} requests go to agents")
        return await ask_agent(self.bus.nc, node_id, request, body, timeout)
