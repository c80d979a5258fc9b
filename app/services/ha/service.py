"""HaService: HA's public API (registration, reads, operator commands) and the wiring of its collaborators.

Every replica answers reads from the registry through the catalog (catalog.py, /fleet/clusters, see
layout.py). Only the lease holder probes, analyses and recovers (detector.py, executor.py); its
writes carry its lease term, so a deposed leader's late writes are refused. Recovery follows
recovery.plan_recovery() and records each step in the cluster's history with the trace id it ran
under. Operator commands (rules, downtime, acknowledgement, switchover, manual failover) are served
by any replica.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable

import msgspec

from app.adaptors import registry as adaptor_registry
from app.adaptors.base import Adaptor, AdaptorError
from app.adaptors.types import Address, Credentials, Engine, InstanceStatus
from app.config import HaConfig
from app.services.ha import layout, topology
from app.services.ha.agents import AgentDirectory
from app.services.ha.analysis import (
    FAILOVER_KINDS,
    Analysis,
    NoCandidate,
    analyse,
    choose_candidate,
    position,
    replicas_of,
)
from app.services.ha.catalog import ClusterCatalog
from app.services.ha.credentials import credentials_for, parse_seed
from app.services.ha.detector import Detector, probe_all
from app.services.ha.errors import BadClusterRequest, ClusterExists, DiscoveryFailed, RecoveryRefused
from app.services.ha.executor import RecoveryExecutor
from app.services.ha.layout import ClusterRecord, HistoryEntry, InstanceRecord
from app.services.ha.messages import PromotionRule
from app.services.ha.recovery import Blocked, plan_recovery
from app.services.ha.topology import TopologyTree
from app.services.registry.service import RegistryService
from app.telemetry import tracer

log = logging.getLogger("fleetmate.ha")

# (engine, login, replication login, connect timeout) -> adaptor; app.adaptors.registry.create by default
AdaptorFactory = Callable[[Engine, Credentials, Credentials, float], Adaptor]


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
        adaptors: AdaptorFactory = adaptor_registry.create,
        clock: Callable[[], float] = time.time,
        agents: AgentDirectory | None = None,
    ) -> None:
        self.registry = registry
        self.cfg = cfg
        self.agents = agents
        self.adaptors = adaptors
        self.clock = clock
        self._adaptor_of: dict[str, Adaptor] = {}
        self.catalog = ClusterCatalog(registry, clock)
        self.executor = RecoveryExecutor(self.catalog, cfg, agents, clock)
        self.detector = Detector(self.catalog, self.executor, cfg, self._adaptor)

    @property
    def leading(self) -> bool:
        """Whether this replica holds the lease and probes."""
        return self.detector.leading

    @property
    def analyses(self) -> dict[str, list[Analysis]]:
        """The leader's latest findings per cluster (empty on other replicas)."""
        return self.detector.analyses

    @property
    def recoveries(self) -> int:
        """Recoveries this replica ran."""
        return self.executor.recoveries

    # ---- reads (any replica) ------------------------------------------------------------------

    def names(self) -> list[str]:
        """Registered clusters."""
        return self.catalog.names()

    def record(self, name: str) -> ClusterRecord:
        """A cluster's record; UnknownCluster when none is registered by that name."""
        return self.catalog.record(name)

    def primary(self, name: str) -> str:
        """The recorded writable primary (host:port)."""
        return self.catalog.primary(name)

    def instances(self, name: str) -> list[InstanceRecord]:
        """The recorded instances, by address."""
        return self.catalog.instances(name)

    def history(self, name: str) -> list[HistoryEntry]:
        """The cluster's detections and recovery steps, oldest first."""
        return self.catalog.history(name)

    def view(self, name: str) -> ClusterView:
        """Everything the API shows about a cluster."""
        record = self.record(name)
        return ClusterView(record, self.primary(name), self.instances(name), self.analyses.get(name, []))

    def topology(self, name: str) -> TopologyTree:
        """The cluster as a tree, with the leader's findings."""
        engine = self.record(name).engine
        return topology.build(name, engine, self.primary(name), self.instances(name), self.analyses.get(name, []))

    def _adaptor(self, record: ClusterRecord) -> Adaptor:
        adaptor = self._adaptor_of.get(record.name)
        if adaptor is None:
            login, replication = credentials_for(self.cfg, record.name, record.user, record.database)
            adaptor = self.adaptors(record.engine, login, replication, self.cfg.connect_timeout)
            self._adaptor_of[record.name] = adaptor
        return adaptor

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
            found = await adaptor.discover(seed)
        first = next((s for s in found.instances if s.address == seed), None)
        if first is None or not first.reachable:
            why = first.error if first is not None else "not probed"
            raise DiscoveryFailed(f"cannot reach {seed}: {why}")
        writable = [s for s in found.primaries() if s.read_only is False]
        if not writable:
            raise DiscoveryFailed(f"no writable primary found from {seed}")
        if len(writable) > 1:
            raise DiscoveryFailed(
                f"two writable primaries (split brain): {', '.join(str(s.address) for s in writable)}"
            )
        record = ClusterRecord(name, engine, str(seed), user, database, self.clock())
        what = f"discovered {len(found.instances)} instances from {seed}"
        await self.catalog.create(record, writable[0].address, found.instances, what)
        self._adaptor_of[name] = adaptor
        log.info("cluster registered", extra={"cluster": name, "primary": str(writable[0].address)})
        return self.view(name)

    async def remove(self, name: str) -> None:
        """Forget a cluster (its instances are not touched)."""
        await self.catalog.remove(name)
        self._adaptor_of.pop(name, None)
        self.analyses.pop(name, None)

    # ---- operator settings (any replica, on request) ------------------------------------------

    async def set_rule(self, name: str, address: str, rule: PromotionRule) -> ClusterView:
        """An instance's promotion rule: prefer, neutral (the default) or must_not."""
        member = self.catalog.member(name, address)

        def change(r: ClusterRecord) -> ClusterRecord:
            rules = {k: v for k, v in r.rules.items() if k != member}
            if rule != "neutral":
                rules[member] = rule
            return msgspec.structs.replace(r, rules=rules)

        await self.catalog.update(name, change, f"{member}: promotion rule {rule}")
        return self.view(name)

    async def set_downtime(self, name: str, address: str, seconds: float, reason: str = "") -> ClusterView:
        """Put an instance in downtime for `seconds` (0 ends it): no recovery of it or onto it meanwhile."""
        member = self.catalog.member(name, address)
        until = self.clock() + seconds if seconds > 0 else 0.0

        def change(r: ClusterRecord) -> ClusterRecord:
            downtime = {k: v for k, v in r.downtime.items() if k != member}
            if until:
                downtime[member] = until
            return msgspec.structs.replace(r, downtime=downtime)

        said = f"{member}: downtime for {seconds:g}s" + (f" ({reason})" if reason else "")
        await self.catalog.update(name, change, said if seconds else f"{member}: downtime ended")
        return self.view(name)

    async def acknowledge(self, name: str, reason: str = "") -> ClusterView:
        """Acknowledge the last recovery: the anti-flapping block is lifted."""

        def change(r: ClusterRecord) -> ClusterRecord:
            return msgspec.structs.replace(r, last_recovery_at=None)

        await self.catalog.update(name, change, "recovery acknowledged" + (f": {reason}" if reason else ""))
        return self.view(name)

    # ---- switchover (any replica, on request) --------------------------------------------------

    async def switchover(self, name: str, to: str | None = None) -> ClusterView:
        """Hand the primary role to a replica with nothing lost: the primary goes read-only, the
        candidate catches up to its final position, is promoted, and the rest (old primary
        included) replicate from it."""
        record = self.record(name)
        adaptor = self._adaptor(record)
        note = functools.partial(self.catalog.note, duty=False)  # a request, served by any replica
        old = Address.parse(self.primary(name))
        with tracer().start_as_current_span("ha.switchover", attributes={"ha.cluster": name}):
            probes = await probe_all(adaptor, {old} | {Address.parse(i.address) for i in self.instances(name)})
            if not probes[old].reachable:
                raise BadClusterRequest(f"the primary {old} is unreachable: a switchover needs it (see the analysis)")
            replicas = [s for s in replicas_of(old, probes) if s.reachable]
            target = self._switchover_target(name, record, replicas, to)
            await note(name, "step", f"switchover from {old} to {target} requested", str(target))
            await adaptor.set_read_only(old, True)
            try:
                await self._catch_up(adaptor, old, target)
                await self.executor.unmark_old_primary(name, target)
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
            await self.catalog.publish_switchover(name, old, target, message, mark_old=not in_place)
        return self.view(name)

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
        policy = self.executor.policy(name, record)
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
        target = Address.parse(self.catalog.member(name, to)) if to is not None else None
        with tracer().start_as_current_span("ha.failover", attributes={"ha.cluster": name}):
            known = {Address.parse(i.address) for i in self.instances(name)} | {primary}
            probes = await probe_all(adaptor, known)
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
            auto = self.executor.policy(name, record)
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
            why = await self.executor.recover(name, record, dead, probes, adaptor, policy, duty=False)
            if why is not None:
                raise RecoveryRefused(f"manual failover of {primary} did not run: {why}")
        return self.view(name)

    # ---- the leader ---------------------------------------------------------------------------

    async def lead(self) -> None:
        """Start probing every cluster (this replica holds the lease)."""
        await self.detector.lead()

    async def stop_leading(self) -> None:
        """Stop probing at once (a fence in flight is cancelled; its agent may still finish a rejoin)."""
        await self.detector.stop_leading()

    async def stop(self) -> None:
        """Stop everything."""
        await self.detector.stop_leading()

    async def poll(self, name: str) -> list[Analysis]:
        """Probe every instance of a cluster, record changes, analyse, and recover or fence as needed."""
        return await self.detector.poll(name)
