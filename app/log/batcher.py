"""The batcher: concurrent writes become one log entry, published at once when idle, else gathered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

from nats.errors import TimeoutError as NatsTimeout
from nats.js import JetStreamContext
from nats.js.errors import APIError

from app.aio import Signal

log = logging.getLogger("fleetmate.log")

C = TypeVar("C")

MSG_ID_HEADER = "Nats-Msg-Id"


class AppendError(RuntimeError):
    """The entry could not be appended; whether it reached the log is unknown after a timeout."""


class Pending:
    """The futures of one published entry, resolved by the applier when it applies that entry."""

    __slots__ = ("futures",)

    def __init__(self, futures: list[asyncio.Future[Any]]) -> None:
        self.futures = futures


class Batcher(Generic[C]):
    """Queues commands and publishes them as entries, one publish in flight at a time."""

    def __init__(
        self,
        js: JetStreamContext,
        subject: str,
        encode: Callable[[Sequence[C]], bytes],
        pending: dict[str, Pending],
        node_id: str,
        *,
        max_commands: int = 1024,
        max_bytes: int = 4 << 20,
        publish_timeout: float = 1.0,
        give_up_after: float = 9.0,
    ) -> None:
        self.js = js
        self.subject = subject
        self.encode = encode
        self.pending = pending
        self.max_commands = max_commands
        self.max_bytes = max_bytes
        # Short attempts, retried until give_up_after: an attempt sent to a NATS server that just
        # died (or to a stream whose leader is being elected) is abandoned after a second instead
        # of holding the log for five, so writes resume about a second after the new stream leader
        # exists. The msg id makes every retry of one entry count once.
        self.publish_timeout = publish_timeout
        self.give_up_after = give_up_after
        # Msg ids are unique per process run, so a retried publish is deduplicated by JetStream.
        self._prefix = f"{node_id}.{os.getpid()}.{os.urandom(4).hex()}."
        self._ids = itertools.count(1)
        self._queue: list[tuple[C, int, asyncio.Future[Any]]] = []
        self._wake = Signal()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.entries = 0
        self.commands = 0

    def start(self) -> None:
        """Start the flusher task."""
        self._loop = asyncio.get_running_loop()
        self._task = self._loop.create_task(self._run(), name=f"batcher-{self.subject}")

    async def stop(self) -> None:
        """Stop the flusher; queued commands fail."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, fut in self._queue:
            if not fut.done():
                fut.set_exception(AppendError("shutting down"))
        self._queue.clear()

    def submit(self, command: C, size: int) -> asyncio.Future[Any]:
        """Queue one command (size: its encoded size estimate); the future gets its apply result."""
        loop = self._loop or asyncio.get_running_loop()  # see app.aio: not once per command
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, size, fut))
        self._wake.set()
        return fut

    def _take(self) -> list[tuple[C, int, asyncio.Future[Any]]]:
        total = 0
        for i, (_, size, _) in enumerate(self._queue):
            total += size
            if i >= self.max_commands or (i > 0 and total > self.max_bytes):
                batch, self._queue = self._queue[:i], self._queue[i:]
                return batch
        batch, self._queue = self._queue, []
        return batch

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._queue:
                batch = self._take()
                live = [(c, f) for c, _, f in batch if not f.cancelled()]
                if live:
                    await self._publish(live)

    async def _publish(self, batch: list[tuple[C, asyncio.Future[Any]]]) -> None:
        msg_id = self._prefix + str(next(self._ids))
        payload = self.encode([c for c, _ in batch])
        self.pending[msg_id] = Pending([f for _, f in batch])
        headers = {MSG_ID_HEADER: msg_id}
        last: Exception | None = None
        loop = self._loop or asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_after
        attempt = 0
        while True:
            attempt += 1
            try:
                await self.js.publish(self.subject, payload, timeout=self.publish_timeout, headers=headers)
                self.entries += 1
                self.commands += len(batch)
                return
            except (NatsTimeout, TimeoutError, APIError, ConnectionError) as exc:
                last = exc
                if loop.time() >= deadline:
                    break
                log.warning("log append failed; retrying", extra={"attempt": attempt, "error": repr(exc)})
                await asyncio.sleep(min(0.05 * attempt, 0.25))
            except Exception as exc:  # the connection may be closing: fail these writers, keep the loop
                last = exc
                break
        # The entry may still have been stored (a lost ack): its writers cannot know, as with etcd.
        self.pending.pop(msg_id, None)
        for _, fut in batch:
            if not fut.done():
                fut.set_exception(AppendError(f"log append failed, outcome unknown: {last!r}"))
