"""The holder's side of KV watches: each partition's recent key events, streamed to a gateway from a revision.

A replica keeps, per partition, the key events it applied (its held shards' only) in a bounded
history. A gateway opens a watch of a key range on a replica that holds every shard of the range in
that partition; the replica sends the events after the gateway's revision from the history, then
each applied batch, numbered, with a heartbeat every second, until the gateway stops keeping it
alive, a shard of the range is dropped here (the gateway opens it elsewhere from where it was), or
the history no longer reaches back that far (`compacted`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import msgspec
from nats.aio.msg import Msg

from app.bus.connection import Bus
from app.services.kv.machine import Held, PartitionState
from app.services.kv.messages import KeyEvent, revision
from app.services.kv.wire import SUBJECT_WATCH, SUBJECT_WATCH_KEEP, WatchBatch, WatchKeep, WatchOpen, WatchOpened

log = logging.getLogger("fleetmate.kv")

HISTORY = 50_000  # key events kept per partition
KEEP_FOR_S = 6.0  # a watch not kept alive this long ends
HEARTBEAT_S = 1.0
MAX_BATCH = 500  # events per message
_enc = msgspec.msgpack.Encoder()
_open_dec = msgspec.msgpack.Decoder(WatchOpen)
_keep_dec = msgspec.msgpack.Decoder(WatchKeep)


def in_range(key: str, start: str, end: str) -> bool:
    """Whether key is in [start, end) ("" end: no end)."""
    return key >= start and (not end or key < end)


def overlaps(held: Held, start: str, end: str) -> bool:
    """Whether a shard's range meets [start, end)."""
    return (not end or held.start < end) and (not held.end or held.end > start)


class History:
    """One partition's recent key events on this replica, and from which revision they are complete."""

    def __init__(self, floor: int) -> None:
        self.events: collections.deque[KeyEvent] = collections.deque()
        self.floor = floor  # events after this revision are all here (for the shards held since)
        self.shard_floor: dict[int, int] = {}

    def add(self, events: list[KeyEvent]) -> None:
        self.events.extend(events)
        while len(self.events) > HISTORY:
            self.floor = max(self.floor, self.events.popleft().revision)

    def after(self, rev: int, start: str, end: str) -> list[KeyEvent]:
        return [e for e in self.events if e.revision > rev and in_range(e.key, start, end)]


class Watch:
    """One gateway's watch of a range in one partition, served from here: batches go out in order."""

    def __init__(self, opened: WatchOpen, shards: set[int], bus: Bus) -> None:
        self.req = opened
        self.shards = shards
        self.seq = 0
        self.kept = time.monotonic()
        self.last = opened.after
        self.ended = False
        self._bus = bus
        self._outbox: asyncio.Queue[WatchBatch | None] = asyncio.Queue()
        self._pump = asyncio.get_running_loop().create_task(self._send_all(), name=f"kv-watch-{opened.id}")

    def enqueue(self, events: list[KeyEvent], upto: int = 0, end: str = "") -> None:
        """Number and queue batches of events (at most MAX_BATCH each); a heartbeat when there are none."""
        if self.ended:
            return
        starts = range(0, max(1, len(events)), MAX_BATCH)
        for i in starts:
            chunk = events[i : i + MAX_BATCH]
            if chunk:
                self.last = max(self.last, chunk[-1].revision)
            if i == starts[-1]:  # "nothing else up to upto" holds only once every chunk is out
                self.last = max(self.last, upto)
            self.seq += 1
            self._outbox.put_nowait(WatchBatch(self.req.id, self.seq, chunk, self.last, end))
        if end:
            self.ended = True
            self._outbox.put_nowait(None)

    def close(self) -> None:
        """Stop sending."""
        self.ended = True
        self._outbox.put_nowait(None)

    async def _send_all(self) -> None:
        while (batch := await self._outbox.get()) is not None:
            try:
                await self._bus.nc.publish(self.req.inbox, _enc.encode(batch))
            except Exception as exc:
                log.debug("watch batch not sent", extra={"error": repr(exc)})


class WatchSource:
    """Serves watches of the ranges whose shards this replica holds (see the module docstring)."""

    def __init__(self, bus: Bus, node_id: str, partitions: Callable[[int], tuple[Any, PartitionState] | None]) -> None:
        self.bus = bus
        self.node_id = node_id
        self.partitions = partitions
        self.histories: dict[int, History] = {}
        self.watches: dict[str, Watch] = {}
        self._subs: list[Any] = []
        self._task: asyncio.Task[None] | None = None

    def follow(self, partition: int, applied_seq: int) -> None:
        """Keep a history for a partition from the position this replica starts at."""
        self.histories[partition] = History(revision(applied_seq + 1, 0) - 1)

    def held_from(self, partition: int, shard: int, seq: int) -> None:
        """A shard held here from log position seq on (created or copied): its events before are elsewhere."""
        h = self.histories.get(partition)
        if h is not None:
            h.shard_floor[shard] = revision(seq + 1, 0) - 1

    async def start(self) -> None:
        """Answer watch opens and keepalives addressed to this replica; heartbeat open watches."""
        nc = self.bus.nc
        self._subs = [
            await nc.subscribe(f"{SUBJECT_WATCH}.{self.node_id}", cb=self._on_open),
            await nc.subscribe(f"{SUBJECT_WATCH_KEEP}.{self.node_id}", cb=self._on_keep),
        ]
        self._task = asyncio.create_task(self._heartbeats(), name="kv-watch-heartbeats")

    async def stop(self) -> None:
        """Stop serving (gateways open their watches elsewhere)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs = []

    # ---- requests -----------------------------------------------------------------------------

    async def _on_open(self, msg: Msg) -> None:
        try:
            answer = self._open(_open_dec.decode(msg.data))
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            answer = WatchOpened(False, "bad_request", f"an undecodable watch request: {exc}")
        await msg.respond(_enc.encode(answer))

    def _open(self, req: WatchOpen) -> WatchOpened:
        """Check and register the watch, and queue its backlog, in one step (no applied batch in between)."""
        found = self.partitions(req.partition)
        history = self.histories.get(req.partition)
        if found is None or history is None:
            return WatchOpened(False, "not_held", f"partition {req.partition} is not followed here")
        shared, state = found
        if not self._covers(state, req.bounds):
            return WatchOpened(False, "not_held", "this replica does not hold every shard of the range")
        shards = {h.id for h in state.held.values() if overlaps(h, req.start, req.end)}
        now = revision(shared.applied_seq + 1, 0) - 1
        after = now if req.after < 0 else req.after
        floor = max([history.floor, *(history.shard_floor.get(s, 0) for s in shards)])
        if after < floor:
            return WatchOpened(
                False, "compacted", f"events after revision {after} are no longer all here (from {floor})", floor
            )
        old = self.watches.pop(req.id, None)
        if old is not None:
            old.close()
        watch = Watch(msgspec.structs.replace(req, after=after), shards, self.bus)
        self.watches[req.id] = watch
        backlog = history.after(after, req.start, req.end)
        watch.enqueue(backlog, now)
        log.info(
            "kv watch opened here",
            extra={
                "watch": req.id,
                "partition": req.partition,
                "after": after,
                "now": now,
                "floor": floor,
                "shards": sorted(shards),
                "backlog": len(backlog),
                "range": [req.start, req.end],
            },
        )
        return WatchOpened(True, revision=after)

    @staticmethod
    def _covers(state: PartitionState, bounds: list[tuple[str, str]]) -> bool:
        """Whether the held shards cover each piece [lo, hi) of the range in this partition."""
        for lo, hi in bounds:
            cursor = lo
            while True:
                held = state.locate(cursor)
                if held is None:
                    return False
                if not held.end or (hi and held.end >= hi):
                    break
                cursor = held.end
        return True

    async def _on_keep(self, msg: Msg) -> None:
        with contextlib.suppress(msgspec.DecodeError, msgspec.ValidationError):
            keep = _keep_dec.decode(msg.data)
            for wid in keep.ids:
                watch = self.watches.get(wid)
                if watch is not None:
                    watch.kept = time.monotonic()
                    if keep.close:
                        del self.watches[wid]
                        watch.close()

    # ---- events -------------------------------------------------------------------------------

    def applied(self, partition: int, events: list[Any]) -> None:
        """An applied batch of a partition's events: into the history, and to the watches of their ranges."""
        keys = [e for e in events if isinstance(e, KeyEvent)]
        history = self.histories.get(partition)
        if history is not None and keys:
            history.add(keys)
        for watch in list(self.watches.values()):
            if watch.req.partition != partition:
                continue
            mine = [e for e in keys if e.revision > watch.last and in_range(e.key, watch.req.start, watch.req.end)]
            if mine:
                watch.enqueue(mine)

    def dropped(self, partition: int, shard: int, start: str, end: str) -> None:
        """A shard is no longer held here: the watches of ranges it meets end (the gateway opens them elsewhere)."""
        for wid, watch in list(self.watches.items()):
            lo, hi = watch.req.start, watch.req.end
            if watch.req.partition == partition and (not hi or start < hi) and (not end or end > lo):
                del self.watches[wid]
                watch.enqueue([], 0, f"shard {shard} is no longer held here")

    async def _heartbeats(self) -> None:
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            now = time.monotonic()
            for wid, watch in list(self.watches.items()):
                if now - watch.kept > KEEP_FOR_S:
                    del self.watches[wid]
                    watch.close()
                    continue
                found = self.partitions(watch.req.partition)
                watch.enqueue([], revision(found[0].applied_seq + 1, 0) - 1 if found is not None else 0)
