"""Snapshots of a log-fed state: when to take them, restoring the newest usable one, trimming the log behind them."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from app import failpoints
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
    """The stream's first and last sequence and how many messages it holds (empty: first = last + 1, or 0).

    log_id names the stream itself (JetStream's creation time): a stream deleted and created
    again, or a NATS that lost its store, is another log even where its sequences look alike.
    """

    first_seq: int
    last_seq: int
    messages: int
    log_id: str = ""


class NoUsableSnapshot(RuntimeError):
    """The log was trimmed past this replica and no snapshot can bridge the gap."""


class LogConflict(NoUsableSnapshot):
    """The log lost what a snapshot or this replica covers, and has been written again since."""


def needs_restore(local_seq: int, bounds: LogBounds) -> bool:
    """A replica restores when it has nothing (new or wiped) while the log does, or the log was trimmed past it."""
    return (local_seq == 0 and bounds.last_seq > 0) or bounds.first_seq > local_seq + 1


@dataclass(frozen=True)
class StartPlan:
    """What a starting replica does before it follows the log (see plan_start)."""

    local_seq: int  # the local state kept: 0 when there is none or it follows a log that is gone
    discard: bool = False  # the local file holds a gone log's state: empty it first
    log_lost: bool = False  # the log holds none of what the state or the newest snapshot covers


def plan_start(local_seq: int, local_log_id: str, bounds: LogBounds, newest_snapshot_seq: int) -> StartPlan:
    """Decide how a replica starts from its local state, the log's bounds and the store's newest snapshot.

    Sequences name log entries for good: the state at sequence S is the same on every replica
    and in every snapshot. So when the log's last sequence is below what this replica applied
    or the newest snapshot covers, the log lost entries (a lost data directory with the
    embedded nats-server, a stream deleted or re-created). An empty log is then continued:
    restore the newest state known, and move the stream's next sequence just past it, so the
    entries appended next apply on top of it and no sequence is given twice. A log that was
    written again meanwhile cannot be joined (LogConflict): two histories, an operator chooses.

    A local state recorded under another log (log_id) is dropped unless this log is untouched
    (the first replica back defines how the new log continues; the others restore from it).
    """
    discard = False
    untouched = bounds.messages == 0 and bounds.last_seq == 0
    if local_seq and local_log_id and bounds.log_id and local_log_id != bounds.log_id and not untouched:
        local_seq, discard = 0, True
    known = max(local_seq, newest_snapshot_seq)
    if bounds.last_seq >= known:
        return StartPlan(local_seq, discard)
    if bounds.messages == 0:
        return StartPlan(local_seq, discard, log_lost=True)
    what = "this replica's data" if local_seq >= newest_snapshot_seq else "the newest snapshot"
    raise LogConflict(
        f"the log holds sequences {bounds.first_seq}-{bounds.last_seq} but {what} covers sequence {known}: "
        "the log lost entries and has been written again since. To keep the log, move the newer snapshots "
        "out of the store and wipe this replica's data directory; to go back to a snapshot, stop every "
        "replica and run `fleetmate restore` (the log's entries are dropped)"
    )


def usable(meta: SnapshotMeta, bounds: LogBounds) -> bool:
    """A snapshot of this log, or of the log this one was continued from exactly after its sequence."""
    return not meta.log_id or not bounds.log_id or meta.log_id == bounds.log_id or meta.seq + 1 == bounds.first_seq


class LocalState(Protocol):
    """The replica's own copy of the state, as restore sees it (the registry's SQLite file)."""

    def applied_seq(self) -> int: ...
    def log_id(self) -> str: ...
    def set_log_id(self, log_id: str) -> None: ...
    def install(self, data: bytes) -> int: ...
    def reset(self) -> None: ...


@dataclass(frozen=True)
class Recovery:
    """What start-up did: the snapshot restored (if any) and where the log was continued (0: it was not)."""

    restored: SnapshotMeta | None = None
    continued_at: int = 0


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
        self.log_id = ""  # the log this replica follows (set by recover): recorded in every snapshot
        self._task: asyncio.Task[None] | None = None

    # ---- restore ------------------------------------------------------------------------------

    async def recover(
        self, local: LocalState, bounds: LogBounds, advance: Callable[[int], Awaitable[None]]
    ) -> Recovery:
        """Bring the local state to a point the log continues from, before the replica follows the log.

        Restores the newest usable snapshot when the log was trimmed past this replica or it has
        nothing; when the log lost what the state or the newest snapshot covers (see plan_start),
        restores that and calls advance(seq) so the stream's next sequence is seq + 1.
        """
        self.log_id = bounds.log_id
        metas = await self.store.list(self.service)
        local_seq, local_log = local.applied_seq(), local.log_id()
        plan = plan_start(local_seq, local_log, bounds, metas[0].seq if metas else 0)
        if plan.discard:
            log.warning(
                "this replica's data follows a log that is gone; dropping it",
                extra={"applied_seq": local_seq, "its_log": local_log, "log": bounds.log_id},
            )
            await asyncio.to_thread(local.reset)
        if not plan.log_lost:
            got = None
            if needs_restore(plan.local_seq, bounds):
                got = await self.restore(plan.local_seq, bounds, local.install, metas=metas)
            local.set_log_id(bounds.log_id)
            return Recovery(self.last if got is not None else None)
        # The log holds none of it: the newest snapshot (any log's: this log starts from it) or our own state.
        untouched = bounds.messages == 0 and bounds.last_seq == 0
        known = [m for m in metas if untouched or usable(m, bounds)]  # a new log starts from any snapshot
        got = await self.restore(plan.local_seq, LogBounds(0, 0, 0), local.install, metas=known, any_log=True)
        if got is None and known and known[0].seq > plan.local_seq:
            raise NoUsableSnapshot(
                f"the log {bounds.first_seq}-{bounds.last_seq} lost what the snapshots in the {self.store.name} "
                f"store cover (up to sequence {known[0].seq}) and none of them could be read"
            )
        base = plan.local_seq if got is None else got
        await advance(base)
        local.set_log_id(bounds.log_id)
        restored = self.last if got is not None else None
        log.warning(
            "the log had lost what this state covers; continuing it from "
            + ("the snapshot" if restored else "this replica's data"),
            extra={
                "service": self.service,
                "snapshot": restored.name if restored else "",
                "store": self.store.name,
                "source": self.store.describe(),
                "seq": base,
                "revision": restored.revision if restored else None,
                "log_last_seq": bounds.last_seq,
                "continues_at_seq": base + 1,
            },
        )
        return Recovery(restored, base + 1)

    async def restore(
        self,
        local_seq: int,
        bounds: LogBounds,
        install: Callable[[bytes], int],
        *,
        metas: list[SnapshotMeta] | None = None,
        any_log: bool = False,
    ) -> int | None:
        """Install the newest snapshot that the log can continue from; return its seq, or None to replay.

        install() receives the decompressed image, writes it in place of the local state and
        returns the sequence the installed state says it applied (checked against the meta).
        A corrupt or unreadable snapshot is reported and the next older one is tried; one taken
        on another log is skipped unless any_log (a lost log continued from it).
        """
        if metas is None:
            metas = await self.store.list(self.service)
        for meta in metas:
            if meta.seq <= local_seq:
                break  # nothing newer than what we have
            if not any_log and not usable(meta, bounds):
                log.info("snapshot of another log; skipped", extra={"snapshot": meta.name, "its_log": meta.log_id})
                continue
            if meta.seq + 1 < bounds.first_seq:
                log.warning(
                    "snapshot too old for the trimmed log; skipped",
                    extra={"snapshot": meta.name, "log_first_seq": bounds.first_seq},
                )
                break  # older ones are further behind still
            try:
                blob = await self.store.load(meta)
                raw = await asyncio.to_thread(zlib.decompress, blob)
                failpoints.hit("snapshot.restore")  # read and checked; the local state not touched yet
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
                extra={
                    "service": self.service,
                    "snapshot": meta.name,
                    "store": self.store.name,
                    "source": self.store.describe(),
                    "seq": meta.seq,
                    "revision": meta.revision,
                },
            )
            return meta.seq
        if bounds.first_seq > local_seq + 1:
            raise NoUsableSnapshot(
                f"the log starts at sequence {bounds.first_seq}, this replica has applied {local_seq}, and no "
                f"snapshot in the {self.store.name} store bridges the gap (see snapshot.store)"
            )
        return None

    # ---- take ---------------------------------------------------------------------------------

    def start(self, take_now: bool = False) -> None:
        """Run the schedule in the background; take_now: one snapshot at once, whoever leads (a continued log)."""
        scheduled = bool(self.cfg.every_entries or self.cfg.every_seconds)
        if take_now or scheduled:
            self._task = asyncio.create_task(self._run(take_now, scheduled), name=f"snapshots-{self.service}")

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

    async def _run(self, take_now: bool, scheduled: bool) -> None:
        if take_now and self.store.durable:
            # The log was continued from a snapshot or this replica's state: save it under this
            # log's id, so that other replicas (and this one, wiped) can restore into this log.
            try:
                await self.take()
            except Exception as exc:
                self.failures += 1
                log.error("snapshot failed", extra={"error": repr(exc), "store": self.store.name})
        if not scheduled:
            return
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
        meta = make_meta(self.service, image.seq, image.revision, time.time(), self.node_id, blob, self.log_id)
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
            failpoints.hit("log.trim")  # the snapshot is saved and the point chosen; nothing purged yet
            await self._trim(upto)
            self.trimmed_to = upto
            log.info("log trimmed", extra={"service": self.service, "through_seq": upto})

    async def take_at_stop(self, timeout: float) -> SnapshotMeta | None:
        """On a clean stop: a snapshot when this replica applied past the store's newest, within timeout seconds.

        Any replica does it, not only the leader: with a shared store the last one to stop has
        the most, and a replica behind the newest snapshot skips it. Skipped (and logged) when
        it does not finish in time, so a slow store never holds a shutdown up.
        """
        if timeout <= 0 or not self.store.durable:
            return None
        applied = self._applied_seq()
        try:
            async with asyncio.timeout(timeout):
                metas = await self.store.list(self.service)
                newest = metas[0].seq if metas else 0
                if applied <= newest:
                    log.info("no snapshot at stop: the newest covers what this replica applied", extra={"seq": newest})
                    return None
                meta = await self.take()
        except TimeoutError:
            log.warning(
                "snapshot at stop skipped: not done in time", extra={"timeout_s": timeout, "applied_seq": applied}
            )
            return None
        except Exception as exc:
            self.failures += 1
            log.error("snapshot at stop failed", extra={"error": repr(exc), "store": self.store.name})
            return None
        log.info(
            "snapshot taken at stop",
            extra={"service": self.service, "snapshot": meta.name, "seq": meta.seq, "revision": meta.revision},
        )
        return meta

    def age(self) -> float | None:
        """Seconds since the newest snapshot this replica knows of was taken."""
        return None if self.last is None else max(0.0, time.time() - self.last.created_at)
