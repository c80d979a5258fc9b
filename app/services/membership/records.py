"""The /fleet/nodes layout in the registry: read node records, write state changes and facts with compare-and-set.

/fleet/nodes/<id>/state          {"state", "since", "last_seen", "reason", "kind"}
/fleet/nodes/<id>/labels         {"zone": ..., ...}
/fleet/nodes/<id>/ports|engines|network|logs   the agent's facts, as it sent them
/fleet/nodes/<id>/history/h-NNNNNNNNNN         one state change each (with its trace id), the newest HISTORY_KEEP kept
"""

from __future__ import annotations

from typing import Any

import msgspec

from app.services.membership.messages import HistoryData, StateData
from app.services.membership.state import NodeRecord, Transition
from app.services.registry.errors import NoNode
from app.services.registry.messages import Check, Create, Delete, MultiDone, SetData
from app.services.registry.service import MultiOp, RegistryService

ROOT = "/fleet/nodes"
HISTORY_KEEP = 100
HISTORY_PREFIX = "h-"

_enc = msgspec.json.Encoder(order="sorted")
_state_dec = msgspec.json.Decoder(StateData)
_history_dec = msgspec.json.Decoder(HistoryData)


def node_path(node_id: str) -> str:
    """The node's folder."""
    return f"{ROOT}/{node_id}"


def state_path(node_id: str) -> str:
    """The node's state znode."""
    return f"{ROOT}/{node_id}/state"


def child_path(node_id: str, name: str) -> str:
    """A fact or the labels of a node (/fleet/nodes/<id>/<name>)."""
    return f"{ROOT}/{node_id}/{name}"


def history_path(node_id: str) -> str:
    """The parent of the node's history entries."""
    return f"{ROOT}/{node_id}/history"


def node_id_of(path: str) -> str | None:
    """The node id of a path at or under /fleet/nodes/<id>; None for anything else."""
    if not path.startswith(ROOT + "/"):
        return None
    return path[len(ROOT) + 1 :].split("/", 1)[0]


def canonical(value: Any) -> bytes:
    """JSON with sorted keys, so equal facts give equal bytes and are not written twice."""
    return _enc.encode(value)


def decode_state(node_id: str, data: bytes) -> NodeRecord | None:
    """A state znode's JSON as a NodeRecord; None when it is not one (someone wrote junk there)."""
    try:
        raw = _state_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return NodeRecord(node_id, raw.state, raw.since, raw.last_seen, raw.reason, raw.kind)


def encode_state(record: NodeRecord) -> bytes:
    """A NodeRecord as the state znode's JSON."""
    return _enc.encode(StateData(record.state, record.since, record.last_seen, record.reason, record.kind))


def decode_history(data: bytes) -> HistoryData | None:
    """One history entry; None when unreadable."""
    try:
        return _history_dec.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class Records:
    """Reads and writes /fleet/nodes through one replica's registry (reads from its applied state)."""

    def __init__(self, registry: RegistryService) -> None:
        self.registry = registry

    def ids(self) -> list[str]:
        """Every node id with a folder under /fleet/nodes (local applied state)."""
        if not self.registry.exists(ROOT):
            return []
        return self.registry.child_names(ROOT)

    def read(self, node_id: str) -> tuple[NodeRecord, int] | None:
        """The node's record and its state znode's version (local applied state); None when absent."""
        node = self.registry.node(state_path(node_id))
        if node is None:
            return None
        record = decode_state(node_id, node.data or b"")
        return (record, node.version) if record is not None else None

    def read_all(self) -> dict[str, tuple[NodeRecord, int]]:
        """Every readable node record with its version."""
        out = {}
        for node_id in self.ids():
            found = self.read(node_id)
            if found is not None:
                out[node_id] = found
        return out

    def data(self, node_id: str, name: str) -> bytes | None:
        """The data of /fleet/nodes/<id>/<name>; None when absent."""
        node = self.registry.node(child_path(node_id, name))
        return None if node is None else node.data or b""

    def history(self, node_id: str) -> list[tuple[str, HistoryData]]:
        """The node's history entries, oldest first, with their names."""
        parent = history_path(node_id)
        registry = self.registry
        if not registry.exists(parent):
            return []
        out = []
        for name in registry.child_names(parent):
            node = registry.node(f"{parent}/{name}")
            entry = decode_history(node.data or b"") if node is not None else None
            if entry is not None:
                out.append((name, entry))
        return out

    def _history_ops(self, node_id: str, change: Transition, last_seen: float, trace_id: str) -> list[MultiOp]:
        entry = HistoryData(change.at, change.new, change.old, change.reason, last_seen, trace_id)
        ops: list[MultiOp] = [
            Create(f"{history_path(node_id)}/{HISTORY_PREFIX}", _enc.encode(entry), sequential=True, parents=True)
        ]
        parent = history_path(node_id)
        names = self.registry.child_names(parent) if self.registry.exists(parent) else []
        # Keep the newest HISTORY_KEEP, the one being added included.
        for name in names[: max(0, len(names) - HISTORY_KEEP + 1)]:
            ops.append(Delete(f"{parent}/{name}"))
        return ops

    async def write(
        self,
        change: Transition,
        version: int | None,
        labels: dict[str, str] | None = None,
        term: int = 0,
        trace_id: str = "",
    ) -> int | None:
        """Record a transition atomically with its history entry; compare-and-set on the state's version.

        version None means the node must not exist yet (a registration). trace_id: the trace of
        what decided the change, kept in the history entry. Returns the state
        znode's new version (None after a removal). Raises BadVersion / NodeExists / NoNode when
        another writer got there first: the caller re-reads and decides again.
        """
        node_id = change.node_id
        path = state_path(node_id)
        ops: list[MultiOp]
        if change.record is None:
            if version is None:
                raise NoNode(f"no node {path}", path)
            ops = [Check(path, version), Delete(node_path(node_id), recursive=True)]
            await self.registry.multi(ops, term)
            return None
        data = encode_state(change.record)
        if version is None:
            ops = [Create(path, data, parents=True)]
            if labels is not None:
                ops.append(Create(child_path(node_id, "labels"), canonical(labels)))
        else:
            ops = [SetData(path, data, version)]
        ops.extend(self._history_ops(node_id, change, change.record.last_seen, trace_id))
        done = await self.registry.multi(ops, term)
        return _version_of(done)

    async def put(self, node_id: str, name: str, data: bytes) -> bool:
        """Write /fleet/nodes/<id>/<name> when its data differs; only while the node's folder exists.

        Returns True when it wrote.
        """
        path = child_path(node_id, name)
        if not self.registry.exists(state_path(node_id)):
            return False
        current = self.registry.node(path)
        if current is not None and current.data == data:
            return False
        if current is None:
            # The state check keeps a removed node's folder from coming back through a fact.
            await self.registry.multi([Check(state_path(node_id)), Create(path, data)])
        else:
            await self.registry.set(path, data, current.version)
        return True


def _version_of(done: MultiDone) -> int:
    first = done.results[0]
    stat = getattr(first, "stat", None)
    if stat is None:
        raise AssertionError("the first operation of a state write is a create or a set")
    version: int = stat.version
    return version
