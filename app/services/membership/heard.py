"""The ears of every replica: heartbeats and facts heard on the bus, and what was last heard from each node."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from app.bus import subjects
from app.bus.connection import Bus
from app.bus.micro import call
from app.config import NODE_ID_RE
from app.services.membership.messages import FACT_NAMES, HeardFacts, HeardHeartbeat
from app.services.membership.records import Records, canonical
from app.services.membership.relay import RELAY_TIMEOUT_S
from app.services.membership.state import NodeRecord, Timings

log = logging.getLogger("fleetmate.membership")

MAX_LABELS = 64
FORGET_AFTER_S = 3600.0  # a silent node with no record is forgotten by every replica's ears after this
_hb_dec = msgspec.json.Decoder(HeardHeartbeat)
_facts_dec = msgspec.json.Decoder(HeardFacts)


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


def with_heard(heard: dict[str, Heard], record: NodeRecord) -> NodeRecord:
    """The record with last_seen moved up to when this replica last heard the node, if that is later."""
    found = heard.get(record.node_id)
    if found is not None and found.at > record.last_seen:
        return msgspec.structs.replace(record, last_seen=found.at)
    return record


class Listener(Protocol):
    """Who is told what the ears hear while it leads (the leader's judge)."""

    @property
    def leading(self) -> bool:
        """True while this replica judges node states."""
        ...

    def heard_heartbeat(self, node_id: str, at: float, kind: str, labels: dict[str, str]) -> None:
        """A heartbeat arrived (already remembered in heard)."""

    def heard_facts(self, node_id: str) -> None:
        """Newer facts arrived (already kept in heard)."""


class Ears:
    """Subscribes to heartbeats and facts, keeps `heard` current and, on the leader, asks agents for missed facts."""

    def __init__(
        self,
        bus: Bus,
        records: Records,
        timings: Timings,
        heard: dict[str, Heard],
        listener: Listener,
    ) -> None:
        self.bus = bus
        self.records = records
        self.timings = timings
        self.heard = heard
        self.listener = listener
        self._subs: list[Subscription] = []
        self._asks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        """Subscribe to every agent's (and replica's) heartbeats and facts."""
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(subjects.AGENT_HEARTBEATS, cb=self._on_heartbeat),
            await nc.subscribe(subjects.AGENT_FACTS, cb=self._on_facts),
        ]

    async def stop(self) -> None:
        """Unsubscribe."""
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    def cancel_asks(self) -> None:
        """Drop the facts requests in flight (leadership is gone)."""
        for task in list(self._asks):
            task.cancel()

    def prune(self) -> None:
        """Forget what was heard from nodes silent for FORGET_AFTER_S that have no record (removed ones)."""
        cutoff = time.time() - max(FORGET_AFTER_S, 10 * self.timings.down_after)
        for node_id in forgettable(self.heard, cutoff, lambda n: self.records.read(n) is not None):
            del self.heard[node_id]

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
        if self.listener.leading:
            self.listener.heard_heartbeat(beat.node_id, now, beat.kind, labels)
            heard = self.heard[beat.node_id]
            # The agent's facts moved on and their publication did not reach us: ask for them.
            restarted = bool(beat.started_at) and beat.started_at > heard.facts_started_at
            if (
                beat.facts_rev
                and (beat.facts_rev > heard.facts_rev or restarted)
                and now - heard.asked_at > 2 * self.timings.heartbeat_interval
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
        if self.listener.leading:
            self.listener.heard_facts(facts.node_id)
