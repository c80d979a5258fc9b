"""The KV's public API on one replica: partitions opened, requests run where the key's shard is held."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.errors import NoRespondersError

from app.bus.connection import Bus
from app.config import KvConfig, SnapshotConfig
from app.errors import FleetmateError, Unavailable
from app.log.batcher import AppendError
from app.log.engine import LogFailed, SharedLog
from app.log.host import LogEngine, SnapshotPolicy
from app.services.kv import checks
from app.services.kv.errors import (
    BadKvRequest,
    CrossShard,
    KeyNotFound,
    KvError,
    NoSuchShard,
    NotHeld,
    Refused,
    RevisionMismatch,
    StaleEpoch,
    Unreachable,
)
from app.services.kv.holder import CLUSTER, Holder
from app.services.kv.leaders import LeaderBalancer
from app.services.kv.machine import Event, Held, PartitionState, nbytes
from app.services.kv.messages import REV_SHIFT, Batch, Check, Delete, KeyEvent, Op, Put, Written
from app.services.kv.partition import PartitionLog, log_name, log_subject, stream_name
from app.services.kv.store import PartitionStore
from app.services.kv.transfer import Exporter
from app.services.kv.watch_source import WatchSource
from app.services.kv.wire import SUBJECT_REQ, KvItem, KvReply, KvRequest
from app.services.scheduler.errors import AlreadyExists, SchedulerError
from app.services.scheduler.messages import ClusterSpec, Limits
from app.services.scheduler.service import SchedulerService
from app.storage.snapshots.memory import MemorySnapshotStore

log = logging.getLogger("fleetmate.kv")

WRITES = frozenset({"put", "delete", "batch"})
TRIES = 20  # a request routed with an old view of the shards is routed again this many times
SCAN_PAGE = 1000  # keys a scan gives at most per call
FORWARD_TIMEOUT_S = 10.0
_enc = msgspec.msgpack.Encoder()
_req_dec = msgspec.msgpack.Decoder(KvRequest)
_reply_dec = msgspec.msgpack.Decoder(KvReply)
_ERRORS: dict[str, type[KvError]] = {
    cls.code: cls
    for cls in (BadKvRequest, CrossShard, KeyNotFound, NoSuchShard, NotHeld, Refused, StaleEpoch, Unreachable)
}
_NO_SNAPSHOTS = SnapshotConfig(store="memory", every_entries=0, every_seconds=0, trim=False, on_stop_timeout=0)


def split_keys(partitions: int) -> tuple[str, ...]:
    """The first shards' boundaries: one shard per partition, cut evenly over printable ASCII's first character."""
    return tuple(chr(0x20 + (0x7F - 0x20) * i // partitions) for i in range(1, partitions))


@dataclass
class Partition:
    """One log partition on this replica: its log, machine and file."""

    number: int
    log: SharedLog[Any]
    state: PartitionState
    store: PartitionStore


class KvService:
    """One replica's KV: every write goes through its shard's partition log; reads come from a holder's copy."""

    def __init__(
        self,
        bus: Bus,
        cfg: KvConfig,
        data_dir: Path,
        node_id: str,
        engine: LogEngine,
        scheduler: SchedulerService,
        *,
        replicas: int,
        address: str = "",
        session_alive: Callable[[int], bool] | None = None,
    ) -> None:
        self.bus = bus
        self.cfg = cfg
        self.data_dir = data_dir / "kv"
        self.node_id = node_id
        self.engine = engine
        self.scheduler = scheduler
        self.replicas = replicas
        self.session_alive: Callable[[int], bool] = session_alive or (lambda _: False)
        self.partitions: dict[int, Partition] = {}
        self.holder = Holder(self, scheduler, cfg, address)
        self.exporter = Exporter(bus, node_id, self._partition_of)
        self.watch_source = WatchSource(bus, node_id, self._partition_of)
        self.leaders: LeaderBalancer | None = None
        self._sub: Any = None
        self.forwarded = 0
        self.retried = 0

    # ---- start and stop -----------------------------------------------------------------------

    def partition_count(self) -> int:
        """P: the kv cluster's, once it exists; else kv.partitions, or two per NATS server."""
        c = self.scheduler.state.clusters.get(CLUSTER)
        if c is not None and c.spec.groups:
            return c.spec.groups
        return self.cfg.partitions or min(256, 2 * self.bus.cluster_size())

    async def start(self) -> None:
        """Create the kv cluster if it is new, open every partition's log, serve copies and forwarded requests."""
        await self.scheduler.sync()
        count = self.partition_count()
        if CLUSTER not in self.scheduler.state.clusters:
            spec = ClusterSpec(
                name=CLUSTER,
                topology="dynamic",
                shard_count=count,
                node_count=1,
                max_replicas=self.cfg.max_replicas,
                max_down_time_s=self.cfg.max_peer_down_time,
                lease_s=self.cfg.node_lease,
                groups=count,
                split_keys=split_keys(count),
                # the balancing cool-down: a minute, or kv.merge_after if shorter (a store's merges pass it too)
                limits=Limits(cooldown_s=min(60.0, self.cfg.merge_after)),
            )
            try:
                await self.scheduler.create_cluster(spec)
                log.info("kv cluster created", extra={"partitions": count})
            except AlreadyExists:
                pass
            count = self.partition_count()
        if self.cfg.partitions and self.cfg.partitions != count:
            log.warning("kv.partitions differs from the store's: the store's is kept", extra={"store": count})
        for p in range(count):
            state = PartitionState(p)
            store = PartitionStore(self.data_dir / f"p{p}.sqlite")
            user = PartitionLog(state, store, self._applied)
            opened = self.engine.add(
                log_name(p),
                user,
                stream=stream_name(p),
                subject=log_subject(p),
                replicas=self.replicas,
                snapshots=SnapshotPolicy(MemorySnapshotStore(), _NO_SNAPSHOTS),
                never_trimmed=True,  # not trimmed yet: anything missing was lost unstored, never acknowledged
            )
            self.watch_source.follow(p, store.applied_seq())  # events from the replay on are kept
            await self.engine.start(log_name(p))
            for held in state.held.values():  # a copy installed past the file's sequence replays no events before
                self.watch_source.held_from(p, held.id, held.since)
            self.partitions[p] = Partition(p, opened.log, state, store)
        await self.exporter.start()
        await self.watch_source.start()
        self._sub = await self.bus.nc.subscribe(f"{SUBJECT_REQ}.{self.node_id}", cb=self._on_request)
        await self.holder.start()
        if self.replicas > 1:
            self.leaders = LeaderBalancer(self.bus, [stream_name(p) for p in self.partitions])
        log.info(
            "kv started", extra={"partitions": count, "held": sum(len(p.state.held) for p in self.partitions.values())}
        )

    async def lead(self) -> None:
        """Leader duties: spread the partitions' NATS leaders (app/services/kv/leaders.py)."""
        if self.leaders is not None:
            self.leaders.start()

    async def stop_leading(self) -> None:
        """Leader duties end."""
        if self.leaders is not None:
            await self.leaders.stop()

    async def stop(self) -> None:
        """Stop serving; the partitions' logs close with the engine."""
        await self.stop_leading()
        await self.holder.stop()
        await self.exporter.stop()
        await self.watch_source.stop()
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:
                log.debug("unsubscribe failed", extra={"error": repr(exc)})
        for p in list(self.partitions):
            await self.engine.close(log_name(p), last_snapshot=False)
        for part in self.partitions.values():
            part.store.close()

    def stats(self) -> dict[str, Any]:
        """Figures for /metrics."""
        held = [h for p in self.partitions.values() for h in p.state.held.values()]
        return {
            "forwarded": self.forwarded,
            "retried": self.retried,
            "copies_in": self.holder.imports,
            "copies_out": self.exporter.exported,
            "copy_failures": self.holder.import_failures,
            "leader_moves": self.leaders.moves if self.leaders is not None else 0,
            "shards_held": len(held),
            "bytes_held": sum(h.size for h in held),
            "watches": len(self.watch_source.watches),
            "applied": {n: p.log.applied_seq for n, p in self.partitions.items()},
        }

    def partition(self, number: int) -> Partition | None:
        """A partition this replica follows."""
        return self.partitions.get(number)

    def _partition_of(self, number: int) -> tuple[SharedLog[Any], PartitionState] | None:
        part = self.partitions.get(number)
        return (part.log, part.state) if part is not None else None

    def _applied(self, partition: int, events: list[Event]) -> None:
        self.watch_source.applied(partition, events)
        part = self.partitions.get(partition)
        if part is None:
            return
        capacity = self.cfg.shard_capacity
        for e in events:
            if isinstance(e, KeyEvent):
                held = part.state.held.get(e.shard)
                if held is not None and held.size > capacity:
                    self.holder.wake()
                    break
            else:
                self.holder.wake()  # created, split, merged, lost: acknowledge or copy again
                if e.kind == "lost":
                    self.watch_source.dropped(partition, e.shard, e.start, e.end)

    # ---- routing ------------------------------------------------------------------------------

    def _locate(self, key: str) -> tuple[Partition, Held] | None:
        """The local partition and held shard for a key, if this replica holds it."""
        try:
            group = self.scheduler.route(CLUSTER, key=key).group
        except SchedulerError:
            group = -1
        part = self.partitions.get(group)
        if part is not None:
            held = part.state.locate(key)
            if held is not None:
                return part, held
        for part in self.partitions.values():
            held = part.state.locate(key)
            if held is not None:
                return part, held
        return None

    def _holders(self, key: str) -> list[str]:
        try:
            route = self.scheduler.route(CLUSTER, key=key)
        except SchedulerError as exc:
            raise Unreachable(f"the kv store is not placed yet: {exc}") from exc
        live = self.scheduler.state.clusters[CLUSTER]
        nodes = [route.leader, *(n for n in route.replicas if n != route.leader)]
        return [n for n in nodes if n and n != self.node_id and live.live(n)]

    async def handle(self, req: KvRequest) -> KvReply:
        """Run a request here if this replica holds the key's shard, else on a replica that does.

        A request refused for certain (a stale epoch, a shard not held, no holder reachable) is routed
        again; a write whose outcome is unknown (a timeout) is not: sent again it could apply twice.
        """
        checks.request(req, self.cfg)
        write = req.op in WRITES
        last: Exception | None = None
        for attempt in range(TRIES):
            try:
                found = self._locate(req.key)
                if found is not None:
                    return await self._run(found[0], found[1], req)
                if req.forwarded:
                    raise NotHeld(f"{self.node_id} holds no copy of the shard of {req.key!r}")
                return await self._forward_any(req)
            except (StaleEpoch, NotHeld, Unreachable) as exc:
                last = exc
                if req.forwarded and isinstance(exc, NotHeld):
                    raise  # the replica that forwarded it routes again
            except Unavailable as exc:
                if write:
                    raise
                last = exc
            self.retried += 1
            await asyncio.sleep(min(0.5, 0.01 * (attempt + 1)))
        raise Unavailable(f"the shard of {req.key!r} did not answer: {last}")

    async def _forward_any(self, req: KvRequest) -> KvReply:
        last: Exception | None = None
        for node in self._holders(req.key)[:2]:
            try:
                return await self._forward(node, req)
            except (NotHeld, Unreachable) as exc:
                last = exc
        raise last or Unreachable(f"no live replica holds the shard of {req.key!r}")

    async def _forward(self, node: str, req: KvRequest) -> KvReply:
        self.forwarded += 1
        fwd = msgspec.structs.replace(req, forwarded=True)
        try:
            msg = await self.bus.nc.request(f"{SUBJECT_REQ}.{node}", _enc.encode(fwd), timeout=FORWARD_TIMEOUT_S)
        except NoRespondersError as exc:
            raise Unreachable(f"replica {node} is not serving the kv store") from exc
        except Exception as exc:  # a timeout, a lost connection: the request may have run
            raise Unavailable(f"replica {node} did not answer: {exc!r}") from exc
        reply = _reply_dec.decode(msg.data)
        if not reply.ok:
            if reply.code == RevisionMismatch.code:
                raise RevisionMismatch(reply.message, req.key, reply.revision)
            if reply.code == Unavailable.code:
                raise Unavailable(reply.message)
            raise _ERRORS.get(reply.code, KvError)(reply.message)
        return reply

    async def _on_request(self, msg: Msg) -> None:
        try:
            req = _req_dec.decode(msg.data)
            reply = await self.handle(msgspec.structs.replace(req, forwarded=True))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            reply = KvReply(False, BadKvRequest.code, f"an undecodable kv request: {exc}")
        except RevisionMismatch as exc:
            reply = KvReply(False, exc.code, exc.message, revision=exc.revision)
        except FleetmateError as exc:
            reply = KvReply(False, exc.code, exc.message)
        except Exception as exc:
            log.exception("a forwarded kv request failed")
            reply = KvReply(False, "internal", repr(exc))
        if msg.reply:
            await self.bus.nc.publish(msg.reply, _enc.encode(reply))

    # ---- running a request on a held shard ----------------------------------------------------

    async def _append(self, part: Partition, cmd: Any) -> Written:
        # The batcher fills an entry up to its byte limit by these sizes: a large value must count as large.
        if isinstance(cmd, Put):
            size = 48 + nbytes(cmd.key) + nbytes(cmd.value)
        elif isinstance(cmd, Batch):
            size = 48 + sum(16 + nbytes(o.key) + nbytes(o.value or "") for o in cmd.ops) + 16 * len(cmd.checks)
        else:
            size = 48 + nbytes(cmd.key)
        try:
            result = await part.log.append(cmd, size)
        except (TimeoutError, AppendError, LogFailed) as exc:
            raise Unavailable(f"partition {part.number} did not apply the write: {exc}") from exc
        if isinstance(result, NotHeld):
            # This replica stopped holding the shard (a move, a drop) before the entry applied here: the
            # replicas still holding it applied the write or refused it; which is unknown from here, so it
            # is not sent again (a stale epoch, by contrast, is the same answer on every holder).
            raise Unavailable(f"the shard moved while the write was applied; its outcome is unknown: {result}")
        if isinstance(result, KvError):
            raise result
        if isinstance(result, Exception):
            raise KvError(str(result))
        assert isinstance(result, Written)
        return result

    async def _run(self, part: Partition, held: Held, req: KvRequest) -> KvReply:
        reply = await self._run_op(part, held, req)
        return msgspec.structs.replace(reply, shard=held.id, partition=part.number, node=self.node_id)

    async def _run_op(self, part: Partition, held: Held, req: KvRequest) -> KvReply:
        now = int(time.time() * 1000)
        match req.op:
            case "put":
                put = Put(held.id, held.epoch, req.key, req.value, req.if_revision, now, req.ttl_ms, req.session)
                w = await self._append(part, put)
                return KvReply(revision=w.revision, prev_revision=w.prev_revision, seq=w.revision >> REV_SHIFT)
            case "delete":
                w = await self._append(part, Delete(held.id, held.epoch, req.key, req.if_revision, now))
                return KvReply(
                    revision=w.revision,
                    prev_revision=w.prev_revision,
                    deleted=w.deleted,
                    seq=w.revision >> REV_SHIFT,
                )
            case "batch":
                for k in [*(o.key for o in req.ops), *(c.key for c in req.checks)]:
                    if not held.covers(k):
                        raise CrossShard(
                            f"key {k!r} is not in shard {held.id} with {req.key!r}: a batch stays within one shard"
                        )
                ops = tuple(Op(o.key, None if o.delete else o.value) for o in req.ops)
                cmd = Batch(held.id, held.epoch, ops, tuple(Check(c.key, c.revision) for c in req.checks), now)
                w = await self._append(part, cmd)
                return KvReply(revision=w.revision, deleted=w.deleted, seq=w.revision >> REV_SHIFT)
            case "get":
                await self._read_point(part, req)
                held = self._held_again(part, held, req.key)
                item = held.items.get(req.key)
                if item is None:
                    return KvReply(found=False, seq=part.log.applied_seq)
                kv = KvItem(req.key, item.value, item.mod, item.create, item.version, item.expires, item.session)
                return KvReply(found=True, item=kv, revision=item.mod, seq=part.log.applied_seq)
            case "scan":
                await self._read_point(part, req)
                held = self._held_again(part, held, req.key)
                limit = min(req.limit or SCAN_PAGE, SCAN_PAGE)
                stop = req.end if req.end and (not held.end or req.end < held.end) else held.end
                items: list[KvItem] = []
                for key, item in held.scan(req.key, stop):
                    if len(items) == limit:
                        return KvReply(items=items, more=True, next=key, seq=part.log.applied_seq)
                    items.append(
                        KvItem(key, item.value, item.mod, item.create, item.version, item.expires, item.session)
                    )
                done = not held.end or (bool(req.end) and req.end <= held.end)
                return KvReply(items=items, next="" if done else held.end, seq=part.log.applied_seq)
        raise BadKvRequest(f"unknown operation {req.op!r}")

    async def _read_point(self, part: Partition, req: KvRequest) -> None:
        try:
            if req.after is not None:  # read-your-writes: the token's entry applied here first
                other = self.partitions.get(req.after[0])
                if other is None:
                    raise BadKvRequest(f"the read token names partition {req.after[0]}, which the store does not have")
                await other.log.wait_applied(req.after[1])
            if not req.serializable:
                await part.log.barrier()
        except (TimeoutError, LogFailed) as exc:
            raise Unavailable(f"partition {part.number} did not answer the read barrier: {exc}") from exc

    def _held_again(self, part: Partition, held: Held, key: str) -> Held:
        """After waiting, the key's shard as it is now (a split may have moved it to the child)."""
        now = part.state.held.get(held.id)
        if now is not None and now.covers(key):
            return now
        other = part.state.locate(key)
        if other is None:
            raise NotHeld(f"the shard of {key!r} is no longer held here")
        return other

    # ---- the API ------------------------------------------------------------------------------

    async def put(self, key: str, value: str, if_revision: int = -1, ttl_ms: int = 0, session: int = 0) -> KvReply:
        """Set a key (compare-and-set with if_revision: 0 = create only); with a TTL or bound to a registry
        session, the key is deleted when the time runs out or the session ends."""
        if session and not self.session_alive(session):
            raise BadKvRequest(f"session {session} does not exist (open one with POST /api/v1/sessions)")
        return await self.handle(KvRequest("put", key, value, if_revision, ttl_ms=ttl_ms, session=session))

    async def get(self, key: str, serializable: bool = False, after: tuple[int, int] | None = None) -> KvReply:
        """A key's value and stat (found False when absent); linearizable unless serializable; with a
        read token `after` (partition, sequence), never older than the write that gave it."""
        return await self.handle(KvRequest("get", key, serializable=serializable, after=after))

    async def delete(self, key: str, if_revision: int = -1) -> KvReply:
        """Delete a key (deleted 0 when it was absent)."""
        return await self.handle(KvRequest("delete", key, if_revision=if_revision))

    async def batch(self, req: KvRequest) -> KvReply:
        """Writes of one shard, all or none, if every check holds (CrossShard when they span shards)."""
        return await self.handle(req)

    async def scan(
        self,
        start: str,
        end: str = "",
        limit: int = 0,
        serializable: bool = False,
        after: tuple[int, int] | None = None,
    ) -> KvReply:
        """Keys in [start, end) in order, at most limit (more: True with next where to go on)."""
        checks.scan(start, end, limit, self.cfg)
        want = min(limit or SCAN_PAGE, SCAN_PAGE)
        items: list[KvItem] = []
        cursor = start
        while True:
            reply = await self.handle(
                KvRequest("scan", cursor, end=end, limit=want - len(items), serializable=serializable, after=after)
            )
            items.extend(reply.items)
            if reply.more:
                return KvReply(items=items, more=True, next=reply.next, node=self.node_id)
            if not reply.next:
                return KvReply(items=items, node=self.node_id)
            cursor = reply.next
            if len(items) >= want:
                return KvReply(items=items, more=True, next=cursor, node=self.node_id)
