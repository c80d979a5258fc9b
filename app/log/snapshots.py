"""Snapshots of a log-fed state: when to take them, restoring the newest usable one, trimming the log behind them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from app.config import SnapshotConfig
from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore, make_meta

log = logging.getLogger("fleetmate.snapshots")


@dataclass(frozen=True)
class Image:
    """The state as bytes, taken at one applied sequence (consistent: taken between two applies)."""

    seq: int
    revision: int
    data: bytes


@dataclass(frozen=True)
class LogBounds:
    """The stream's first and last sequence and how many messages it holds (empty: first = last + 1, or 0)."""

    first_seq: int
    last_seq: int
    messages: int


class NoUsableSnapshot(RuntimeError):
    """The log was trimmed past this replica and no snapshot can bridge the gap."""


def needs_restore(local_seq: int, bounds: LogBounds) -> bool:
    """A replica restores when it has nothing (new or wiped) while the log does, or the log was trimmed past it."""
    return (local_seq == 0 and bounds.last_seq > 0) or bounds.first_seq > local_seq + 1


class Snapshotter:
    """Takes snapshots of one service every N entries or M seconds, keeps the newest K, trims the log.

    Which replica takes them: the leader when the store is shared (one writer for all), every
    replica when it is not (each keeps its own). Only the leader trims, and never past a
    sequence that a live replica has not applied yet, nor past the oldest kept snapshot.
    """

    def __init__(
        self,
        store: SnapshotStore,
        cfg: SnapshotConfig,
        *,
        service: str,
        node_id: str,
        image: Callable[[], Image],
        applied_seq: Callable[[], int],
        is_leader: Callable[[], bool],
        peers_applied: Callable[[], Awaitable[list[int]]],
        trim: Callable[[int], Awaitable[None]],
    ) -> None:
        self.store = store
        self.cfg = cfg
        self.service = service
        self.node_id = node_id
        self._image = image
        self._applied_seq = applied_seq
        self._is_leader = is_leader
        self._peers_applied = peers_applied
        self._trim = trim
        self.last: SnapshotMeta | None = None
        self.last_taken_mono = time.monotonic()
        self.taken = 0
        self.failures = 0
        self.trimmed_to = 0
        self._task: asyncio.Task[None] | None = None

    # ---- restore ------------------------------------------------------------------------------

    async def restore(self, local_seq: int, bounds: LogBounds, install: Callable[[bytes], int]) -> int | None:
        """Install the newest snapshot that the log can continue from; return its seq, or None to replay.

        install() receives the decompressed image, writes it in place of the local state and
        returns the sequence the installed state says it applied (checked against the meta).
        A corrupt or unreadable snapshot is reported and the next older one is tried.
        """
        metas = await self.store.list(self.service)
        for meta in metas:
            if meta.seq <= local_seq:
                break  # nothing newer than what we have
            if meta.seq + 1 < bounds.first_seq:
                log.warning(
                    "snapshot too old for the trimmed log; skipped",
                    extra={"snapshot": meta.name, "log_first_seq": bounds.first_seq},
                )
                break  # older ones are further behind still
            try:
                blob = await self.store.load(meta)
                raw = await asyncio.to_thread(zlib.decompress, blob)
                got = await asyncio.to_thread(install, raw)
                if got != meta.seq:
                    raise SnapshotCorrupt(f"{meta.name}: the image says sequence {got}, the meta {meta.seq}")
            except (SnapshotCorrupt, zlib.error, ValueError, OSError) as exc:
                self.failures += 1
                log.error("snapshot unusable; trying an older one", extra={"snapshot": meta.name, "error": str(exc)})
                continue
            self.last = meta
            log.info(
                "restored from snapshot",
                extra={"snapshot": meta.name, "store": self.store.name, "seq": meta.seq, "revision": meta.revision},
            )
            return meta.seq
        if bounds.first_seq > local_seq + 1:
            raise NoUsableSnapshot(
                f"the log starts at sequence {bounds.first_seq}, this replica has applied {local_seq}, and no "
                f"snapshot in the {self.store.name} store bridges the gap (see snapshot.store)"
            )
        return None

    # ---- take ---------------------------------------------------------------------------------

    def start(self) -> None:
        """Run the schedule in the background."""
        if self.cfg.every_entries or self.cfg.every_seconds:
            self._task = asyncio.create_task(self._run(), name=f"snapshots-{self.service}")

    async def stop(self) -> None:
        """Stop the schedule (a snapshot in progress is abandoned; the previous one stays)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def due(self, applied_seq: int) -> bool:
        """True when enough entries or time have passed since the last snapshot."""
        since = applied_seq - (self.last.seq if self.last else 0)
        if since <= 0:
            return False
        if self.cfg.every_entries and since >= self.cfg.every_entries:
            return True
        return bool(self.cfg.every_seconds) and time.monotonic() - self.last_taken_mono >= self.cfg.every_seconds

    async def _run(self) -> None:
        with contextlib.suppress(Exception):
            metas = await self.store.list(self.service)
            if metas and (self.last is None or metas[0].seq > self.last.seq):
                self.last = metas[0]
        while True:
            await asyncio.sleep(1.0)
            try:
                if self.store.shared and not self._is_leader():
                    continue
                if self.due(self._applied_seq()):
                    await self.take()
            except Exception as exc:
                self.failures += 1
                log.error("snapshot failed", extra={"error": repr(exc), "store": self.store.name})

    async def take(self) -> SnapshotMeta:
        """Take a snapshot now, save it, prune old ones, and (leader) trim the log behind them."""
        image = self._image()
        blob = await asyncio.to_thread(zlib.compress, image.data, 6)
        meta = make_meta(self.service, image.seq, image.revision, time.time(), self.node_id, blob)
        await self.store.save(meta, blob)
        self.last = meta
        self.last_taken_mono = time.monotonic()
        self.taken += 1
        kept = await self.store.prune(self.service, self.cfg.keep)
        if self.cfg.trim and self.store.durable and self._is_leader() and kept:
            await self._trim_behind(kept[-1].seq)
        return meta

    async def _trim_behind(self, oldest_kept: int) -> None:
        upto = min([oldest_kept, *await self._peers_applied()])
        if upto > self.trimmed_to:
            await self._trim(upto)
            self.trimmed_to = upto
            log.info("log trimmed", extra={"service": self.service, "through_seq": upto})

    def age(self) -> float | None:
        """Seconds since the newest snapshot this replica knows of was taken."""
        return None if self.last is None else max(0.0, time.time() - self.last.created_at)
