"""The leader's judge: rebuilds node states from the registry, judges silence on a tick, records each change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from app.decisions import decision_span
from app.services.membership import records as layout
from app.services.membership.heard import Heard, with_heard
from app.services.membership.records import Records, canonical
from app.services.membership.state import Heartbeat, Membership, Tick, Timings, Transition
from app.services.registry.errors import OperationTimeout, RegistryError
from app.services.registry.service import RegistryService
from app.supervise import supervisor

log = logging.getLogger("fleetmate.membership")

MAX_TICK_S = 1.0


class Judge:
    """Runs the state machine (state.py) on the lease holder and writes its changes with compare-and-set."""

    def __init__(self, registry: RegistryService, records: Records, timings: Timings, heard: dict[str, Heard]) -> None:
        self.registry = registry
        self.records = records
        self.timings = timings
        self.heard = heard
        self.machine = Membership(timings)
        self.leading = False
        self.written = 0  # state changes this judge recorded
        self._versions: dict[str, int] = {}
        self._pending: list[Transition] = []
        self._dirty: set[str] = set()  # nodes whose labels or facts may need writing
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def tick_s(self) -> float:
        """How often the leader judges silence."""
        return min(MAX_TICK_S, self.timings.heartbeat_interval / 2)

    # ---- what the ears tell it (Listener) ----------------------------------------------------

    def heard_heartbeat(self, node_id: str, at: float, kind: str, labels: dict[str, str]) -> None:
        """Feed a heartbeat to the machine; note labels that differ from the recorded ones."""
        self._pending.extend(self.machine.apply(Heartbeat(node_id, at, kind)))
        if self.records.data(node_id, "labels") != canonical(labels):
            self._dirty.add(node_id)
        self._wake.set()

    def heard_facts(self, node_id: str) -> None:
        """New facts: write them in the next round."""
        self._dirty.add(node_id)
        self._wake.set()

    # ---- leading -----------------------------------------------------------------------------

    async def lead(self) -> None:
        """Take over: rebuild the view from /fleet/nodes (with a grace period) and start judging."""
        await self.registry.sync()
        now = time.time()
        stored = self.records.read_all()
        restored = [with_heard(self.heard, record) for record, _ in stored.values()]
        self.machine.restore(restored, now)
        self._versions = {node_id: version for node_id, (_, version) in stored.items()}
        self._pending = []
        self.leading = True
        for node_id, heard in self.heard.items():
            if node_id not in stored and now - heard.at < self.timings.suspect_s:
                self._pending.extend(self.machine.apply(Heartbeat(node_id, heard.at, heard.kind)))
        self._dirty = set(self.heard)
        self._task = supervisor.watch(
            asyncio.create_task(self._loop(), name="membership-leader"), "the membership leader loop"
        )
        log.info("judging node states", extra={"nodes": len(stored), "grace_s": self.timings.suspect_s})

    async def stop(self) -> None:
        """The lease is gone: stop judging at once."""
        self.leading = False
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._pending = []
        self._versions = {}

    async def _loop(self) -> None:
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
                self.machine.adopt(with_heard(self.heard, record))
                self._drop_pending(node_id)

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
                self.machine.adopt(with_heard(self.heard, found[0]))
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
