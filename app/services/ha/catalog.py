"""ClusterCatalog: HA's clusters in the registry (/fleet/clusters, see layout.py), read and written here only.

Reads come from the local replica's applied state. A write made as a leader duty carries the
lease term (the registry refuses it once a newer leader exists); a write made on an operator's
request carries none (any replica serves it). Every history entry carries the trace id it was
written under.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Mapping
from typing import TypeVar

import msgspec

from app.adaptors.types import Address, InstanceStatus
from app.decisions import current_trace_id
from app.services.ha import layout
from app.services.ha.errors import BadClusterRequest, ClusterExists, DiscoveryFailed, UnknownCluster
from app.services.ha.layout import ClusterRecord, HistoryEntry, InstanceRecord
from app.services.registry.errors import NodeExists, NoNode, RegistryError
from app.services.registry.messages import Create, Delete, SetData
from app.services.registry.service import RegistryService

log = logging.getLogger("fleetmate.ha")
T = TypeVar("T")
Op = Create | SetData | Delete

REFRESH_S = 10.0  # an unchanged instance record is rewritten this often (fresh lag and position)

_instance_dec = msgspec.json.Decoder(InstanceRecord)
_cluster_dec = msgspec.json.Decoder(ClusterRecord)
_history_dec = msgspec.json.Decoder(HistoryEntry)


class ClusterCatalog:
    """The registered clusters: their records, primaries, instances and histories."""

    def __init__(self, registry: RegistryService, clock: Callable[[], float]) -> None:
        self.registry = registry
        self.clock = clock
        self._written_at: dict[tuple[str, str], float] = {}

    # ---- reads ----------------------------------------------------------------------------------

    def names(self) -> list[str]:
        """Registered clusters."""
        registry = self.registry
        return registry.child_names(layout.ROOT) if registry.exists(layout.ROOT) else []

    def record(self, name: str) -> ClusterRecord:
        """A cluster's record; UnknownCluster when none is registered by that name."""
        node = self.registry.node(layout.config_path(name)) if layout.NAME_RE.match(name) else None
        if node is None:
            raise UnknownCluster(f"no cluster {name!r} is registered")
        return _cluster_dec.decode(node.data or b"")

    def primary(self, name: str) -> str:
        """The recorded writable primary (host:port)."""
        node = self.registry.node(layout.primary_path(name))
        return (node.data or b"").decode() if node is not None else ""

    def instances(self, name: str) -> list[InstanceRecord]:
        """The recorded instances, by address."""
        return self._children(layout.instances_path(name), _instance_dec)

    def history(self, name: str) -> list[HistoryEntry]:
        """The cluster's detections and recovery steps, oldest first."""
        self.record(name)
        return self._children(layout.history_path(name), _history_dec)

    def member(self, name: str, address: str) -> str:
        """address as the `host:port` of one of the cluster's instances; BadClusterRequest otherwise."""
        self.record(name)  # UnknownCluster first
        try:
            parsed = str(Address.parse(address))
        except ValueError as exc:
            raise BadClusterRequest(str(exc)) from None
        if parsed not in {i.address for i in self.instances(name)}:
            raise BadClusterRequest(f"{parsed} is not an instance of cluster {name!r}")
        return parsed

    def _children(self, folder: str, decoder: msgspec.json.Decoder[T]) -> list[T]:
        """The decoded data of a folder's children, in name order."""
        registry = self.registry
        if not registry.exists(folder):
            return []
        nodes = (registry.node(f"{folder}/{child}") for child in registry.child_names(folder))
        return [decoder.decode(node.data or b"") for node in nodes if node is not None]

    # ---- writes on request (any replica) -------------------------------------------------------

    async def create(self, record: ClusterRecord, primary: Address, found: Iterable[InstanceStatus], what: str) -> None:
        """Record a newly discovered cluster in one transaction; ClusterExists when the name is taken."""
        name = record.name
        ops: list[Op] = [
            Create(layout.config_path(name), layout.encode(record), parents=True),
            Create(layout.primary_path(name), str(primary).encode()),
            Create(layout.instances_path(name)),
        ]
        ops.extend(
            Create(layout.instance_path(name, str(s.address)), layout.encode(layout.instance_record(s))) for s in found
        )
        entry = HistoryEntry(record.created_at, "registered", what, trace_id=current_trace_id())
        ops.append(self.history_op(name, entry, parents=True))
        try:
            await self.registry.multi(ops)
        except NodeExists:
            raise ClusterExists(f"cluster {name!r} is already registered") from None

    async def remove(self, name: str) -> None:
        """Forget a cluster's records (its instances are not touched)."""
        self.record(name)
        with contextlib.suppress(NoNode):
            await self.registry.delete(layout.cluster_path(name), recursive=True)

    async def update(self, name: str, change: Callable[[ClusterRecord], ClusterRecord], what: str) -> None:
        """Compare-and-set the cluster's record (retried when the leader wrote it meanwhile)."""
        for _ in range(5):
            node = self.registry.node(layout.config_path(name))
            record = self.record(name)
            assert node is not None
            updated = change(record)
            kind: layout.HistoryKind = "acknowledged" if "acknowledged" in what else "step"
            entry = HistoryEntry(self.clock(), kind, what, trace_id=current_trace_id())
            ops: list[Op] = [
                SetData(layout.config_path(name), layout.encode(updated), node.version),
                self.history_op(name, entry),
            ]
            try:
                await self.registry.multi(ops)
                return
            except RegistryError:
                await self.registry.sync()
        raise BadClusterRequest(f"cluster {name!r} kept changing; try again")

    async def unmark_old_primary(self, name: str, address: Address) -> bool:
        """Take an instance off the list of failed primaries to fence; False when the record kept changing."""
        for _ in range(5):
            node = self.registry.node(layout.config_path(name))
            record = self.record(name)
            if node is None or str(address) not in record.old_primaries:
                return True
            kept = [a for a in record.old_primaries if a != str(address)]
            updated = layout.encode(msgspec.structs.replace(record, old_primaries=kept))
            try:
                await self.registry.multi([SetData(layout.config_path(name), updated, node.version)])
                return True
            except RegistryError:
                await self.registry.sync()
        return False

    async def publish_switchover(self, name: str, old: Address, target: Address, message: str, mark_old: bool) -> None:
        """Write the new primary (and, mark_old, the old one among those to fence), retrying a
        compare-and-set that the leader's own writes to the record got in the way of."""
        for _ in range(5):
            ops: list[Op] = [SetData(layout.primary_path(name), str(target).encode())]
            if mark_old:
                node = self.registry.node(layout.config_path(name))
                record = self.record(name)
                assert node is not None
                updated = msgspec.structs.replace(record, old_primaries=sorted({*record.old_primaries, str(old)}))
                ops.append(SetData(layout.config_path(name), layout.encode(updated), node.version))
            entry = HistoryEntry(self.clock(), "step", message, str(target), current_trace_id())
            ops.append(self.history_op(name, entry))
            try:
                await self.registry.multi(ops)
                return
            except RegistryError:
                await self.registry.sync()
        raise DiscoveryFailed(f"switchover to {target} done, but recording it kept conflicting; see the history")

    # ---- writes by the leader (or a manual failover: duty False) --------------------------------

    def term(self) -> int:
        """The lease term leader duties write with: refused once a newer leader exists."""
        return self.registry.duty_term

    def history_op(self, name: str, entry: HistoryEntry, parents: bool = False) -> Create:
        """The write that appends entry to the cluster's history."""
        path = f"{layout.history_path(name)}/{layout.HISTORY_PREFIX}"
        return Create(path, layout.encode(entry), sequential=True, parents=parents)

    async def note(
        self, name: str, kind: layout.HistoryKind, message: str, instance: str = "", *, duty: bool = True
    ) -> None:
        """Record a history entry; duty: a leader's (fenced by its term), else a request's (any replica)."""
        entry = HistoryEntry(self.clock(), kind, message, instance, current_trace_id())
        log.info("ha: %s", message, extra={"cluster": name, "kind": kind, "instance": instance})
        ops: list[Op] = [self.history_op(name, entry)]
        folder = layout.history_path(name)
        names = self.registry.child_names(folder) if self.registry.exists(folder) else []
        ops.extend(Delete(f"{folder}/{old}") for old in names[: max(0, len(names) - layout.HISTORY_KEEP + 1)])
        await self.registry.multi(ops, self.term() if duty else 0)

    async def record_instances(self, name: str, probes: Mapping[Address, InstanceStatus]) -> None:
        """Write the instances whose record changed shape, and the others every REFRESH_S (a leader duty)."""
        now = self.clock()
        ops: list[Op] = []
        for address, status in probes.items():
            path = layout.instance_path(name, str(address))
            node = self.registry.node(path)
            if node is None:
                ops.append(Create(path, layout.encode(layout.instance_record(status))))
                self._written_at[(name, str(address))] = now
                continue
            old = _instance_dec.decode(node.data or b"")
            new = layout.instance_record(status, old)
            stale = now - self._written_at.get((name, str(address)), 0.0) >= REFRESH_S
            if not layout.same_shape(old, new) or stale:
                ops.append(SetData(path, layout.encode(new)))
                self._written_at[(name, str(address))] = now
        if ops:
            await self.registry.multi(ops, self.term())

    async def publish_failover(self, name: str, old: Address, new: Address, duty: bool) -> None:
        """Record a recovery's outcome: new primary, the old one to fence, the anti-flapping time."""
        now = self.clock()
        current = self.record(name)  # fresh: an operator may have changed rules or downtime meanwhile
        updated = msgspec.structs.replace(
            current, last_recovery_at=now, old_primaries=sorted({*current.old_primaries, str(old)} - {str(new)})
        )
        entry = HistoryEntry(now, "step", f"primary is now {new} (was {old})", str(new), current_trace_id())
        await self.registry.multi(
            [
                SetData(layout.primary_path(name), str(new).encode()),
                SetData(layout.config_path(name), layout.encode(updated)),
                self.history_op(name, entry),
            ],
            self.term() if duty else 0,
        )
