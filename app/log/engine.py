"""The shared log: append through the batcher, apply every entry in order, answer writers, read barriers."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import sqlite3
import time
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import ConsumerConfig, DeliverPolicy, StorageType, StreamConfig, StreamInfo
from nats.js.errors import NotFoundError

from app import failpoints
from app.aio import Mailbox
from app.bus.connection import Bus
from app.bus.streams import ensure_stream
from app.log.batcher import MSG_ID_HEADER, Batcher
from app.log.pending import Pending, PendingWrites
from app.log.snapshots import LogBounds
from app.log.user import LogUser
from app.storage.diskspace import guard as disk_guard
from app.supervise import supervisor

log = logging.getLogger("fleetmate.log")

C = TypeVar("C")


class _StreamState(msgspec.Struct):
    last_seq: int = 0
    first_seq: int = 0


class _StreamInfo(msgspec.Struct):
    state: _StreamState = msgspec.field(default_factory=_StreamState)
    error: dict[str, Any] | None = None


_stream_info = msgspec.json.Decoder(_StreamInfo)


def stream_seq(msg: Msg) -> int:
    """The stream sequence of a message delivered by a JetStream consumer, read from its reply subject.

    `$JS.ACK.<stream>.<consumer>.<delivered>.<stream seq>...` (9 tokens), or with a domain and an
    account hash before the stream (12 or more); nats-py's msg.metadata parses every field into
    dataclasses and a datetime, which cost more than the rest of taking the entry in.
    """
    tokens = (msg.reply or "").split(".")
    if len(tokens) < 9 or tokens[0] != "$JS" or tokens[1] != "ACK":
        return msg.metadata.sequence.stream  # not a consumer delivery: nats-py raises its error
    return int(tokens[5] if len(tokens) == 9 else tokens[7])


def stream_config(stream: str, subject: str, replicas: int) -> StreamConfig:
    """The configuration of a log's stream (also declared by `fleetmate restore`)."""
    return StreamConfig(
        name=stream,
        subjects=[subject],
        storage=StorageType.FILE,
        num_replicas=replicas,
        duplicate_window=120.0,
        max_msg_size=8 << 20,
    )


def log_id(info: StreamInfo) -> str:
    """A stream's identity: its creation time (a stream deleted or lost and created again gets another)."""
    return info.created.isoformat() if info.created else ""


DEADLINE_SWEEP_S = 0.05
STALL_CHECK_S = 2.0  # how often the applier checks that its consumer still delivers
STALL_AFTER_S = 5.0  # nothing delivered this long while the stream has more: subscribe again
COMMIT_INTERVAL_S = 0.1
COMMIT_MAX_EVENTS = 20_000
COMMIT_RETRY_S = 1.0  # after a commit failed on the disk


class LogFailed(RuntimeError):
    """The applier stopped (an entry could not be applied): this replica cannot serve."""


class ApplyFailed(RuntimeError):
    """The result of a command the state machine raised on (a bug): the same on every replica,
    and the log goes on."""


class LogTrimmed(LogFailed):
    """The log was trimmed past what this replica applied."""


class _Gap(Exception):
    """The next entry delivered is not the one due: the applier asks the stream why before going on."""

    def __init__(self, expected: int, got: int, rest: list[Msg]) -> None:
        super().__init__(f"entry {expected} due, {got} delivered")
        self.expected = expected
        self.got = got
        self.rest = rest


class SharedLog(Generic[C]):
    """One JetStream stream as a replicated log feeding one state machine."""

    def __init__(
        self,
        bus: Bus,
        *,
        stream: str,
        subject: str,
        replicas: int,
        node_id: str,
        user: LogUser[C],
        applied_seq: int = 0,
        never_trimmed: bool = False,
    ) -> None:
        self.bus = bus
        self.stream = stream
        self.subject = subject
        self.replicas = replicas
        self.user = user
        self.applied_seq = applied_seq
        # A log nobody trims (the KV's partitions): entries missing at its head were lost too, not trimmed.
        self.never_trimmed = never_trimmed
        self.failed: str | None = None
        self._pending = PendingWrites()
        self.batcher: Batcher[C] = Batcher(bus.nc, subject, user.encode, self._pending, node_id)
        self._inbox: Mailbox[Msg] = Mailbox()
        self._task: asyncio.Task[None] | None = None
        self._sub: Any = None
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self.committed_seq = applied_seq
        self._uncommitted_events: list[Any] = []
        self._commit_timer: asyncio.TimerHandle | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._barrier_next: asyncio.Future[int] | None = None
        self._barrier_task: asyncio.Task[None] | None = None
        self.applied_entries = 0
        self.applied_commands = 0
        self.apply_seconds = 0.0
        self._delivered_at = time.monotonic()
        self._watchdog: asyncio.Task[None] | None = None
        self._stalled_at = -1  # the applied sequence at which the watchdog first saw a stall
        self.resubscribed = 0

    async def prepare(self) -> LogBounds:
        """Declare the stream (idempotent) and return its bounds, so a caller can restore first."""
        await ensure_stream(self.bus.js, stream_config(self.stream, self.subject, self.replicas))
        return await self.bounds(patience=15.0)

    async def start(self) -> None:
        """Subscribe from the next unapplied sequence and start applying (call prepare() first)."""
        bounds = await self.prepare()
        if bounds.first_seq > self.applied_seq + 1 and not self.never_trimmed:
            raise LogFailed(
                f"stream {self.stream} starts at {bounds.first_seq} but this replica applied only "
                f"{self.applied_seq}: it needs a snapshot"
            )
        await self._subscribe()
        self._task = supervisor.watch(
            asyncio.create_task(self._apply_loop(), name=f"applier-{self.stream}"), f"the applier of {self.stream}"
        )
        self._watchdog = asyncio.create_task(self._watch_consumer(), name=f"consumer-watchdog-{self.stream}")
        self.batcher.start()
        log.info("log started", extra={"stream": self.stream, "from_seq": self.applied_seq + 1})

    async def _subscribe(self) -> None:
        """An ordered consumer from the next unapplied sequence."""
        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.ALL)
        if self.applied_seq:
            cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=self.applied_seq + 1)
        self._delivered_at = time.monotonic()
        self._sub = await self.bus.js.subscribe(
            self.subject,
            stream=self.stream,
            cb=self._receive,
            ordered_consumer=True,
            # The ordered consumer lives on the stream leader: when that server dies, missed heartbeats
            # are how it notices and re-creates itself elsewhere, so keep them frequent.
            idle_heartbeat=0.5,
            config=cfg,
        )

    async def _watch_consumer(self) -> None:
        """Subscribe again when the consumer stopped delivering while the stream has entries not applied.

        nats-py re-creates an ordered consumer after missed heartbeats, but its watch task ends on an
        unexpected error (seen after a NATS server was killed under load): this replica would then
        stop applying the log for good, reads would time out and writes never be answered.
        """
        while True:
            await asyncio.sleep(STALL_CHECK_S)
            if time.monotonic() - self._delivered_at < STALL_AFTER_S or not self._inbox.empty() or self.failed:
                continue
            try:
                reply = await self.bus.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", b"", timeout=5.0)
                last = _stream_info.decode(reply.data).state.last_seq
            except Exception as exc:  # NATS itself is away: nothing to do until it answers
                log.debug("consumer check could not read the stream", extra={"stream": self.stream, "error": repr(exc)})
                continue
            if last <= self.applied_seq:
                self._delivered_at = time.monotonic()  # idle, not stalled
                self._stalled_at = -1
                continue
            if self._stalled_at != self.applied_seq:  # seen once: look again before acting (it may be waking up)
                self._stalled_at = self.applied_seq
                continue
            log.warning(
                "log consumer stalled; subscribing again",
                extra={"stream": self.stream, "applied_seq": self.applied_seq, "last_seq": last},
            )
            old, self._sub = self._sub, None
            if old is not None:
                with contextlib.suppress(Exception):
                    await old.unsubscribe()
            self._stalled_at = -1
            try:
                await self._subscribe()
                self.resubscribed += 1
            except Exception as exc:
                log.warning("subscribing again failed; trying later", extra={"stream": self.stream, "error": repr(exc)})

    async def stop(self) -> None:
        """Stop appending and applying."""
        await self.batcher.stop()
        for task in (self._task, self._barrier_task, self._sweeper, self._watchdog):
            if task:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception as exc:  # the connection may already be closed
                log.debug("unsubscribe failed", extra={"error": str(exc)})
        if not self.failed:
            self.flush_commit()

    # ---- append -------------------------------------------------------------------------------

    async def append(self, command: C, size: int = 64, timeout: float = 10.0) -> Any:
        """Append one command and return its apply result once this replica has applied it.

        Raises TimeoutError after `timeout` seconds (the entry may still be applied later).
        """
        return await self.submit(command, size, timeout)

    def submit(self, command: C, size: int = 64, timeout: float = 10.0) -> asyncio.Future[Any]:
        """The synchronous half of append(): queue the command; the future gets its apply result.

        For callers that keep many writes in flight without a task each (the ZooKeeper port):
        the future fails with TimeoutError after `timeout` seconds, or with AppendError.
        """
        if self.failed:
            raise LogFailed(self.failed)
        # Deadlines are kept per log entry and swept every DEADLINE_SWEEP_S, instead of a timer
        # per write: at tens of thousands of writes a second, asyncio.timeout() alone cost ~4% of
        # the loop, and a heap of every write's deadline ~3%.
        fut = self.batcher.submit(command, size, time.monotonic() + timeout)
        if self._sweeper is None or self._sweeper.done():
            self._sweeper = asyncio.create_task(self._sweep_deadlines(), name=f"deadlines-{self.stream}")
        return fut

    async def _sweep_deadlines(self) -> None:
        while self._pending or self.batcher.queued:
            await asyncio.sleep(DEADLINE_SWEEP_S)
            now = time.monotonic()
            self._pending.expire(now)
            self.batcher.expire(now)

    # ---- apply --------------------------------------------------------------------------------

    async def _receive(self, msg: Msg) -> None:
        self._delivered_at = time.monotonic()
        self._inbox.put_nowait(msg)

    async def _apply_loop(self) -> None:
        while True:
            batch = [await self._inbox.get()]
            while not self._inbox.empty():
                batch.append(self._inbox.get_nowait())
            try:
                while batch:
                    try:
                        self._apply_batch(batch)
                        batch = []
                    except _Gap as gap:
                        await self._skip_lost(gap)  # LogTrimmed when the log was trimmed past this replica
                        batch = gap.rest
            except Exception as exc:
                # The supervisor logs it with its traceback and ends the process: a restart
                # restores a snapshot (LogTrimmed) or replays from the last commit.
                self.failed = f"applier stopped at sequence {self.applied_seq + 1}: {exc!r}"
                self._pending.fail_all(LogFailed(self.failed))
                raise

    async def _skip_lost(self, gap: _Gap) -> None:
        """Entries missing inside the stream were lost by the server before it stored them (a failed disk
        write; nobody was told they were appended): skip them. Missing because the stream now starts
        after them (trimmed behind a snapshot): this replica must restore one (LogTrimmed)."""
        reply = await self.bus.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", b"", timeout=5.0)
        info = _stream_info.decode(reply.data)
        if info.error is not None or (info.state.first_seq > gap.expected and not self.never_trimmed):
            raise LogTrimmed(
                f"entry {gap.expected} is gone (next in the log: {gap.got}); restart to restore a snapshot"
            )
        log.warning(
            "entries missing inside the log (lost by the server before it stored them); skipping them",
            extra={"stream": self.stream, "from_seq": gap.expected, "to_seq": gap.got - 1},
        )
        self.applied_seq = gap.got - 1

    def _apply_batch(self, batch: list[Msg]) -> None:
        started = time.perf_counter()
        answered: list[tuple[Pending, list[Any]]] = []
        all_events: list[Any] = []
        last = self.applied_seq
        user = self.user
        apply = user.apply
        begin_entry = getattr(user, "begin_entry", None)  # a machine that needs each entry's position
        gap: _Gap | None = None
        for i, msg in enumerate(batch):
            seq = stream_seq(msg)
            if seq <= last:
                continue  # redelivery after a consumer reset
            if seq != last + 1:
                # Stream sequences are contiguous unless the log was trimmed (entries this replica
                # never applied are gone: restore a snapshot) or the server lost entries it never
                # stored: what was applied so far is settled below, then the applier asks the stream.
                gap = _Gap(last + 1, seq, batch[i:])
                break
            failpoints.hit("log.apply")
            try:
                commands = user.decode(msg.data)
            except Exception as exc:  # every replica skips the same undecodable entry
                log.error("skipping an undecodable log entry", extra={"seq": seq, "error": str(exc)})
                commands = ()
            results = []
            if begin_entry is not None:
                begin_entry(seq)
            for cmd in commands:
                try:
                    result, events = apply(cmd)
                except Exception as exc:  # a machine must not raise; if it does, only this command fails
                    log.exception("a command failed to apply", extra={"seq": seq})
                    result, events = ApplyFailed(f"{type(cmd).__name__} could not be applied: {exc!r}"), []
                results.append(result)
                all_events.extend(events)
            last = seq
            self.applied_entries += 1
            self.applied_commands += len(commands)
            msg_id = (msg.headers or {}).get(MSG_ID_HEADER)
            if msg_id is not None:
                pending = self._pending.take(msg_id)
                if pending is not None:
                    answered.append((pending, results))
        if last == self.applied_seq:
            if gap is not None:
                raise gap
            return
        self._uncommitted_events.extend(all_events)
        self.applied_seq = last
        self._schedule_commit()
        for pending, results in answered:
            pending.answer(results)
        if all_events:
            user.applied(all_events)
        while self._waiters and self._waiters[0][0] <= last:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
        self.apply_seconds += time.perf_counter() - started
        if gap is not None:
            raise gap

    def _schedule_commit(self) -> None:
        # The SQLite file is a cache of the applied state for a fast restart (the log is the
        # truth): committing at most every COMMIT_INTERVAL_S (etcd's backend batch interval is
        # 100 ms too) instead of after every applied batch saves most of the commit cost under
        # load (a node set many times is written once), and a crash only replays the entries
        # applied since the last commit (apply is deterministic, so it reaches the same state).
        if len(self._uncommitted_events) >= COMMIT_MAX_EVENTS:
            self.flush_commit()
        elif self._commit_timer is None:
            self._commit_timer = asyncio.get_running_loop().call_later(COMMIT_INTERVAL_S, self.flush_commit)

    def flush_commit(self) -> None:
        """Write what was applied since the last commit (state rows, events, applied sequence)."""
        if self._commit_timer is not None:
            self._commit_timer.cancel()
            self._commit_timer = None
        if self.applied_seq > self.committed_seq:
            events = self._uncommitted_events
            try:
                self.user.commit(self.applied_seq, events)
            except (OSError, sqlite3.Error) as exc:
                # A full or failing disk: the applied state stays in memory (the log holds it too),
                # nothing is dropped, client writes are refused until there is room, and the
                # commit is tried again with whatever is applied by then.
                disk_guard.write_failed(self.stream, exc)
                self._commit_timer = asyncio.get_running_loop().call_later(COMMIT_RETRY_S, self.flush_commit)
                return
            self._uncommitted_events = []
            self.committed_seq = self.applied_seq

    # ---- reads --------------------------------------------------------------------------------

    async def wait_applied(self, seq: int, timeout: float = 10.0) -> None:
        """Return once this replica has applied sequence seq."""
        if self.applied_seq >= seq:
            return
        if self.failed:
            raise LogFailed(self.failed)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), fut))
        await asyncio.wait_for(fut, timeout)

    async def barrier(self, timeout: float = 10.0) -> None:
        """Linearizable read point: learn the log's last sequence (one round trip shared by every
        read waiting now), then wait until this replica has applied that far."""
        if self._barrier_next is None:
            self._barrier_next = asyncio.get_running_loop().create_future()
        fut = self._barrier_next
        if self._barrier_task is None or self._barrier_task.done():
            self._barrier_task = asyncio.create_task(self._barrier_rounds(), name="read-barrier")
        seq = await asyncio.wait_for(asyncio.shield(fut), timeout)
        await self.wait_applied(seq, timeout)

    async def _barrier_rounds(self) -> None:
        # A read must be answered by a round that *started* after it arrived; reads arriving
        # during a round wait for the next one.
        while self._barrier_next is not None:
            fut, self._barrier_next = self._barrier_next, None
            try:
                # The raw API call, decoding only state.last_seq: nats-py's stream_info() builds
                # the whole config as dataclasses, which cost more than the round trip itself.
                reply = await self.bus.nc.request(f"$JS.API.STREAM.INFO.{self.stream}", b"", timeout=5.0)
                info = _stream_info.decode(reply.data)
                if info.error is not None:
                    raise LogFailed(f"stream info failed: {info.error}")
                fut.set_result(info.state.last_seq)
            except Exception as exc:
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: every waiter may have timed out already

    async def trim(self, through_seq: int) -> None:
        """Delete the log's entries up to and including through_seq (a snapshot covers them)."""
        await self.bus.js.purge_stream(self.stream, seq=through_seq + 1)

    async def bounds(self, patience: float = 0.0) -> LogBounds:
        """The stream's current first and last sequence.

        With patience, "not found" and timeouts are retried that long: right after an R3
        stream is created its own leader may not be elected yet, and a server that has not
        heard of the stream answers 404 (seen on a fresh 3-server cluster).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while True:
            try:
                info = await self.bus.js.stream_info(self.stream)
                return LogBounds(info.state.first_seq, info.state.last_seq, info.state.messages, log_id(info))
            except (NotFoundError, TimeoutError, NatsTimeout) as exc:
                if loop.time() >= deadline:
                    raise
                log.info("stream not answering yet; retrying", extra={"stream": self.stream, "error": repr(exc)})
                await asyncio.sleep(0.25)

    def stats(self) -> dict[str, float]:
        """Counters for /metrics."""
        return {
            "applied_seq": self.applied_seq,
            "applied_entries": self.applied_entries,
            "applied_commands": self.applied_commands,
            "appended_entries": self.batcher.entries,
            "appended_commands": self.batcher.commands,
            "apply_seconds": self.apply_seconds,
        }
