"""The batcher: concurrent writes become one log entry, published at once when idle, else gathered."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout
from nats.js.errors import APIError

from app import failpoints
from app.aio import Signal
from app.log.pending import PendingWrites
from app.supervise import supervisor

log = logging.getLogger("fleetmate.log")

C = TypeVar("C")

MSG_ID_HEADER = "Nats-Msg-Id"
_STATUS_HEADER = "Status"  # a status message from the server, e.g. 503: no stream takes the subject


class _PubAck(msgspec.Struct):
    """JetStream's answer to a publish: where the entry landed, or why it did not."""

    seq: int = 0
    duplicate: bool = False
    error: dict[str, Any] | None = None


_pub_ack = msgspec.json.Decoder(_PubAck)


def _expire(fut: asyncio.Future[Msg]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError("no acknowledgement from JetStream in time"))


class AppendError(RuntimeError):
    """The entry could not be appended; whether it reached the log is unknown after a timeout."""


class UnencodableCommand(ValueError):
    """This command cannot be written to the log (a value the codec cannot carry): it fails
    alone, before anything is published, and the commands batched with it go on."""


def expire_queued(queue: list[tuple[Any, int, asyncio.Future[Any], float]], now: float) -> None:
    """Fail the queued (not yet published) commands whose deadline has passed."""
    for _, _, fut, deadline in queue:
        if deadline <= now and not fut.done():
            fut.set_exception(TimeoutError("the write was not applied in time"))


class Batcher(Generic[C]):
    """Queues commands and publishes them as entries, one publish in flight at a time."""

    def __init__(
        self,
        nc: Client,
        subject: str,
        encode: Callable[[Sequence[C]], bytes],
        pending: PendingWrites,
        node_id: str,
        *,
        max_commands: int = 1024,
        max_bytes: int = 4 << 20,
        publish_timeout: float = 1.0,
        give_up_after: float = 9.0,
    ) -> None:
        self.nc = nc
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
        # Acknowledgements come to one inbox subscription, each attempt on its own subject.
        self._acks: dict[str, asyncio.Future[Msg]] = {}
        self._tokens = itertools.count(1)  # one subject token per attempt (no dots: the inbox is prefix.*)
        self._ack_prefix = ""
        self._queue: list[tuple[C, int, asyncio.Future[Any], float]] = []
        self._wake = Signal()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self.entries = 0
        self.commands = 0

    def start(self) -> None:
        """Start the flusher task."""
        self._loop = asyncio.get_running_loop()
        self._task = supervisor.watch(
            self._loop.create_task(self._run(), name=f"batcher-{self.subject}"), f"the log writer of {self.subject}"
        )

    async def stop(self) -> None:
        """Stop the flusher; queued commands fail."""
        if self._task:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for _, _, fut, _ in self._queue:
            if not fut.done():
                fut.set_exception(AppendError("shutting down"))
        self._queue.clear()

    def submit(self, command: C, size: int, deadline: float = math.inf) -> asyncio.Future[Any]:
        """Queue one command (size: its encoded size estimate; deadline: when it times out, on
        time.monotonic()); the future gets its apply result."""
        loop = self._loop or asyncio.get_running_loop()  # see app.aio: not once per command
        fut: asyncio.Future[Any] = loop.create_future()
        self._queue.append((command, size, fut, deadline))
        self._wake.set()
        return fut

    def expire(self, now: float) -> None:
        """Fail the queued commands whose deadline has passed (the log's deadline sweep calls this)."""
        expire_queued(self._queue, now)

    @property
    def queued(self) -> int:
        """Commands waiting to be published."""
        return len(self._queue)

    def _take(self) -> list[tuple[C, int, asyncio.Future[Any], float]]:
        total = 0
        for i, (_, size, _, _) in enumerate(self._queue):
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
                live = [(c, f, d) for c, _, f, d in batch if not f.done()]  # cancelled or timed out
                if not live:
                    continue
                try:
                    await self._publish(live)
                except Exception as exc:  # one entry's failure never stops the writer
                    log.exception("log append failed unexpectedly; its writers get an error")
                    for _, fut, _ in live:
                        if not fut.done():
                            fut.set_exception(AppendError(f"log append failed: {exc!r}"))

    async def _append_once(self, payload: bytes, headers: dict[str, str], token: str) -> None:
        """One publish of an entry and its acknowledgement (raises on a timeout or a refusal).

        What js.publish() does, without what costs most per entry at load: a random token per
        request, asyncio.wait_for(), and the acknowledgement parsed into dataclasses.
        """
        loop = self._loop or asyncio.get_running_loop()
        if not self._ack_prefix:
            prefix = self.nc.new_inbox() + "."
            await self.nc.subscribe(prefix + "*", cb=self._on_ack)
            self._ack_prefix = prefix
        fut: asyncio.Future[Msg] = loop.create_future()
        self._acks[token] = fut
        timer = loop.call_later(self.publish_timeout, _expire, fut)
        try:
            await self.nc.publish(self.subject, payload, reply=self._ack_prefix + token, headers=headers)
            reply = await fut
        finally:
            timer.cancel()
            self._acks.pop(token, None)
        if reply.headers and reply.headers.get(_STATUS_HEADER) == "503":
            raise NoRespondersError
        ack = _pub_ack.decode(reply.data)
        if ack.error is not None:
            raise APIError.from_error(ack.error)

    async def _on_ack(self, msg: Msg) -> None:
        fut = self._acks.get(msg.subject[len(self._ack_prefix) :])
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _encode(self, batch: list[tuple[C, asyncio.Future[Any], float]]) -> bytes | None:
        """The entry's bytes; a command the codec refuses is failed alone (UnencodableCommand) and
        removed from batch, so the others are published. None when nothing is left."""
        try:
            return self.encode([c for c, _, _ in batch])
        except Exception:
            pass
        kept = []
        for item in batch:
            try:
                self.encode([item[0]])
            except Exception as exc:
                log.warning("a command cannot be written to the log", extra={"error": repr(exc)})
                if not item[1].done():
                    item[1].set_exception(UnencodableCommand(f"the command cannot be written to the log: {exc}"))
            else:
                kept.append(item)
        batch[:] = kept
        return self.encode([c for c, _, _ in kept]) if kept else None

    async def _publish(self, batch: list[tuple[C, asyncio.Future[Any], float]]) -> None:
        payload = self._encode(batch)
        if payload is None:
            return
        msg_id = self._prefix + str(next(self._ids))
        self.pending.register(msg_id, [f for _, f, _ in batch], [d for _, _, d in batch])
        headers = {MSG_ID_HEADER: msg_id}
        last: Exception | None = None
        loop = self._loop or asyncio.get_running_loop()
        deadline = loop.time() + self.give_up_after
        attempt = 0
        while True:
            attempt += 1
            try:
                failpoints.hit("log.before_append")
                await self._append_once(payload, headers, str(next(self._tokens)))
                failpoints.hit("log.after_append")  # stored in the log, not applied nor answered yet
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
        self.pending.forget(msg_id)
        for _, fut, _ in batch:
            if not fut.done():
                fut.set_exception(AppendError(f"log append failed, outcome unknown: {last!r}"))
