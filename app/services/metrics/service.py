"""The metrics service: the points stream, this replica's consumer into DuckDB, publish, queries, figures.

Every replica (and every worker) keeps its own DuckDB file and reads the whole stream, as it reads
the registry log. It does so through its own durable pull consumer, `metrics-<node_id>`, with
AckPolicy.ALL: a batch of messages is fetched, written to DuckDB together with the last stream
sequence in one transaction, and only then is its last message acknowledged. The sequence stored in
DuckDB, not the consumer's ack floor, is the truth on restart: the consumer is re-created to start
right after it, so a message redelivered after a crash (committed but not acknowledged) is skipped,
and one never committed is delivered again: every acknowledged point is stored exactly once. A
durable consumer (rather than an ordered one) lets the server redeliver what a stalled replica did
not acknowledge and shows each replica's backlog in `nats consumer info`.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import logging
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import msgspec
from nats.aio.msg import Msg
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, DiscardPolicy, StorageType, StreamConfig
from nats.js.errors import APIError, FetchTimeoutError, NotFoundError
from opentelemetry import propagate
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from app import __version__
from app.bus.connection import Bus
from app.bus.micro import Endpoint, HandlerError, start_service
from app.bus.streams import ensure_stream
from app.config import MetricsConfig
from app.services.metrics.errors import BadPoints, MetricsUnavailable
from app.services.metrics.messages import (
    INGEST_SUBJECT,
    POINTS_SUBJECTS,
    SERVICE_NAME,
    STREAM,
    IngestReply,
    MetricsStats,
    Point,
    PointFrame,
    QueryReply,
    SeriesList,
    decode_points_json,
    decode_stream_payload,
    encode_frame,
    frames_from_points,
    subject_for,
)
from app.services.metrics.query import Query, make_query, parse_labels
from app.services.metrics.store import MetricsStore
from app.storage.diskspace import DiskFull
from app.storage.diskspace import guard as disk_guard
from app.supervise import supervisor

log = logging.getLogger("fleetmate.metrics")

T = TypeVar("T")

FETCH_MESSAGES = 64  # messages asked for per pull request (a batch overshoots batch_points by one fetch at most)
MAX_BATCH_MESSAGES = 20_000  # a batch closes at this many messages even when they hold few points
MAX_ACK_PENDING = 100_000  # must exceed what the fetcher holds while the writer commits (two batches)
ACK_WAIT_S = 60.0
INACTIVE_S = 86400.0  # a consumer whose replica is gone this long is removed by the server
MESSAGE_POINTS = 30_000  # points per stream message: 16 bytes each, well under NATS's 1 MB payload
MAINTAIN_EVERY_S = 5.0
IDLE_CHECK_FETCHES = 50  # empty fetches (flush_interval each) between checks that the consumer exists
PUBLISH_TIMEOUT_S = 5.0
_ingest_reply = msgspec.json.Encoder()


class _Batch(msgspec.Struct):
    frames: list[PointFrame]
    last_seq: int
    messages: int
    ack: Msg | None


class MetricsService:
    """Ingest from the points stream into this replica's DuckDB store; publish and query for API callers."""

    def __init__(self, bus: Bus, cfg: MetricsConfig, node_id: str, data_dir: Path, replicas: int = 1) -> None:
        self.bus = bus
        self.cfg = cfg
        self.node_id = node_id
        self.replicas = replicas
        path = Path(cfg.path).expanduser() if cfg.path else data_dir / "metrics.duckdb"
        self.store = MetricsStore(path, cfg)
        self.consumer = f"metrics-{node_id}"
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-duckdb")
        self._queue: asyncio.Queue[_Batch] = asyncio.Queue(maxsize=1)
        self._tasks: list[asyncio.Task[None]] = []
        self._psub: Any = None
        self._service: Any = None
        self._waiters: list[tuple[int, int, asyncio.Future[None]]] = []
        self._tiebreak = itertools.count()
        self.committed_seq = 0
        self._seen_seq = 0
        self._pending_after = 0  # stream messages after the last one fetched (from its metadata)
        self._idle_fetches = 0
        self.points = 0
        self.messages = 0
        self.batches = 0
        self.rejected = 0
        self.dropped = 0
        self.commit_seconds = 0.0
        self.failed: str | None = None
        self.running = False

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking store call on the store's own thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    # ---- life cycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store, declare the stream, (re)create this replica's consumer, start the tasks."""
        await self._run(self.store.open)
        self.committed_seq = self._seen_seq = self.store.last_seq
        await ensure_stream(
            self.bus.js,
            StreamConfig(
                name=STREAM,
                subjects=[POINTS_SUBJECTS],
                storage=StorageType.FILE,
                num_replicas=self.replicas,
                max_bytes=self.cfg.stream_max_bytes,
                max_age=self.cfg.raw_retention,
                discard=DiscardPolicy.OLD,
                duplicate_window=120.0,
            ),
        )
        try:
            await self._subscribe()
        except (TimeoutError, NatsTimeout, APIError) as exc:
            # The stream's leader may still be in election (its NATS server just died): the
            # fetch loop keeps trying; the rest of the node need not wait for it.
            log.warning("metrics consumer not created yet; retrying in the background", extra={"error": repr(exc)})
        self._service = await start_service(
            self.bus.nc,
            name=SERVICE_NAME,
            version=__version__,
            description="fleetmate metrics ingest",
            endpoints=[Endpoint("ingest", INGEST_SUBJECT, self._ingest_request, queue_group=SERVICE_NAME)],
            metadata={"node_id": self.node_id},
        )
        self.running = True
        self._tasks = [
            supervisor.watch(asyncio.create_task(self._fetch_loop(), name="metrics-fetch"), "metrics fetch"),
            supervisor.watch(asyncio.create_task(self._write_loop(), name="metrics-write"), "metrics write"),
            supervisor.watch(asyncio.create_task(self._maintain_loop(), name="metrics-maintain"), "metrics upkeep"),
        ]
        log.info(
            "metrics started",
            extra={"path": str(self.store.path), "from_seq": self.committed_seq + 1, "consumer": self.consumer},
        )

    async def _subscribe(self) -> None:
        """Create this replica's consumer afresh, starting right after the sequence DuckDB holds."""
        js = self.bus.js
        with contextlib.suppress(NotFoundError):
            await js.delete_consumer(STREAM, self.consumer)
        info = await js.stream_info(STREAM)
        start = self.committed_seq + 1
        if info.state.first_seq > start and info.state.last_seq >= start:
            log.warning(
                "metrics stream no longer holds messages this replica never stored (retention or max_bytes)",
                extra={"missing_from": start, "missing_to": info.state.first_seq - 1},
            )
        config = ConsumerConfig(
            durable_name=self.consumer,
            deliver_policy=DeliverPolicy.BY_START_SEQUENCE if self.committed_seq else DeliverPolicy.ALL,
            opt_start_seq=start if self.committed_seq else None,
            ack_policy=AckPolicy.ALL,
            ack_wait=ACK_WAIT_S,
            max_ack_pending=MAX_ACK_PENDING,
            inactive_threshold=INACTIVE_S,
        )
        await js.add_consumer(STREAM, config)
        self._psub = await js.pull_subscribe_bind(durable=self.consumer, stream=STREAM)

    async def stop(self) -> None:
        """Stop consuming (what is not committed is delivered again next time) and close the store."""
        self.running = False
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        if self._psub is not None:
            with contextlib.suppress(Exception):
                await self._psub.unsubscribe()
        await self._run(self.store.close)
        self._executor.shutdown(wait=True)
        for _, _, fut in self._waiters:
            if not fut.done():
                fut.set_exception(MetricsUnavailable("the metrics service stopped"))
        log.info("metrics stopped", extra={"committed_seq": self.committed_seq})

    # ---- consume ---------------------------------------------------------------------------------

    async def _fetch_loop(self) -> None:
        while True:
            if self._psub is None:
                await self._resubscribe()
                continue
            try:
                batch = await self._gather()
            except asyncio.CancelledError:
                raise
            except NotFoundError:
                log.warning("metrics consumer vanished; re-creating it", extra={"from_seq": self.committed_seq + 1})
                await self._resubscribe()
                continue
            except Exception as exc:
                log.warning("metrics fetch failed; retrying", extra={"error": repr(exc)})
                await asyncio.sleep(0.5)
                continue
            if batch is not None:
                await self._queue.put(batch)

    async def _resubscribe(self) -> None:
        # Wait for the writer to commit what was handed over, so the new consumer starts after it.
        await self._queue.join()
        self._seen_seq = self.committed_seq
        try:
            await self._subscribe()
        except Exception as exc:
            log.warning("metrics consumer could not be re-created; retrying", extra={"error": repr(exc)})
            await asyncio.sleep(1.0)

    async def _gather(self) -> _Batch | None:
        """Fetch until batch_points points, MAX_BATCH_MESSAGES messages or flush_interval after the first."""
        loop = asyncio.get_running_loop()
        frames: list[PointFrame] = []
        points = messages = 0
        last: Msg | None = None
        deadline: float | None = None
        while points < self.cfg.batch_points and messages < MAX_BATCH_MESSAGES:
            wait = self.cfg.flush_interval if deadline is None else deadline - loop.time()
            if wait <= 0.001:
                break
            try:
                msgs = await self._psub.fetch(batch=FETCH_MESSAGES, timeout=wait)
            except (TimeoutError, NatsTimeout, FetchTimeoutError):
                if last is not None:
                    break
                self._idle_fetches += 1
                if self._idle_fetches % IDLE_CHECK_FETCHES == 0:
                    # A pull on a consumer that is gone just times out: ask now and then (NotFoundError
                    # makes the fetch loop re-create it).
                    await self.bus.js.consumer_info(STREAM, self.consumer)
                continue
            except Exception:
                if last is not None:
                    # Hand over what was gathered (the sequences are already counted as seen); the
                    # error comes back on the next fetch.
                    break
                raise
            self._idle_fetches = 0
            for msg in msgs:
                meta = msg.metadata
                seq = meta.sequence.stream
                last = msg
                self._pending_after = meta.num_pending
                if seq <= self._seen_seq:
                    continue  # redelivered: already stored, or already in this batch
                self._seen_seq = seq
                messages += 1
                try:
                    got = decode_stream_payload(msg.data)
                except BadPoints as exc:
                    self.rejected += 1
                    log.warning(
                        "metrics message rejected", extra={"seq": seq, "subject": msg.subject, "error": exc.message}
                    )
                    continue
                frames.append(got)
                points += len(got)
            if deadline is None and last is not None:
                deadline = loop.time() + self.cfg.flush_interval
        if last is None:
            return None
        return _Batch(frames, self._seen_seq, messages, last)

    async def _write_loop(self) -> None:
        while True:
            batch = await self._queue.get()
            if batch.last_seq > self.committed_seq:
                while True:
                    started = time.perf_counter()
                    try:
                        result = await self._run(self.store.append, batch.frames, batch.last_seq)
                        break
                    except Exception as exc:  # disk full, I/O error: keep the batch and try again
                        if isinstance(exc, OSError | duckdb.IOException):
                            disk_guard.write_failed("the metrics store", exc)
                        self.failed = f"metrics store append failed: {exc!r}"
                        log.error("metrics append failed; retrying", extra={"error": repr(exc)})
                        await asyncio.sleep(1.0)
                self.failed = None
                self.commit_seconds += time.perf_counter() - started
                self.committed_seq = batch.last_seq
                self.points += result.points
                self.dropped += result.dropped
                self.messages += batch.messages
                self.batches += 1
                if result.dropped:
                    log.warning("points older than the raw floor were dropped", extra={"points": result.dropped})
                self._wake(batch.last_seq)
            if batch.ack is not None:
                try:
                    await batch.ack.ack()  # AckPolicy.ALL: acknowledges every message up to this one
                except Exception as exc:  # not fatal: a redelivery is skipped by its sequence
                    log.info("metrics ack failed", extra={"error": repr(exc)})
            self._queue.task_done()

    async def _maintain_loop(self) -> None:
        while True:
            await asyncio.sleep(MAINTAIN_EVERY_S)
            try:
                done = await self._run(self.store.maintain)
                if any(done.values()):
                    log.debug("metrics maintenance", extra=done)
            except Exception as exc:
                log.error("metrics maintenance failed", extra={"error": repr(exc)})

    def _wake(self, seq: int) -> None:
        while self._waiters and self._waiters[0][0] <= seq:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)

    async def wait_committed(self, seq: int, timeout: float = 10.0) -> None:
        """Return once this replica's store holds stream sequence seq."""
        if self.committed_seq >= seq:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._tiebreak), fut))
        await asyncio.wait_for(fut, timeout)

    # ---- publish ----------------------------------------------------------------------------------

    async def publish(self, points: Sequence[Point]) -> IngestReply:
        """Validate points, publish them to the stream, and answer after the stream acknowledged them."""
        if not self.running:
            raise MetricsUnavailable("the metrics service is not running")
        disk_guard.check_writable()  # DiskFull (503) while the data directory is short of space
        frames = frames_from_points(points, MESSAGE_POINTS)
        payloads = [encode_frame(frame) for frame in frames]
        for payload in payloads:
            decode_stream_payload(payload)  # the consumer's own checks, so nothing bad gets in at all
        count = sum(len(f) for f in frames)
        seq = 0
        subject = subject_for(self.node_id)
        for payload in payloads:
            headers = {"Nats-Msg-Id": uuid.uuid4().hex}
            propagate.inject(headers)
            for attempt in range(3):
                try:
                    ack = await self.bus.js.publish(
                        subject, payload, timeout=PUBLISH_TIMEOUT_S, stream=STREAM, headers=headers
                    )
                    break
                except (TimeoutError, NatsTimeout):
                    # Same Nats-Msg-Id: a retry of a publish that did land is dropped as a duplicate.
                    if attempt == 2:
                        raise MetricsUnavailable("the metrics stream did not acknowledge in time") from None
            seq = ack.seq
        return IngestReply(count, seq, len(payloads))

    async def _ingest_request(self, data: bytes) -> bytes:
        """Bus endpoint: JSON points in, JSON IngestReply out (typed error 400 on bad points)."""
        try:
            reply = await self.publish(decode_points_json(data))
        except BadPoints as exc:
            raise HandlerError("400", exc.message) from None
        except (MetricsUnavailable, DiskFull) as exc:
            raise HandlerError("503", exc.message) from None
        return _ingest_reply.encode(reply)

    # ---- read ---------------------------------------------------------------------------------------

    async def query(
        self,
        series: str,
        labels: str | None = None,
        start: str | None = None,
        end: str | None = None,
        step: str | None = None,
        agg: str = "avg",
    ) -> QueryReply:
        """Check the parameters (BadQuery) and downsample the matching series."""
        q = make_query(series, labels, start, end, step, agg, time.time())
        return await self.run_query(q)

    async def run_query(self, q: Query) -> QueryReply:
        """Answer a checked query from this replica's store."""
        if not self.running:
            raise MetricsUnavailable("the metrics service is not running")
        results = await self._run(self.store.query, q)
        return QueryReply(q.series, q.agg, q.step, q.start, q.end, results)

    async def series(self, name: str | None = None, labels: str | None = None) -> SeriesList:
        """Known series and label sets."""
        if not self.running:
            raise MetricsUnavailable("the metrics service is not running")
        conditions = parse_labels(labels)
        return SeriesList(await self._run(self.store.series, name, conditions))

    def lag(self) -> int:
        """Stream messages this replica has not committed yet."""
        return self._pending_after + max(0, self._seen_seq - self.committed_seq)

    async def stats(self) -> MetricsStats:
        """Ingest counters and table sizes."""
        raw, rollup = await self._run(self.store.counts) if self.running else (0, 0)
        return MetricsStats(
            enabled=True,
            points=self.points,
            messages=self.messages,
            batches=self.batches,
            rejected_messages=self.rejected,
            dropped_points=self.dropped,
            last_seq=self.committed_seq,
            lag=self.lag(),
            series=self.store.series_count,
            raw_rows=raw,
            rollup_rows=rollup,
            rolled_through=self.store.rolled_through / 1000,
            raw_floor=self.store.raw_floor / 1000,
            error=self.failed,
        )


def prometheus_families(svc: MetricsService) -> Iterator[Metric]:
    """The ingest figures for /metrics (read at scrape time)."""
    for name, value, help_text in (
        ("points", svc.points, "Points stored in this replica's metrics store"),
        ("messages", svc.messages, "Stream messages ingested"),
        ("batches", svc.batches, "DuckDB commits of ingested batches"),
        ("rejected_messages", svc.rejected, "Stream messages skipped as malformed"),
        ("dropped_points", svc.dropped, "Points dropped as older than the raw floor"),
        ("commit_seconds", svc.commit_seconds, "Seconds spent writing batches to DuckDB"),
    ):
        yield CounterMetricFamily(f"fleetmate_metrics_ingest_{name}", help_text, value=float(value))
    yield GaugeMetricFamily(
        "fleetmate_metrics_ingest_last_seq", "Last stream sequence stored in DuckDB", float(svc.committed_seq)
    )
    yield GaugeMetricFamily("fleetmate_metrics_ingest_lag", "Stream messages not yet stored here", float(svc.lag()))
