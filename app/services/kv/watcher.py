"""The gateway's side of KV watches: a client's range followed on replicas that hold it, reopened where they move.

A range spans one or more partitions. For each, the gateway opens a watch on a replica holding
every shard of the range there (itself when it does), and keeps a cursor: the last revision of that
partition it delivered (or knows there was nothing in range up to). Batches are numbered; a gap, a
silent replica (no heartbeat for 3 s), or the replica giving the shard up reopens the watch from the
cursor, on another holder if need be, so no event is lost or given twice. Splits keep a shard's
holders, so they need nothing. Events are in revision order within a partition; the cursors are the
client's resume token.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import msgspec

from app.services.kv.errors import KvError
from app.services.kv.holder import CLUSTER
from app.services.kv.messages import KeyEvent, revision
from app.services.kv.wire import SUBJECT_WATCH, SUBJECT_WATCH_KEEP, WatchBatch, WatchKeep, WatchOpen, WatchOpened

if TYPE_CHECKING:
    from app.services.kv.service import KvService

log = logging.getLogger("fleetmate.kv")

SILENT_S = 3.0  # no batch (not even a heartbeat) this long: the replica is gone, reopen elsewhere
NATS_CALL_S = 5.0  # the longest a subscribe or publish may take
LAGGING_S = 5.0  # the holder's position behind this replica's own that long: reopen elsewhere
UNCOVERED_S = 10.0  # no replica holds every shard of the range this long: the client is told
KEEP_EVERY_S = 2.0
_enc = msgspec.msgpack.Encoder()
_batch_dec = msgspec.msgpack.Decoder(WatchBatch)
_opened_dec = msgspec.msgpack.Decoder(WatchOpened)
_ids = itertools.count(1)


class Compacted(KvError):
    """The events after the revision asked for are no longer kept by any holder."""

    code = "compacted"
    status = 410


def parse_resume(text: str) -> dict[int, int]:
    """A resume token `P:REV,P:REV` (as the watch gives it) as partition -> revision."""
    out: dict[int, int] = {}
    for part in filter(None, text.split(",")):
        p, sep, rev = part.partition(":")
        if not sep or not p.isdigit() or not rev.isdigit() or len(p) > 3 or len(rev) > 20:
            raise ValueError(f"{part!r} is not PARTITION:REVISION")
        out[int(p)] = int(rev)
    return out


def resume_token(cursors: dict[int, int]) -> str:
    """The cursors as a resume token."""
    return ",".join(f"{p}:{rev}" for p, rev in sorted(cursors.items()))


class RangeWatch:
    """A client's watch of [start, end) through this replica (see the module docstring)."""

    def __init__(self, kv: KvService, start: str, end: str, resume: dict[int, int] | None = None) -> None:
        self.kv = kv
        self.start = start
        self.end = end
        self.cursors: dict[int, int] = dict(resume or {})
        self.queue: asyncio.Queue[tuple[int, list[KeyEvent], int] | BaseException] = asyncio.Queue()
        self.delivered: dict[int, int] = dict(resume or {})  # what the client has: its resume token
        self.ready = asyncio.Event()
        self.reopened = 0
        self.failed: KvError | None = None
        self._opened: set[int] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._partitions: list[int] = []

    def pieces(self) -> dict[int, list[tuple[str, str]]]:
        """The range's pieces per partition, as this replica's shard table has them."""
        c = self.kv.scheduler.state.clusters.get(CLUSTER)
        out: dict[int, list[tuple[str, str]]] = {}
        if c is None:
            return out
        for s in sorted(c.shards.values(), key=lambda s: s.start):
            if (self.end and s.start >= self.end) or (s.end and s.end <= self.start):
                continue
            lo = max(s.start, self.start)
            hi = s.end if not self.end else (min(s.end, self.end) if s.end else self.end)
            out.setdefault(s.group, []).append((lo, hi))
        return out

    def holders(self, partition: int) -> list[str]:
        """Replicas holding every shard of the range in a partition (this one first), live, acknowledged."""
        c = self.kv.scheduler.state.clusters.get(CLUSTER)
        if c is None:
            return []
        sets = []
        for s in c.shards.values():
            if s.group != partition or (self.end and s.start >= self.end) or (s.end and s.end <= self.start):
                continue
            sets.append({r.node for r in s.replicas if r.acked >= 1 and r.role != "learner" and c.live(r.node)})
        common = set.intersection(*sets) if sets else set()
        return sorted(common, key=lambda n: (n != self.kv.node_id, n))

    async def open(self) -> None:
        """Open a watch in every partition the range spans; returns once each is open (or failed)."""
        self._partitions = sorted(self.pieces())
        for p in self._partitions:
            self._tasks.append(asyncio.create_task(self._follow(p), name=f"kv-range-watch-{p}"))
        if not self._partitions:
            self.ready.set()
        await self.ready.wait()
        if self.failed is not None:
            raise self.failed

    async def close(self) -> None:
        """Stop following."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def batches(self) -> AsyncIterator[tuple[int, list[KeyEvent], str]]:
        """(partition, events, resume token with them) as they come; raises Compacted (or another KvError)
        when the watch cannot go on. The token counts what the client is handed, never more: the
        cursors run ahead while batches wait in the queue."""
        while True:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            partition, events, cursor = item
            self.delivered[partition] = max(self.delivered.get(partition, 0), cursor)
            yield partition, events, resume_token(self.delivered)

    async def _follow(self, partition: int) -> None:
        """Follow one partition of the range until closed; a failure ends the client's watch with an error,
        never in silence."""
        try:
            await self._follow_loop(partition)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("a kv watch stopped following a partition", extra={"partition": partition})
            self.failed = KvError(f"the watch of partition {partition} failed: {exc!r}")
            self.queue.put_nowait(self.failed)
            self._mark_open(partition)

    async def _follow_loop(self, partition: int) -> None:
        first = True
        uncovered_since = 0.0
        while True:
            nodes = self.holders(partition)
            if nodes:
                uncovered_since = 0.0
            else:
                uncovered_since = uncovered_since or time.monotonic()
                if time.monotonic() - uncovered_since > UNCOVERED_S:
                    # The shards of the range in this partition sit on different replicas (moves): one
                    # holder cannot serve it. Watching each shard's range and merging them is not done yet.
                    raise KvError(
                        f"no replica holds every shard of [{self.start!r}, {self.end!r}) in partition {partition} "
                        "(their copies are on different replicas): watch narrower ranges"
                    )
            compacted: list[Compacted] = []
            for node in nodes:
                try:
                    await self._serve_from(partition, node)
                except Compacted as exc:  # this holder's history is too short; another's may not be
                    compacted.append(exc)
                except Exception as exc:  # the replica went away or refused: try another
                    log.info(
                        "kv watch reopened",
                        extra={
                            "partition": partition,
                            "node": node,
                            "cursor": self.cursors.get(partition),
                            "why": str(exc),
                        },
                    )
                self.reopened += 0 if first else 1
                first = False
            if nodes and len(compacted) == len(nodes):  # no holder keeps events that far back
                self.failed = compacted[0]
                self.queue.put_nowait(compacted[0])
                self._mark_open(partition)
                return
            await asyncio.sleep(0.2)

    def _mark_open(self, partition: int) -> None:
        self._opened.add(partition)
        if self._opened >= set(self._partitions):
            self.ready.set()

    async def _serve_from(self, partition: int, node: str) -> None:
        nc = self.kv.bus.nc
        wid = f"{self.kv.node_id}-{next(_ids)}"
        inbox = nc.new_inbox()
        inbound: asyncio.Queue[Any] = asyncio.Queue()
        # Every NATS call is bounded: while the connection moves to another server a call can wait for good,
        # and this watch would then stop without a word.
        async with asyncio.timeout(NATS_CALL_S):
            sub = await nc.subscribe(inbox, cb=inbound.put)
        try:
            bounds = self.pieces().get(partition, [])
            req = WatchOpen(wid, partition, self.start, self.end, self.cursors.get(partition, -1), inbox, bounds)
            reply = _opened_dec.decode((await nc.request(f"{SUBJECT_WATCH}.{node}", _enc.encode(req), timeout=5)).data)
            if not reply.ok:
                if reply.code == "compacted":
                    raise Compacted(reply.message)
                raise KvError(f"{node}: {reply.code}: {reply.message}")
            self.cursors[partition] = reply.revision  # the revision asked for, or the holder's "now"
            self.delivered.setdefault(partition, reply.revision)
            self._mark_open(partition)
            await self._receive(partition, node, wid, inbound)
        finally:
            with contextlib.suppress(Exception):
                async with asyncio.timeout(NATS_CALL_S):
                    await nc.publish(f"{SUBJECT_WATCH_KEEP}.{node}", _enc.encode(WatchKeep([wid], close=True)))
            with contextlib.suppress(Exception):
                async with asyncio.timeout(NATS_CALL_S):
                    await sub.unsubscribe()

    async def _receive(self, partition: int, node: str, wid: str, inbound: asyncio.Queue[Any]) -> None:
        nc = self.kv.bus.nc
        expected = 1
        kept = heard = time.monotonic()
        mark = (time.monotonic(), 0)  # (when, this replica's position then): the holder must reach it soon
        while True:
            now = time.monotonic()
            if now - kept >= KEEP_EVERY_S:
                async with asyncio.timeout(NATS_CALL_S):
                    await nc.publish(f"{SUBJECT_WATCH_KEEP}.{node}", _enc.encode(WatchKeep([wid])))
                kept = now
            if now - heard > SILENT_S:
                raise KvError(f"{node} went silent")
            try:
                async with asyncio.timeout(0.5):
                    msg = await inbound.get()
            except TimeoutError:
                continue
            heard = time.monotonic()
            batch = _batch_dec.decode(msg.data)
            if batch.seq != expected:
                raise KvError(f"batch {batch.seq} from {node} where {expected} was due: reopening")
            expected += 1
            cursor = self.cursors[partition]
            fresh = [e for e in batch.events if e.revision > cursor]
            self.cursors[partition] = max(cursor, batch.upto, fresh[-1].revision if fresh else 0)
            if fresh:
                self.queue.put_nowait((partition, fresh, self.cursors[partition]))
            if batch.end:
                raise KvError(f"{node} ended the watch: {batch.end}")
            # A holder whose copy stopped moving (its log stalled) would hold the watch back for good:
            # this replica follows the partition too, so it can tell when the holder stays behind it.
            mine = self.kv.partitions.get(partition)
            if mine is not None:
                now = time.monotonic()
                if self.cursors[partition] >= mark[1]:  # it reached where this replica was: a new mark
                    mark = (now, revision(mine.log.applied_seq + 1, 0) - 1)
                elif now - mark[0] > LAGGING_S:
                    raise KvError(f"{node} has not reached in {LAGGING_S:g} s where this replica was: reopening")
