"""This replica as a data node of the scheduler's "kv" cluster: it holds, copies, splits and drops shards as assigned.

The scheduler's table says which replicas hold which shards at which scheduler epoch; the
partitions' logs hold the data. The holder brings the local copies in line with the assignment
(read from this replica's applied scheduler state, woken on every change) and acknowledges each
shard once its copy matches: a new shard is created by a Create entry its leader appends; a shard
another replica holds already is copied from it; a split or merge the scheduler decided is appended
by the shard's leader as one entry, which every holder applies at the same position.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import socket
import time
from typing import TYPE_CHECKING, Any

import msgspec

from app.config import KvConfig
from app.services.kv.messages import Create, Expire, Merge, Split
from app.services.kv.transfer import TransferFailed, fetch
from app.services.scheduler.errors import NoSuchCluster, SchedulerError
from app.services.scheduler.messages import NodeSpec, Operator
from app.services.scheduler.protocol import SUBJECT_HEARTBEAT, Ack, Assigned, Assignment, Heartbeat, ShardLoad
from app.services.scheduler.service import SchedulerService
from app.supervise import supervisor

if TYPE_CHECKING:
    from app.services.kv.service import KvService, Partition

log = logging.getLogger("fleetmate.kv")

CLUSTER = "kv"
CONVERGE_EVERY_S = 0.5
SPLIT_RETRY_S = 5.0  # a split proposed and not done is proposed again after this
_json = msgspec.json.Encoder()


class Holder:
    """Keeps this replica's shard copies in line with the scheduler's assignment (see the module docstring)."""

    def __init__(self, kv: KvService, scheduler: SchedulerService, cfg: KvConfig, address: str) -> None:
        self.kv = kv
        self.scheduler = scheduler
        self.cfg = cfg
        self.node_id = kv.node_id
        self.address = address
        self.assignment: Assignment | None = None
        self.roles: dict[int, str] = {}
        self._acked: dict[int, int] = {}
        self._proposed: dict[int, float] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._writes: dict[int, tuple[float, int]] = {}
        self.rates: dict[int, float] = {}
        self.imports = 0
        self.import_failures = 0

    async def start(self) -> None:
        """Join the cluster and start converging and heartbeating."""
        await self.register()
        self.scheduler.changes.listeners.append(self._on_scheduler_events)
        self._tasks = [
            supervisor.watch(asyncio.create_task(self._converge_loop(), name="kv-holder"), "the KV holder"),
            supervisor.watch(asyncio.create_task(self._heartbeat_loop(), name="kv-heartbeat"), "the KV heartbeat"),
        ]

    async def stop(self) -> None:
        """Stop converging and heartbeating (the scheduler sees this replica's lease run out)."""
        with contextlib.suppress(ValueError):
            self.scheduler.changes.listeners.remove(self._on_scheduler_events)
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []

    async def register(self) -> None:
        """Register (again) with the kv cluster: a replica that comes back is online again."""
        labels = {"host": socket.gethostname()}
        spec = NodeSpec(self.node_id, self.address, labels, 0, self.cfg.node_lease)
        await self.scheduler.register(CLUSTER, spec)

    def wake(self) -> None:
        """Converge soon (a shard passed its capacity, the assignment changed)."""
        self._wake.set()

    def _on_scheduler_events(self, events: list[Any]) -> None:
        if any(getattr(e, "cluster", "") == CLUSTER for e in events):
            self._wake.set()

    async def _converge_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CONVERGE_EVERY_S):
                    await self._wake.wait()
            self._wake.clear()
            try:
                await self.converge()
            except Exception:
                log.exception("converging the shard copies failed; trying again")
                await asyncio.sleep(CONVERGE_EVERY_S)

    # ---- converge -----------------------------------------------------------------------------

    async def converge(self) -> None:
        """One pass: open, copy, split, merge and drop to match the assignment; acknowledge what matches."""
        try:
            a = self.scheduler.assignment(CLUSTER, self.node_id)
        except NoSuchCluster:
            return
        if a.state in ("unknown", "removed"):
            if a.state == "unknown":
                await self.register()
            return
        self.assignment = a
        self.roles = {s.id: s.role for s in a.shards}
        assigned = {s.id: s for s in a.shards}
        for s in a.shards:
            await self._converge_shard(s, assigned)
        for sid in a.drop:
            if not self._merging(sid, a):
                await self._drop(sid)
        await self._split_big()
        await self._merge_small()
        await self._expire_due()

    async def _converge_shard(self, s: Assigned, assigned: dict[int, Assigned]) -> None:
        part = self.kv.partition(s.group)
        if part is None:
            return
        state = part.state
        held = state.held.get(s.id)
        if held is not None:
            if (held.start, held.end) == (s.start, s.end):
                await self._ack(s.id, s.epoch)
            elif s.role == "leader":
                await self._reshape(part, s, assigned)
            return
        covering = state.locate(s.start)
        if covering is not None:
            return  # the shard it splits off has not been split here yet
        if s.id in state.created or self._opened_elsewhere(s.id):
            await self._copy(part, s)
        elif state.want(s.id) and s.role == "leader":  # a new shard: its leader creates it in the log
            await self._append(part, Create(s.id, s.start, s.end, int(time.time() * 1000)))

    async def _reshape(self, part: Partition, s: Assigned, assigned: dict[int, Assigned]) -> None:
        """The scheduler split or merged a shard this replica leads: append the entry that does it to the data."""
        held = part.state.held[s.id]
        if s.end and (not held.end or s.end < held.end):
            child = next((c for c in assigned.values() if c.start == s.end and c.group == s.group), None)
            if child is not None:
                await self._append(part, Split(s.id, held.epoch, s.end, child.id, int(time.time() * 1000)))
        elif held.end and (not s.end or held.end < s.end):
            other = part.state.locate(held.end)
            if other is not None and other.start == held.end:
                await self._append(part, Merge(s.id, held.epoch, other.id, other.epoch, int(time.time() * 1000)))

    def _opened_elsewhere(self, shard: int) -> bool:
        try:
            view = self.scheduler.shard(CLUSTER, shard)
        except SchedulerError:
            return False
        return any(r.acked >= 1 and r.node != self.node_id for r in view.replicas)

    def _sources(self, shard: int) -> list[str]:
        try:
            view = self.scheduler.shard(CLUSTER, shard)
        except SchedulerError:
            return []
        live = [r for r in view.replicas if r.node != self.node_id and r.acked >= 1]
        return [r.node for r in sorted(live, key=lambda r: (r.role != "leader", -r.acked))]

    async def _copy(self, part: Partition, s: Assigned) -> None:
        state = part.state
        sources = self._sources(s.id)
        if not sources:
            return
        state.begin_import()
        try:
            for source in sources:
                try:
                    copy = await fetch(self.kv.bus, source, s.group, s.id, part.log.applied_seq)
                except TransferFailed as exc:
                    log.warning("shard copy failed", extra={"shard": s.id, "source": source, "error": str(exc)})
                    self.import_failures += 1
                    continue
                if s.id in state.held:
                    return
                ids = state.install(copy)
                part.store.installed(state, ids)
                for sid in ids:  # its events before the copy's position are on the replicas it came from
                    self.kv.watch_source.held_from(s.group, sid, state.held[sid].since)
                self.imports += 1
                log.info(
                    "shard copied",
                    extra={"shard": s.id, "source": source, "keys": len(copy.items), "since": copy.since, "held": ids},
                )
                return
        finally:
            state.end_import()

    def _merging(self, shard: int, a: Assignment) -> bool:
        """Whether a copy to drop is being merged into a neighbour here (its Merge entry drops it; not before)."""
        for part in self.kv.partitions.values():
            held = part.state.held.get(shard)
            if held is None:
                continue
            for s in a.shards:
                if (
                    s.id != shard
                    and s.group == part.number
                    and s.start <= held.start
                    and (not s.end or (held.end and held.end <= s.end))
                ):
                    return True
        return False

    async def _drop(self, shard: int) -> None:
        for part in self.kv.partitions.values():
            held = part.state.drop(shard)
            if held is not None:
                part.store.dropped(held)
                self.kv.watch_source.dropped(part.number, held.id, held.start, held.end)
                log.info("shard copy dropped", extra={"shard": shard, "keys": len(held.items)})
        await self._ack(shard, 0, "closed")

    async def _append(self, part: Partition, cmd: Any) -> None:
        try:
            result = await part.log.append(cmd, timeout=5.0)
        except Exception as exc:
            log.warning("a shard change was not appended", extra={"command": type(cmd).__name__, "error": repr(exc)})
            return
        if isinstance(result, Exception):
            log.info("a shard change was refused", extra={"command": type(cmd).__name__, "error": str(result)})

    async def _ack(self, shard: int, epoch: int, status: str = "opened") -> None:
        key = shard if status == "opened" else -shard - 1
        if self._acked.get(key) == epoch:
            return
        try:
            await self.scheduler.ack(Ack(CLUSTER, self.node_id, shard, epoch, status))  # type: ignore[arg-type]
        except SchedulerError as exc:
            log.debug("ack refused", extra={"shard": shard, "epoch": epoch, "error": str(exc)})
            return
        self._acked[key] = epoch

    # ---- splits -------------------------------------------------------------------------------

    async def _split_big(self) -> None:
        now = time.monotonic()
        for part in self.kv.partitions.values():
            for held in list(part.state.held.values()):
                if self.roles.get(held.id) != "leader" or len(held.items) < 2:
                    continue
                hot = bool(self.cfg.split_writes_per_s) and self.rates.get(held.id, 0.0) > self.cfg.split_writes_per_s
                if held.size <= self.cfg.shard_capacity and not hot:
                    continue
                if now - self._proposed.get(held.id, -1e9) < SPLIT_RETRY_S:
                    continue
                if self.scheduler.state.busy.get((CLUSTER, held.id)) is not None:
                    continue
                key = held.items.keys()[len(held.items) // 2]
                self._proposed[held.id] = now
                try:
                    await self.scheduler.propose(CLUSTER, Operator("split", (held.id,), "split", split_key=key))
                    log.info("split proposed", extra={"shard": held.id, "size": held.size, "key": key})
                except SchedulerError as exc:
                    log.info("split not proposed", extra={"shard": held.id, "error": str(exc)})

    async def _expire_due(self) -> None:
        """As the leader of a shard: end its keys whose TTL ran out or whose registry session is gone."""
        now_ms = int(time.time() * 1000)
        alive = self.kv.session_alive
        for part in self.kv.partitions.values():
            for held in list(part.state.held.values()):
                if not held.timed or self.roles.get(held.id) != "leader":
                    continue
                due: list[tuple[str, int]] = []
                why = "ttl"
                for key in list(held.timed):
                    item = held.items.get(key)
                    if item is None:
                        continue
                    if item.expires and item.expires <= now_ms:
                        due.append((key, item.mod))
                    elif item.session and not alive(item.session):
                        due.append((key, item.mod))
                        why = "session"
                for i in range(0, len(due), 500):
                    await self._append(part, Expire(held.id, tuple(due[i : i + 500]), why, now_ms))

    async def _merge_small(self) -> None:
        """Propose merging two small neighbours this replica leads the left one of (PD's merge checker)."""
        c = self.scheduler.state.clusters.get(CLUSTER)
        if c is None:
            return
        now = time.monotonic()
        now_ms = int(time.time() * 1000)
        small = self.cfg.shard_capacity // 5
        for part in self.kv.partitions.values():
            ordered = sorted(part.state.held.values(), key=lambda h: h.start)
            for left, right in itertools.pairwise(ordered):
                if left.end != right.start or self.roles.get(left.id) != "leader" or left.size + right.size > small:
                    continue
                a, b = c.shards.get(left.id), c.shards.get(right.id)
                if a is None or b is None or a.group != b.group or a.end != b.start:
                    continue
                if {r.node for r in a.replicas} != {r.node for r in b.replicas}:
                    continue
                if any(s.moved_ms and now_ms - s.moved_ms < self.cfg.merge_after * 1000 for s in (a, b)):
                    continue
                if any(self.scheduler.state.busy.get((CLUSTER, s.id)) is not None for s in (a, b)):
                    continue
                if now - self._proposed.get(left.id, -1e9) < SPLIT_RETRY_S:
                    continue
                self._proposed[left.id] = now
                try:
                    await self.scheduler.propose(CLUSTER, Operator("merge", (left.id, right.id), "merge"))
                    log.info(
                        "merge proposed", extra={"shard": left.id, "other": right.id, "size": left.size + right.size}
                    )
                except SchedulerError as exc:
                    log.info("merge not proposed", extra={"shard": left.id, "error": str(exc)})
                return  # one at a time: the table changes under the next

    # ---- heartbeats ---------------------------------------------------------------------------

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.node_lease / 3)
            now = time.monotonic()
            loads = []
            for part in self.kv.partitions.values():
                for held in part.state.held.values():
                    then, writes = self._writes.get(held.id, (now, held.writes))
                    if now > then:
                        self.rates[held.id] = max(0.0, (held.writes - writes) / (now - then))
                    self._writes[held.id] = (now, held.writes)
                    loads.append(ShardLoad(held.id, held.size, self.rates.get(held.id, 0.0)))
            hb = Heartbeat(CLUSTER, self.node_id, time.time(), loads)
            try:
                await self.kv.bus.nc.publish(SUBJECT_HEARTBEAT, _json.encode(hb))
            except Exception as exc:
                log.debug("heartbeat not sent", extra={"error": repr(exc)})
