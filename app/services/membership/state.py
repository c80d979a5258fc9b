"""The pure membership state machine: events (heartbeat, tick, maintenance, remove) in, transitions out.

No clock and no I/O: every event carries its time, chosen by the caller (the leader's wall
clock when it receives a heartbeat or ticks). States:

- ``online``: heard from within ``suspect_after * heartbeat_interval`` seconds;
- ``suspect``: silent that long, but for less than ``down_after`` seconds;
- ``down``: silent for ``down_after`` seconds or more;
- ``maintenance``: set by an operator; no alarms (heartbeats still update ``last_seen``,
  nothing moves the node until maintenance is cleared, which re-evaluates it from ``last_seen``);
- ``removed``: the node is forgotten. A later heartbeat from it registers it again as a new
  ``online`` node (an agent that still runs comes back; stop the agent first to keep it out).

Silence is counted from ``max(last_seen, watch_from)``; ``watch_from`` is the moment a leader
took over (``restore``), so a leader change gives every node a full grace period instead of
judging it by heartbeats the previous leader heard and this one did not.
"""

from __future__ import annotations

from typing import Literal

import msgspec

State = Literal["online", "suspect", "down", "maintenance", "removed"]
Kind = Literal["agent", "replica"]
STATES: tuple[State, ...] = ("online", "suspect", "down", "maintenance", "removed")


class Timings(msgspec.Struct, frozen=True):
    """When silence makes a node suspect and down (seconds)."""

    heartbeat_interval: float
    suspect_after: int
    down_after: float

    @property
    def suspect_s(self) -> float:
        """Seconds of silence after which a node is suspect."""
        return self.suspect_after * self.heartbeat_interval


class NodeRecord(msgspec.Struct, frozen=True):
    """One node as the machine knows it (replaced whole on every change)."""

    node_id: str
    state: State
    since: float  # when it entered this state
    last_seen: float  # the newest heartbeat heard (0: never, e.g. restored without one)
    reason: str = ""
    kind: str = "agent"
    watch_from: float = 0.0  # silence is counted from max(last_seen, watch_from)


class Transition(msgspec.Struct, frozen=True):
    """A node changed state (old None: it was unknown and registered)."""

    node_id: str
    old: State | None
    new: State
    at: float
    reason: str
    record: NodeRecord | None  # the node after the change; None when removed


# ---- events -----------------------------------------------------------------------------------


class Heartbeat(msgspec.Struct, frozen=True):
    """A heartbeat from node_id was received at `at`."""

    node_id: str
    at: float
    kind: str = "agent"


class Tick(msgspec.Struct, frozen=True):
    """The clock reads `at`: judge every node's silence."""

    at: float


class SetMaintenance(msgspec.Struct, frozen=True):
    """An operator puts a node in maintenance (on) or takes it out (off)."""

    node_id: str
    on: bool
    at: float
    reason: str = ""


class Remove(msgspec.Struct, frozen=True):
    """An operator removes a node: it is forgotten."""

    node_id: str
    at: float
    reason: str = ""


Event = Heartbeat | Tick | SetMaintenance | Remove


class UnknownNode(Exception):
    """An operator event named a node the machine does not know."""


def judge(silence: float, timings: Timings) -> State:
    """The state that `silence` seconds without a heartbeat call for (maintenance aside)."""
    if silence >= timings.down_after:
        return "down"
    if silence >= timings.suspect_s:
        return "suspect"
    return "online"


def _why(state: State, silence: float) -> str:
    if state == "online":
        return "heartbeats resumed"
    return f"no heartbeat for {silence:.1f}s"


def step(record: NodeRecord | None, event: Event, timings: Timings) -> tuple[NodeRecord | None, Transition | None]:
    """One node's next record and the transition (if its state changed) for one event.

    A Tick with record None does nothing; operator events on an unknown node raise UnknownNode.
    """
    match event:
        case Heartbeat():
            if record is None:
                new = NodeRecord(event.node_id, "online", event.at, event.at, "registered", event.kind)
                return new, Transition(event.node_id, None, "online", event.at, "registered", new)
            seen = max(record.last_seen, event.at)
            if record.state in ("maintenance", "online"):
                return msgspec.structs.replace(record, last_seen=seen), None
            new = NodeRecord(record.node_id, "online", event.at, seen, "heartbeats resumed", record.kind)
            return new, Transition(record.node_id, record.state, "online", event.at, new.reason, new)
        case Tick():
            if record is None or record.state not in ("online", "suspect"):
                return record, None
            silence = event.at - max(record.last_seen, record.watch_from)
            target = judge(silence, timings)
            if target in (record.state, "online"):
                return record, None  # a tick never brings a node back: only a heartbeat does
            new = msgspec.structs.replace(record, state=target, since=event.at, reason=_why(target, silence))
            return new, Transition(record.node_id, record.state, target, event.at, new.reason, new)
        case SetMaintenance():
            if record is None:
                raise UnknownNode(event.node_id)
            if event.on:
                if record.state == "maintenance":
                    return record, None
                reason = event.reason or "maintenance"
                new = msgspec.structs.replace(record, state="maintenance", since=event.at, reason=reason)
                return new, Transition(record.node_id, record.state, "maintenance", event.at, reason, new)
            if record.state != "maintenance":
                return record, None
            silence = event.at - max(record.last_seen, record.watch_from)
            target = judge(silence, timings)
            reason = event.reason or "maintenance over"
            new = msgspec.structs.replace(record, state=target, since=event.at, reason=reason)
            return new, Transition(record.node_id, "maintenance", target, event.at, reason, new)
        case Remove():
            if record is None:
                raise UnknownNode(event.node_id)
            return None, Transition(record.node_id, record.state, "removed", event.at, event.reason or "removed", None)
    raise TypeError(f"unknown event {type(event).__name__}")


class Membership:
    """Every known node's record; only `apply`, `restore`, `adopt` and `forget` change it."""

    def __init__(self, timings: Timings) -> None:
        self.timings = timings
        self.nodes: dict[str, NodeRecord] = {}

    def apply(self, event: Event) -> list[Transition]:
        """Apply one event; the transitions it caused, in node order for a Tick."""
        if isinstance(event, Tick):
            out = []
            for node_id in sorted(self.nodes):
                new, change = step(self.nodes[node_id], event, self.timings)
                if change is not None and new is not None:
                    self.nodes[node_id] = new
                    out.append(change)
            return out
        new, change = step(self.nodes.get(event.node_id), event, self.timings)
        if new is None:
            self.nodes.pop(event.node_id, None)
        else:
            self.nodes[event.node_id] = new
        return [change] if change is not None else []

    def restore(self, records: list[NodeRecord], at: float) -> None:
        """Take over: these records replace the table, each judged from `at` at the earliest (grace)."""
        self.nodes = {r.node_id: msgspec.structs.replace(r, watch_from=at) for r in records}

    def adopt(self, record: NodeRecord) -> None:
        """Another writer changed this node: take its record, keeping the newest last_seen and grace."""
        old = self.nodes.get(record.node_id)
        if old is not None:
            record = msgspec.structs.replace(
                record,
                last_seen=max(old.last_seen, record.last_seen),
                watch_from=max(old.watch_from, record.watch_from),
            )
        self.nodes[record.node_id] = record

    def forget(self, node_id: str) -> None:
        """Another writer removed this node."""
        self.nodes.pop(node_id, None)
