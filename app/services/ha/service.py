"""HaService: registers clusters, probes them from the leader, and records topology, findings and recoveries.

Every replica answers reads from the registry (/fleet/clusters, see layout.py). Only the lease
holder probes, analyses and recovers; its writes carry its lease term, so a deposed leader's
late writes are refused. Recovery follows recovery.plan_recovery() and records each step in
the cluster's history with the trace id it ran under.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

import msgspec

from app.config import HaConfig
from app.decisions import current_trace_id, decision_span
from app.services.agent.messages import PgRejoinRequest
from app.services.ha import layout, topology
from app.services.ha.adaptor import Adaptor, AdaptorError
from app.services.ha.agents import AgentCallFailed, AgentDirectory
from app.services.ha.analysis import (
    FAILOVER_KINDS,
    Analysis,
    NoCandidate,
    analyse,
    choose_candidate,
    position,
    replicas_of,
)
from app.services.ha.credentials import credentials_for, parse_seed
from app.services.ha.errors import BadClusterRequest, ClusterExists, DiscoveryFailed, RecoveryRefused, UnknownCluster
from app.services.ha.layout import ClusterRecord, HistoryEntry, InstanceRecord
from app.services.ha.messages import Address, Credentials, Engine, InstanceStatus, PromotionRule
from app.services.ha.recovery import Blocked, ClusterPolicy, RecoveryPlan, plan_recovery
from app.services.ha.topology import TopologyTree
from app.services.registry.errors import NodeExists, NoNode, RegistryError
from app.services.registry.messages import Create, Delete, SetData
from app.services.registry.service import MultiOp, RegistryService
from app.supervise import supervisor
from app.telemetry import tracer

log = logging.getLogger("fleetmate.ha")
T = TypeVar("T")

AdaptorFactory = Callable[[Engine, Credentials, Credentials, float], Adaptor]
LOCATE_PATIENCE_S = 15.0  # how long a fence waits for an agent to report the instance's socket
FENCE_RETRY_S = 30.0  # a failed fence of an old primary is tried again after this long
REFRESH_S = 10.0  # an unchanged instance record is rewritten this often (fresh lag and position)

_instance_dec = msgspec.json.Decoder(InstanceRecord)
_cluster_dec = msgspec.json.Decoder(ClusterRecord)
_history_dec = msgspec.json.Decoder(HistoryEntry)


def make_adaptor(engine: Engine, login: Credentials, replication: Credentials, timeout: float) -> Adaptor:
    """The engine's adaptor (imported on first use: a replica without HA clusters never loads them)."""
    if engine == "mysql":
        from app.services.ha.mysql import MySQLAdaptor

        return MySQLAdaptor(login, timeout, replication=replication)
    from app.services.ha.postgresql import PostgresAdaptor

    return PostgresAdaptor(login, timeout, replication=replication)


class ClusterView(msgspec.Struct, frozen=True):
    """A cluster as the API shows it: its record, primary, instances and the leader's latest findings."""

    cluster: ClusterRecord
    primary: str
    instances: list[InstanceRecord]
    analyses: list[Analysis]


class HaService:
    """One replica's HA: registry reads everywhere, probing and recovery on the leader."""

    def __init__(
        self,
        registry: RegistryService,
        cfg: HaConfig,
        adaptors: AdaptorFactory = make_adaptor,
        clock: Callable[[], float] = time.time,
        agents: AgentDirectory | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.agents = agents
        self._fencing: dict[str, asyncio.Task[None]] = {}  # cluster -> the fence running for it
        self._fence_failed_at: dict[tuple[str, str], float] = {}
        self.adaptors = adaptors
        self.clock = clock
        self.leading = False
        self.analyses: dict[str, list[Analysis]] = {}
        self.recoveries = 0
        self._adaptor_of: dict[str, Adaptor] = {}
        self._written_at: dict[tuple[str, str], float] = {}
        self._blocked_said: dict[str, str] = {}
        self._task: asyncio.Task[None] | None = None

    # ---- reads (any replica) ------------------------------------------------------------------

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

    def view(self, name: str) -> ClusterView:
        """Everything the API shows about a cluster."""
        record = self.record(name)
        return ClusterView(record, self.primary(name), self.instances(name), self.analyses.get(name, []))

    def history(self, name: str) -> list[HistoryEntry]:
        """The cluster's detections and recovery steps, oldest first."""
        self.record(name)
        return self._children(layout.history_path(name), _history_dec)

    def _children(self, folder: str, decoder: msgspec.json.Decoder[T]) -> list[T]:
        """The decoded data of a folder's children, in name order."""
        registry = self.registry
        if not registry.exists(folder):
            return []
        nodes = (registry.node(f"{folder}/{child}") for child in registry.child_names(folder))
        return [decoder.decode(node.data or b"") for node in nodes if node is not None]

    # ---- registration (any replica) -----------------------------------------------------------

    async def register(self, name: str, dsn: str) -> ClusterView:
        """Discover a cluster from one instance and record it; the leader keeps probing it from then on."""
        if not layout.NAME_RE.match(name):
            raise BadClusterRequest(f"cluster name {name!r} must be 1-64 letters, digits, '-' or '_'")
        if name in self.names():
            raise ClusterExists(f"cluster {name!r} is already registered")
        engine, seed, user, database = parse_seed(dsn)
        login, replication = credentials_for(self.cfg, name, user, database)
        adaptor = self.adaptors(engine, login, replication, self.cfg.connect_timeout)
        with tracer().start_as_current_span("ha.discover", attributes={"ha.cluster": name, "ha.seed": str(seed)}):
            topology = await adaptor.discover(seed)
        first = next((s for s in topology.instances if s.address == seed), None)
        if first is None or not first.reachable:
            why = first.error if first is not None else "not probed"
            raise DiscoveryFailed(f"cannot reach {seed}: {why}")
        writable = [s for s in topology.primaries() if s.read_only is False]
        if not writable:
            raise DiscoveryFailed(f"no writable primary found from {seed}")
        if len(writable) > 1:
            raise DiscoveryFailed(
                f"two writable primaries (split brain): {', '.join(str(s.address) for s in writable)}"
            )
        now = self.clock()
        record = ClusterRecord(name, engine, str(seed), user, database, now)
        ops: list[MultiOp] = [
            Create(layout.config_path(name), layout.encode(record), parents=True),
            Create(layout.primary_path(name), str(writable[0].address).encode()),
            Create(layout.instances_path(name)),
        ]
        ops.extend(
            Create(layout.instance_path(name, str(s.address)), layout.encode(layout.instance_record(s)))
            for s in topology.instances
        )
        found = f"discovered {len(topology.instances)} instances from {seed}"
        entry = HistoryEntry(now, "registered", found, trace_id=current_trace_id())
        ops.append(self._history_op(name, entry, parents=True))
        try:
            await self.registry.multi(ops)
        except NodeExists:
            raise ClusterExists(f"cluster {name!r} is already registered") from None
        self._adaptor_of[name] = adaptor
        log.info("cluster registered", extra={"cluster": name, "primary": str(writable[0].address)})
        return self.view(name)

    async def remove(self, name: str) -> None:
        """Forget a cluster (its instances are not touched)."""
        self.record(name)
        with contextlib.suppress(NoNode):
            await self.registry.delete(layout.cluster_path(name), recursive=True)
        self._adaptor_of.pop(name, None)
        self.analyses.pop(name, None)

    def _history_op(self, name: str, entry: HistoryEntry, parents: bool = False) -> Create:
        path = f"{layout.history_path(name)}/{layout.HISTORY_PREFIX}"
        return Create(path, layout.encode(entry), sequential=True, parents=parents)

    async def _note(
        self, name: str, kind: layout.HistoryKind, message: str, instance: str = "", *, duty: bool = True
    ) -> None:
        """Record a history entry; duty: a leader's (fenced by its term), else a request's (any replica)."""
        entry = HistoryEntry(self.clock(), kind, message, instance, current_trace_id())
        log.info("ha: %s", message, extra={"cluster": name, "kind": kind, "instance": instance})
        ops: list[MultiOp] = [self._history_op(name, entry)]
        folder = layout.history_path(name)
        names = self.registry.child_names(folder) if self.registry.exists(folder) else []
        ops.extend(Delete(f"{folder}/{old}") for old in names[: max(0, len(names) - layout.HISTORY_KEEP + 1)])
        await self.registry.multi(ops, self._term() if duty else 0)

    def _term(self) -> int:
        """The lease term leader duties write with: refused once a newer leader exists."""
        return self.registry.duty_term

    def _adaptor(self, record: ClusterRecord) -> Adaptor:
        adaptor = self._adaptor_of.get(record.name)
        if adaptor is None:
            login, replication = credentials_for(self.cfg, record.name, record.user, record.database)
            adaptor = self.adaptors(record.engine, login, replication, self.cfg.connect_timeout)
            self._adaptor_of[record.name] = adaptor
        return adaptor

    # ---- operator settings (any replica, on request) ------------------------------------------

    async def _update(self, name: str, change: Callable[[ClusterRecord], ClusterRecord], what: str) -> ClusterView:
        """Compare-and-set the cluster's record (retried when the leader wrote it meanwhile)."""
        for _ in range(5):
            node = self.registry.node(layout.config_path(name))
            record = self.record(name)
            assert node is not None
            updated = change(record)
            kind: layout.HistoryKind = "acknowledged" if "acknowledged" in what else "step"
            entry = HistoryEntry(self.clock(), kind, what, trace_id=current_trace_id())
            ops: list[MultiOp] = [
                SetData(layout.config_path(name), layout.encode(updated), node.version),
                self._history_op(name, entry),
            ]
            try:
                await self.registry.multi(ops)
                return self.view(name)
            except RegistryError:
                await self.registry.sync()
        raise BadClusterRequest(f"cluster {name!r} kept changing; try again")

    def _member(self, name: str, address: str) -> str:
        self.record(name)  # UnknownCluster first
        try:
            parsed = str(Address.parse(address))
        except ValueError as exc:
            raise BadClusterRequest(str(exc)) from None
        if parsed not in {i.address for i in self.instances(name)}:
            raise BadClusterRequest(f"{parsed} is not an instance of cluster {name!r}")
        return parsed

    async def set_rule(self, name: str, address: str, rule: PromotionRule) -> ClusterView:
        """An instance's promotion rule: prefer, neutral (the default) or must_not."""
        member = self._member(name, address)

        def change(r: ClusterRecord) -> ClusterRecord:
            rules = {k: v for k, v in r.rules.items() if k != member}
            if rule != "neutral":
                rules[member] = rule
            return msgspec.structs.replace(r, rules=rules)

        return await self._update(name, change, f"{member}: promotion rule {rule}")

    async def set_downtime(self, name: str, address: str, seconds: float, reason: str = "") -> ClusterView:
        """Put an instance in downtime for `seconds` (0 ends it): no recovery of it or onto it meanwhile."""
        member = self._member(name, address)
        until = self.clock() + seconds if seconds > 0 else 0.0

        def change(r: ClusterRecord) -> ClusterRecord:
            downtime = {k: v for k, v in r.downtime.items() if k != member}
            if until:
                downtime[member] = until
            return msgspec.structs.replace(r, downtime=downtime)

        said = f"{member}: downtime for {seconds:g}s" + (f" ({reason})" if reason else "")
        return await self._update(name, change, said if seconds else f"{member}: downtime ended")

    async def acknowledge(self, name: str, reason: str = "") -> ClusterView:
        """Acknowledge the last recovery: the anti-flapping block is lifted."""

        def change(r: ClusterRecord) -> ClusterRecord:
            return msgspec.structs.replace(r, last_recovery_at=None)

        return await self._update(name, change, "recovery acknowledged" + (f": {reason}" if reason else ""))

    # ---- switchover (any replica, on request) --------------------------------------------------

    async def switchover(self, name: str, to: str | None = None) -> ClusterView:
        """Hand the primary role to a replica with nothing lost: the primary goes read-only, the
        candidate catches up to its final position, is promoted, and the rest (old primary
        included) replicate from it."""
        record = self.record(name)
        adaptor = self._adaptor(record)
        note = functools.partial(self._note, duty=False)  # a request, served by any replica
        old = Address.parse(self.primary(name))
        with tracer().start_as_current_span("ha.switchover", attributes={"ha.cluster": name}):
            probes = await self._probe_all(adaptor, {old} | {Address.parse(i.address) for i in self.instances(name)})
            if not probes[old].reachable:
                raise BadClusterRequest(f"the primary {old} is unreachable: a switchover needs it (see the analysis)")
            replicas = [s for s in replicas_of(old, probes) if s.reachable]
            target = self._switchover_target(name, record, replicas, to)
            await note(name, "step", f"switchover from {old} to {target} requested", str(target))
            await adaptor.set_read_only(old, True)
            try:
                await self._catch_up(adaptor, old, target)
                await self._unmark_old_primary(name, target)
                await adaptor.promote(target, synchronous=probes[old].sync_replication)
            except (AdaptorError, TimeoutError) as exc:
                await adaptor.set_read_only(old, False)
                await note(name, "failed", f"switchover to {target} abandoned, {old} writable again: {exc}")
                raise DiscoveryFailed(f"switchover abandoned: {exc}") from None
            await note(name, "step", f"promoted {target} (switchover)", str(target))
            # A PostgreSQL primary cannot turn into a standby in place: it stays read-only and the
            # leader's fence has the agent on its host rewind and restart it, as after a failover.
            in_place = record.engine != "postgresql"
            for other in [*([old] if in_place else []), *(s.address for s in replicas if s.address != target)]:
                try:
                    await adaptor.repoint(other, target)
                    await note(name, "step", f"{other} replicates from {target}", str(other))
                except AdaptorError as exc:
                    await note(name, "failed", f"repointing {other} failed: {exc}", str(other))
            message = f"primary is now {target} (was {old})" + ("" if in_place else f"; {old} is rejoined as a standby")
            await self._publish_switchover(name, old, target, message, mark_old=not in_place)
        return self.view(name)

    async def _unmark_old_primary(self, name: str, address: Address) -> None:
        """Take an instance about to be promoted off the list of failed primaries to fence, before it
        is promoted: else the leader could see it writable and fence it before the primary key moves."""
        for _ in range(5):
            node = self.registry.node(layout.config_path(name))
            record = self.record(name)
            if node is None or str(address) not in record.old_primaries:
                return
            kept = [a for a in record.old_primaries if a != str(address)]
            updated = layout.encode(msgspec.structs.replace(record, old_primaries=kept))
            try:
                await self.registry.multi([SetData(layout.config_path(name), updated, node.version)])
                return
            except RegistryError:
                await self.registry.sync()
        raise AdaptorError(address, "could not take it off the failed primaries to fence (the record kept changing)")

    async def _publish_switchover(self, name: str, old: Address, target: Address, message: str, mark_old: bool) -> None:
        """Write the new primary (and, mark_old, the old one among those to fence), retrying a
        compare-and-set that the leader's own writes to the record got in the way of."""
        for _ in range(5):
            ops: list[MultiOp] = [SetData(layout.primary_path(name), str(target).encode())]
            if mark_old:
                node = self.registry.node(layout.config_path(name))
                record = self.record(name)
                assert node is not None
                updated = msgspec.structs.replace(record, old_primaries=sorted({*record.old_primaries, str(old)}))
                ops.append(SetData(layout.config_path(name), layout.encode(updated), node.version))
            entry = HistoryEntry(self.clock(), "step", message, str(target), current_trace_id())
            ops.append(self._history_op(name, entry))
            try:
                await self.registry.multi(ops)
                return
            except RegistryError:
                await self.registry.sync()
        raise DiscoveryFailed(f"switchover to {target} done, but recording it kept conflicting; see the history")

    def _switchover_target(
        self, name: str, record: ClusterRecord, replicas: list[InstanceStatus], to: str | None
    ) -> Address:
        if to:
            try:
                target = Address.parse(to)
            except ValueError as exc:
                raise BadClusterRequest(str(exc)) from None
            if target not in {s.address for s in replicas}:
                raise BadClusterRequest(f"{target} is not a reachable replica of the primary of {name}")
            return target
        policy = self._policy(name, record)
        chosen = choose_candidate(replicas, policy.rules, policy.downtime, require_complete=False)
        if isinstance(chosen, NoCandidate):
            raise BadClusterRequest(f"no replica can take over: {chosen.reason}")
        return chosen.address

    async def _catch_up(self, adaptor: Adaptor, old: Address, target: Address) -> None:
        """Wait until target executed everything the (read-only) old primary did."""
        final = position(await adaptor.probe(old))
        if final is None:
            raise TimeoutError(f"cannot read the position of {old}")
        deadline = asyncio.get_running_loop().time() + self.cfg.apply_timeout
        while True:
            have = position(await adaptor.probe(target))
            if have is not None and have.covers(final):
                return
            if asyncio.get_running_loop().time() >= deadline:
                raise TimeoutError(f"{target} did not catch up with {old} within {self.cfg.apply_timeout:g}s")
            await asyncio.sleep(0.05)

    # ---- manual failover (any replica, on request) ---------------------------------------------

    async def failover(self, name: str, to: str | None = None) -> ClusterView:
        """Recover a dead primary on an operator's request, like Orchestrator's manual recover.

        It applies when the analysis says DeadPrimary and automatic recovery would not run
        (ha.auto_recover off, anti-flapping, the primary in downtime, no candidate by the
        rules): the request lifts those, and `to` picks the replica. The no-loss rule stays: a
        replica missing an acknowledged transaction is never promoted.
        """
        record = self.record(name)
        adaptor = self._adaptor(record)
        text = self.primary(name)
        if not text:
            raise BadClusterRequest(f"cluster {name!r} has no recorded primary")
        primary = Address.parse(text)
        target = self._member_address(name, to) if to is not None else None
        with tracer().start_as_current_span("ha.failover", attributes={"ha.cluster": name}):
            known = {Address.parse(i.address) for i in self.instances(name)} | {primary}
            probes = await self._probe_all(adaptor, known)
            found = analyse(primary, probes, self.cfg.lag_threshold, known - {primary})
            dead = next((a for a in found if a.kind in FAILOVER_KINDS), None)
            if dead is None:
                kinds = ", ".join(f"{a.kind} {a.instance}" for a in found) or "none"
                if probes[primary].reachable:
                    raise RecoveryRefused(f"the primary {primary} is up: use a switchover (findings: {kinds})")
                raise RecoveryRefused(
                    f"the primary {primary} is unreachable from here but not dead by the analysis "
                    f"(its replicas still see it; findings: {kinds})"
                )
            auto = self._policy(name, record)
            automatic = plan_recovery(name, dead, probes, auto, self.clock(), record.last_recovery_at)
            if not isinstance(automatic, Blocked):
                # Two recoveries at once would promote two replicas.
                raise RecoveryRefused(
                    f"nothing blocks the automatic recovery of {primary}: the leader runs it (see the history)"
                )
            rules = dict(auto.rules)
            downtime = set(auto.downtime) - {dead.instance}
            if target is not None:
                if target not in {s.address for s in replicas_of(primary, probes) if s.reachable}:
                    raise BadClusterRequest(f"{target} is not a reachable replica of the dead primary {primary}")
                rules = {a: "must_not" for a in probes if a != target}
                rules[target] = "prefer"
                downtime.discard(target)
            policy = msgspec.structs.replace(
                auto, rules=rules, downtime=frozenset(downtime), auto_recover=True, block_seconds=0.0
            )
            why = await self._recover(name, record, dead, probes, adaptor, policy, duty=False)
            if why is not None:
                raise RecoveryRefused(f"manual failover of {primary} did not run: {why}")
        return self.view(name)

    def _member_address(self, name: str, text: str) -> Address:
        return Address.parse(self._member(name, text))

    def topology(self, name: str) -> TopologyTree:
        """The cluster as a tree, with the leader's findings."""
        self.record(name)
        return topology.build(
            name, self.record(name).engine, self.primary(name), self.instances(name), self.analyses.get(name, [])
        )

    # ---- the leader ---------------------------------------------------------------------------

    async def lead(self) -> None:
        """Start probing every cluster (this replica holds the lease)."""
        self.leading = True
        self._task = supervisor.watch(
            asyncio.create_task(self._loop(), name="ha-leader"), "the HA leader loop", may_return=True
        )

    async def stop_leading(self) -> None:
        """Stop probing at once (a fence in flight is cancelled; its agent may still finish a rejoin)."""
        self.leading = False
        tasks = [t for t in (self._task, *self._fencing.values()) if t is not None]
        self._task = None
        self._fencing.clear()
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def stop(self) -> None:
        """Stop everything."""
        await self.stop_leading()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.leading:
            started = loop.time()
            for name in self.names():
                try:
                    await self.poll(name)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ha poll failed", extra={"cluster": name})
            await asyncio.sleep(max(0.0, self.cfg.poll_interval - (loop.time() - started)))

    async def poll(self, name: str) -> list[Analysis]:
        """Probe every instance of a cluster, record changes, analyse, and recover or fence as needed."""
        record = self.record(name)
        adaptor = self._adaptor(record)
        # One detection round, one trace: the findings, a recovery it decides and a fence it starts
        # all carry this round's trace id.
        with decision_span("ha.poll", attributes={"ha.cluster": name}):
            known = {Address.parse(i.address) for i in self.instances(name)}
            primary_text = self.primary(name)
            primary = Address.parse(primary_text) if primary_text else None
            if primary is not None:
                known.add(primary)
            probes = await self._probe_all(adaptor, known)
            await self._record_instances(name, probes)
            if primary is None:
                return []
            found = analyse(primary, probes, self.cfg.lag_threshold, known - {primary})
            await self._note_findings(name, found)
            self.analyses[name] = found
            for finding in found:
                if finding.kind == "DeadPrimary" and self.leading:
                    await self._recover(name, record, finding, probes, adaptor)
            # A failed primary that came back and follows no one (writable, or already set
            # read-only by an earlier fence that could not finish) is fenced until it replicates.
            for old_text in record.old_primaries:
                old = Address.parse(old_text)
                status = probes.get(old)
                if old != primary and status is not None and status.reachable and status.role == "primary":
                    self._start_fence(name, record, old, primary, adaptor, writable=status.read_only is False)
            return found

    async def _probe_all(self, adaptor: Adaptor, known: set[Address]) -> dict[Address, InstanceStatus]:
        probes: dict[Address, InstanceStatus] = {}
        todo = set(known)
        while todo and len(probes) < 100:
            batch = sorted(todo)
            for status in await asyncio.gather(*(adaptor.probe(a) for a in batch)):
                probes[status.address] = status
            # Instances that appeared (a new replica, a source outside the cluster) are probed too.
            seen = {r for s in probes.values() for r in s.replicas}
            seen |= {s.replication.source for s in probes.values() if s.replication and s.replication.source}
            todo = seen - probes.keys()
        return probes

    async def _record_instances(self, name: str, probes: dict[Address, InstanceStatus]) -> None:
        now = self.clock()
        ops: list[MultiOp] = []
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
            await self.registry.multi(ops, self._term())

    async def _note_findings(self, name: str, found: list[Analysis]) -> None:
        before = {(a.kind, a.instance) for a in self.analyses.get(name, [])}
        for finding in found:
            if (finding.kind, finding.instance) not in before:
                await self._note(name, "analysis", f"{finding.kind}: {finding.detail}", str(finding.instance))
        for kind, instance in before - {(a.kind, a.instance) for a in found}:
            await self._note(name, "analysis", f"{kind} cleared", str(instance))

    # ---- recovery -----------------------------------------------------------------------------

    def _policy(self, name: str, record: ClusterRecord) -> ClusterPolicy:
        now = self.clock()
        recorded = {i.address: i for i in self.instances(name)}
        primary = recorded.get(self.primary(name))
        auto = self.cfg.auto_recover if record.auto_recover is None else record.auto_recover
        return ClusterPolicy(
            rules={Address.parse(a): rule for a, rule in record.rules.items()},
            downtime=frozenset(Address.parse(a) for a, until in record.downtime.items() if until > now),
            require_complete=primary is not None and primary.sync_replication,
            block_seconds=self.cfg.recovery_block_seconds,
            auto_recover=auto,
        )

    async def _recover(
        self,
        name: str,
        record: ClusterRecord,
        finding: Analysis,
        probes: dict[Address, InstanceStatus],
        adaptor: Adaptor,
        policy: ClusterPolicy | None = None,
        duty: bool = True,
    ) -> str | None:
        """Plan and run the recovery of a dead primary; the reason it was blocked or failed, None when done.

        duty: the leader's automatic recovery (its writes fenced by its term); False for an
        operator's manual failover, served by any replica with `policy` relaxed by the request.
        """
        note = functools.partial(self._note, duty=duty)
        with tracer().start_as_current_span("ha.recover", attributes={"ha.cluster": name, "ha.manual": not duty}):
            policy = policy or self._policy(name, record)
            plan = plan_recovery(name, finding, probes, policy, self.clock(), record.last_recovery_at)
            if isinstance(plan, Blocked):
                if self._blocked_said.get(name) != plan.reason:
                    self._blocked_said[name] = plan.reason
                    await note(name, "blocked", plan.reason, str(finding.instance))
                return plan.reason
            self._blocked_said.pop(name, None)
            what = "recovering dead primary" if duty else "manual failover of dead primary"
            await note(name, "recovery", f"{what} {finding.instance}", str(finding.instance))
            waiting = [s.instance for s in plan.steps if s.kind == "wait_applied"]
            results = await asyncio.gather(
                *(adaptor.wait_applied(a, self.cfg.apply_timeout) for a in waiting), return_exceptions=True
            )
            applied = set()
            for address, result in zip(waiting, results, strict=True):
                if isinstance(result, InstanceStatus):
                    probes[address] = result
                    applied.add(address)
                else:
                    await note(name, "failed", f"{address} did not apply its backlog: {result}", str(address))
                    probes[address] = await adaptor.probe(address)
            final = plan_recovery(name, finding, probes, policy, self.clock(), record.last_recovery_at, applied)
            if isinstance(final, Blocked):
                await note(name, "blocked", final.reason, str(finding.instance))
                return final.reason
            return await self._execute(name, record, final, adaptor, duty)

    async def _execute(
        self, name: str, record: ClusterRecord, plan: RecoveryPlan, adaptor: Adaptor, duty: bool = True
    ) -> str | None:
        note = functools.partial(self._note, duty=duty)
        old, new = plan.failed_primary, plan.candidate
        if not await self._hook(name, "pre_failover", self.cfg.pre_failover_hook, old, new, duty):
            return "the pre-failover hook failed"
        try:
            await self._unmark_old_primary(name, new)
            await adaptor.promote(new, synchronous=plan.synchronous)
        except AdaptorError as exc:
            await note(name, "failed", f"promoting {new} failed: {exc}", str(new))
            return f"promoting {new} failed: {exc}"
        await note(name, "step", f"promoted {new} ({plan.reason})", str(new))
        for step in plan.steps:
            if step.kind != "repoint":
                continue
            try:
                await adaptor.repoint(step.instance, new)
                await note(name, "step", f"{step.instance} replicates from {new}", str(step.instance))
            except AdaptorError as exc:
                await note(name, "failed", f"repointing {step.instance} failed: {exc}", str(step.instance))
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
                self._history_op(name, entry),
            ],
            self._term() if duty else 0,
        )
        self.recoveries += 1
        log.warning("failover done", extra={"cluster": name, "old_primary": str(old), "new_primary": str(new)})
        await self._hook(name, "post_failover", self.cfg.post_failover_hook, old, new, duty)
        return None

    def _start_fence(
        self, name: str, record: ClusterRecord, old: Address, primary: Address, adaptor: Adaptor, writable: bool
    ) -> None:
        """Fence a returning old primary in the background (a PostgreSQL rejoin takes a while);
        one fence per cluster at a time, and a failed one is retried after FENCE_RETRY_S."""
        running = self._fencing.get(name)
        if running is not None and not running.done():
            return
        failed_at = self._fence_failed_at.get((name, str(old)))
        if failed_at is not None and self.clock() - failed_at < FENCE_RETRY_S:
            return
        self._fencing[name] = asyncio.create_task(
            self._fence(name, record, old, primary, adaptor, writable), name="ha-fence"
        )

    async def _fence(
        self, name: str, record: ClusterRecord, old: Address, primary: Address, adaptor: Adaptor, writable: bool
    ) -> None:
        """A failed primary came back writable: make it read-only, then a replica of the current primary
        (PostgreSQL: rewound into a standby by the agent on its host, when ha.rejoin is on)."""
        try:
            if str(old) not in self.record(name).old_primaries or self.primary(name) == str(old):
                return  # promoted again meanwhile (a switchover or failover onto it): nothing to fence
        except UnknownCluster:
            return  # forgotten meanwhile
        try:
            if writable:
                await adaptor.set_read_only(old, True)
                await self._note(name, "fenced", f"{old} came back writable: set read-only", str(old))
            if record.engine == "postgresql":
                if not self.cfg.rejoin:
                    if writable:
                        await self._note(name, "fenced", f"{old} left read-only (ha.rejoin is off)", str(old))
                    return
                await self._rejoin(name, record, old, primary)
            else:
                await adaptor.repoint(old, primary)
                await self._note(name, "fenced", f"{old} replicates from {primary}", str(old))
            self._fence_failed_at.pop((name, str(old)), None)
        except (AdaptorError, AgentCallFailed) as exc:
            self._fence_failed_at[(name, str(old))] = self.clock()
            with contextlib.suppress(RegistryError):
                await self._note(name, "failed", f"fencing {old} is incomplete: {exc}", str(old))

    async def _locate_agent(self, address: Address, patience: float = LOCATE_PATIENCE_S) -> str:
        """The agent running address; waits a little, since an instance that just started shows up
        in its agent's facts only at the agent's next heartbeat."""
        assert self.agents is not None
        deadline = asyncio.get_running_loop().time() + patience
        while True:
            try:
                return self.agents.locate(address)
            except AgentCallFailed:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            await asyncio.sleep(0.5)

    async def _rejoin(self, name: str, record: ClusterRecord, old: Address, primary: Address) -> None:
        """Ask the agent on the old primary's host to pg_rewind it into a standby of primary."""
        if self.agents is None:
            raise AgentCallFailed("no agent directory: cannot rejoin")
        node = await self._locate_agent(old)
        login, replication = credentials_for(self.cfg, record.name, record.user, record.database)
        request = PgRejoinRequest(
            address=str(old),
            port=old.port,
            source=str(primary),
            user=login.user,
            password=login.password,
            database=login.database or "postgres",
            replication_user=replication.user,
            replication_password=replication.password,
            connect_timeout=self.cfg.connect_timeout,
            timeout=self.cfg.rejoin_timeout,
        )
        await self._note(name, "fenced", f"{old}: agent {node} rewinds it into a standby of {primary}", str(old))
        report = await self.agents.pg_rejoin(node, request)
        await self._note(
            name,
            "fenced",
            f"{old} rejoined as a standby of {primary} (pg_rewind by agent {node}, {report.seconds:.1f} s)",
            str(old),
        )

    async def _hook(self, name: str, which: str, command: str, old: Address, new: Address, duty: bool = True) -> bool:
        """Run a failover hook; False when a pre-failover hook failed (the failover stops)."""
        if not command:
            return True
        env: dict[str, Any] = {
            **os.environ,
            "FLEETMATE_HA_CLUSTER": name,
            "FLEETMATE_HA_OLD_PRIMARY": str(old),
            "FLEETMATE_HA_NEW_PRIMARY": str(new),
        }
        try:
            proc = await asyncio.create_subprocess_shell(
                command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), self.cfg.hook_timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RuntimeError(f"timed out after {self.cfg.hook_timeout:g}s") from None
            if proc.returncode != 0:
                tail = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"exit code {proc.returncode}: {tail[0]}")
        except (OSError, RuntimeError) as exc:
            await self._note(name, "failed", f"{which} hook failed: {exc}", duty=duty)
            return which != "pre_failover"
        await self._note(name, "step", f"{which} hook ran", duty=duty)
        return True
