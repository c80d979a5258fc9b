"""Detector: the HA leader's loop. Every poll_interval it probes each cluster's instances, records what
changed, analyses the probes, notes new and cleared findings, and hands a dead primary to the recovery
executor and a returning old primary to its fence. One poll of one cluster is one trace.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from app.adaptors.base import Adaptor
from app.adaptors.types import Address, InstanceStatus
from app.config import HaConfig
from app.decisions import decision_span
from app.services.ha.analysis import Analysis, analyse
from app.services.ha.catalog import ClusterCatalog
from app.services.ha.executor import RecoveryExecutor
from app.services.ha.layout import ClusterRecord
from app.supervise import supervisor

log = logging.getLogger("fleetmate.ha")


async def probe_all(adaptor: Adaptor, known: Iterable[Address], limit: int = 100) -> dict[Address, InstanceStatus]:
    """Probe known instances at once, then any instance they name (a new replica, an outside source)."""
    probes: dict[Address, InstanceStatus] = {}
    todo = set(known)
    while todo and len(probes) < limit:
        batch = sorted(todo)
        for status in await asyncio.gather(*(adaptor.probe(a) for a in batch)):
            probes[status.address] = status
        seen = {r for s in probes.values() for r in s.replicas}
        seen |= {s.replication.source for s in probes.values() if s.replication and s.replication.source}
        todo = seen - probes.keys()
    return probes


class Detector:
    """Probing and analysis of every cluster, on the replica that holds the lease."""

    def __init__(
        self,
        catalog: ClusterCatalog,
        executor: RecoveryExecutor,
        cfg: HaConfig,
        adaptor_for: Callable[[ClusterRecord], Adaptor],
    ) -> None:
        self.catalog = catalog
        self.executor = executor
        self.cfg = cfg
        self.adaptor_for = adaptor_for
        self.leading = False
        self.analyses: dict[str, list[Analysis]] = {}  # cluster -> the latest findings
        self._task: asyncio.Task[None] | None = None

    async def lead(self) -> None:
        """Start probing every cluster (this replica holds the lease)."""
        self.leading = True
        self._task = supervisor.watch(
            asyncio.create_task(self._loop(), name="ha-leader"), "the HA leader loop", may_return=True
        )

    async def stop_leading(self) -> None:
        """Stop probing at once (a fence in flight is cancelled; its agent may still finish a rejoin)."""
        self.leading = False
        tasks = [t for t in (self._task, *self.executor.fences()) if t is not None]
        self._task = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        while self.leading:
            started = loop.time()
            for name in self.catalog.names():
                try:
                    await self.poll(name)
                except asyncio.CancelledError:
                    raise
                except Exception:
                    log.exception("ha poll failed", extra={"cluster": name})
            await asyncio.sleep(max(0.0, self.cfg.poll_interval - (loop.time() - started)))

    async def poll(self, name: str) -> list[Analysis]:
        """Probe every instance of a cluster, record changes, analyse, and recover or fence as needed."""
        catalog = self.catalog
        record = catalog.record(name)
        adaptor = self.adaptor_for(record)
        # One detection round, one trace: the findings, a recovery it decides and a fence it starts
        # all carry this round's trace id.
        with decision_span("ha.poll", attributes={"ha.cluster": name}):
            known = {Address.parse(i.address) for i in catalog.instances(name)}
            primary_text = catalog.primary(name)
            primary = Address.parse(primary_text) if primary_text else None
            if primary is not None:
                known.add(primary)
            probes = await probe_all(adaptor, known)
            await catalog.record_instances(name, probes)
            if primary is None:
                return []
            found = analyse(primary, probes, self.cfg.lag_threshold, known - {primary})
            await self._note_findings(name, found)
            self.analyses[name] = found
            for finding in found:
                if finding.kind == "DeadPrimary" and self.leading:
                    await self.executor.recover(name, record, finding, probes, adaptor)
            # A failed primary that came back and follows no one (writable, or already set
            # read-only by an earlier fence that could not finish) is fenced until it replicates.
            for old_text in record.old_primaries:
                old = Address.parse(old_text)
                status = probes.get(old)
                if old != primary and status is not None and status.reachable and status.role == "primary":
                    self.executor.start_fence(name, record, old, primary, adaptor, writable=status.read_only is False)
            return found

    async def _note_findings(self, name: str, found: list[Analysis]) -> None:
        before = {(a.kind, a.instance) for a in self.analyses.get(name, [])}
        for finding in found:
            if (finding.kind, finding.instance) not in before:
                await self.catalog.note(name, "analysis", f"{finding.kind}: {finding.detail}", str(finding.instance))
        for kind, instance in before - {(a.kind, a.instance) for a in found}:
            await self.catalog.note(name, "analysis", f"{kind} cleared", str(instance))
