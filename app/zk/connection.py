"""One ZooKeeper client connection: handshake, session, requests in FIFO order, watches, auth.

Order, as ZooKeeper promises it per session: writes go to the log in the order they arrive
(each is submitted before the next request is looked at) and their replies are sent in that
order once applied; a read waits until every earlier write of the session has been answered,
then reads the applied state and answers at once. Watch events are written while the log
applies, so a client always gets the event before any reply that shows the change.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from typing import TYPE_CHECKING, Any, Protocol

from app.aio import Signal
from app.errors import FleetmateError
from app.services.registry.errors import SessionExpired
from app.services.registry.messages import Event
from app.services.registry.service import RegistryService
from app.zk import auth
from app.zk import protocol as p
from app.zk.jute import JuteError, Writer
from app.zk.ops import WRITE_OPS, ZkOps
from app.zk.watching import ZkWatches

if TYPE_CHECKING:
    from app.node import Node
    from app.web.ratelimit import RateLimiter

log = logging.getLogger("fleetmate.zk")

MAX_IN_FLIGHT = 1024
CONNECT_TIMEOUT_S = 10.0


class Closing(Exception):
    """Stop serving this connection (after its reply, if any, was sent)."""


class Host(Protocol):
    """What a connection needs of its listener (ZkServer): the node, limits, counters, shared encodings."""

    node: Node
    max_packet: int
    limiter: RateLimiter | None
    received: int
    sent: int
    throttled: int
    connections: set[ZkConnection]

    def four_letter(self, word: bytes) -> bytes | None:
        """The answer to a four-letter word; None when `word` is not one."""
        ...

    def record(self, ms: float) -> None:
        """One request's time from dequeue to reply."""
        ...

    def encoded(self, event: Event) -> bytes:
        """The notification packet for an event, encoded once for every connection."""
        ...


class ZkConnection:
    """Serves one TCP connection until the client leaves, the session ends, or a packet is bad."""

    def __init__(self, server: Host, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername") or ("?", 0)
        self.peer = f"{peer[0]}:{peer[1]}"
        self.rate_key = f"a:{peer[0]}"  # the rate limit's client key, as an HTTP client without a token
        self.ids: list[tuple[str, str]] = [("ip", str(peer[0]))]
        self.session_id = 0
        self.timeout_ms = 0
        self.received = 0
        self.sent = 0
        self.started = time.time()
        self._replies: deque[tuple[int, int, asyncio.Future[Any], float]] = deque()
        self._loop = asyncio.get_running_loop()  # see app.aio: looked up once, not per request
        self._drained = Signal(self._loop)
        self._drained.set()
        self._wake = Signal(self._loop)
        self._out: list[bytes] = []
        self._flush_scheduled = False
        self._registry: RegistryService | None = None  # from the handshake on
        self._watches: ZkWatches | None = None
        self._ops: ZkOps | None = None
        self._last_keepalive = 0.0  # when activity was last forwarded to the leader
        self._last_activity = 0.0  # when the client last sent anything
        self._forward: asyncio.TimerHandle | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def registry(self) -> RegistryService:
        registry = self._registry if self._registry is not None else self.server.node.registry
        if registry is None:
            raise Closing("the registry is not running")
        return registry

    # ---- life cycle -----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection to its end; never raises."""
        reason = "client closed the connection"
        try:
            first = await asyncio.wait_for(self.reader.readexactly(4), CONNECT_TIMEOUT_S)
            answer = self.server.four_letter(first)
            if answer is not None:
                self._write(answer)
                reason = "four-letter word answered"
                return
            connect = await asyncio.wait_for(self._frame(first), CONNECT_TIMEOUT_S)  # all of it, not 4 bytes
            if self.server.limiter is not None:
                await self._throttle(self.server.limiter)
            await self._handshake(connect)
            self._tasks = [asyncio.create_task(self._reply_loop(), name="zk-replies")]
            reading = asyncio.create_task(self._read_loop(), name="zk-read")
            done, _ = await asyncio.wait({reading, *self._tasks}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                exc = task.exception()
                if isinstance(exc, Closing):
                    reason = str(exc)
                elif exc is not None and not isinstance(exc, asyncio.IncompleteReadError | ConnectionError):
                    raise exc
            reading.cancel()
        except (asyncio.IncompleteReadError, ConnectionError, TimeoutError):
            pass
        except Closing as exc:
            reason = str(exc)
        except JuteError as exc:
            reason = f"malformed packet: {exc}"
            log.warning("closing a ZooKeeper connection", extra={"peer": self.peer, "reason": reason})
        except Exception as exc:
            reason = f"internal error: {exc!r}"
            log.exception("ZooKeeper connection failed", extra={"peer": self.peer})
        finally:
            await self._cleanup(reason)

    async def _cleanup(self, reason: str) -> None:
        if self._forward is not None:
            self._forward.cancel()
            self._forward = None
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for _, _, pending, _ in self._replies:
            pending.cancel()
        if self._watches is not None:
            self._watches.close()
        with contextlib.suppress(Exception):
            self._flush()
            self.writer.close()
        log.debug("ZooKeeper connection closed", extra={"peer": self.peer, "reason": reason})

    async def _frame(self, head: bytes | None = None) -> bytes:
        if head is None:
            head = await self.reader.readexactly(4)
        size = int.from_bytes(head, "big", signed=True)
        if size < 0 or size > self.server.max_packet:
            raise JuteError(f"packet length {size} is outside 0..{self.server.max_packet}")
        return await self.reader.readexactly(size)

    def _write(self, data: bytes) -> None:
        # Everything written in one turn of the loop (replies, watch events) leaves in one send,
        # in the order written.
        self._out.append(data)
        self.sent += 1
        self.server.sent += 1
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_scheduled = False
        if self._out and not self.writer.is_closing():
            self.writer.write(self._out[0] if len(self._out) == 1 else b"".join(self._out))
        self._out.clear()

    async def _drain(self) -> None:
        self._flush()
        await self.writer.drain()

    # ---- handshake ------------------------------------------------------------------------------

    async def _handshake(self, data: bytes) -> None:
        req = p.read_connect(data)
        registry = self.registry
        if req.session_id == 0:
            password = os.urandom(p.PASSWORD_BYTES)
            opened = await registry.open_session(max(1, req.timeout_ms), password)
            self.session_id, self.timeout_ms = opened.session_id, opened.timeout_ms
        else:
            if req.last_zxid_seen > registry.revision:
                await registry.sync()  # the client saw more than this replica applied: catch up first
            if req.last_zxid_seen > registry.revision:
                raise Closing(f"client has seen revision {req.last_zxid_seen}, this replica {registry.revision}")
            record = registry.session_record(req.session_id)
            if record is None or record.password != req.password:
                self._write(p.connect_response(0, 0, bytes(p.PASSWORD_BYTES), req.read_only))
                await self._drain()
                raise Closing(f"session 0x{req.session_id:x} expired or the password does not match")
            password = record.password
            self.session_id, self.timeout_ms = record.session_id, record.timeout_ms
            await self._keepalive()
        self._registry = registry
        self._watches = ZkWatches(registry, self._write, self.server.encoded)
        self._ops = ZkOps(registry, self.ids, self.session_id, self._watches)
        self._write(p.connect_response(self.timeout_ms, self.session_id, password, req.read_only))
        self._last_keepalive = self._last_activity = time.monotonic()
        self.server.connections.add(self)
        log.debug("ZooKeeper session attached", extra={"peer": self.peer, "session": f"0x{self.session_id:x}"})

    async def _keepalive(self, last_active: float | None = None) -> None:
        try:
            await self.registry.keepalive(self.session_id, last_active)
        except SessionExpired:
            self._closing = True
            raise Closing(f"session 0x{self.session_id:x} expired") from None

    def _active(self) -> None:
        """The client sent something. Activity is forwarded to the leader at most every third of
        the timeout, and the last of it always is: a forward is due a third after the previous
        one, carrying the time of the latest activity, so a client that falls silent is expired
        no sooner than its timeout after its last request (ZooKeeper's promise)."""
        now = time.monotonic()
        self._last_activity = now
        if self._forward is not None:
            return  # a forward is scheduled and will carry this activity
        wait = self._last_keepalive + self.timeout_ms / 3000 - now
        if wait <= 0:
            self._send_keepalive()
        else:
            self._forward = self._loop.call_later(wait, self._send_keepalive)

    def _send_keepalive(self) -> None:
        self._forward = None
        if self._closing or self.writer.is_closing():
            return
        self._last_keepalive = time.monotonic()
        last_active = self._last_activity

        async def refresh() -> None:
            try:
                await self._keepalive(last_active)
            except Closing:
                self.writer.close()
            except FleetmateError as exc:
                log.debug("keepalive failed", extra={"session": f"0x{self.session_id:x}", "error": str(exc)})

        task = asyncio.create_task(refresh(), name="zk-keepalive")
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    # ---- the request pipeline -------------------------------------------------------------------

    async def _read_loop(self) -> None:
        # Requests are handled in the order read, without a queue between reading and handling:
        # a read that waits for earlier writes holds back reading, which is the back-pressure.
        registry, ops, server = self.registry, self._ops, self.server
        assert ops is not None  # set by the handshake
        start_write, answer, record = ops.start_write, ops.answer, server.record
        while True:
            data = await self._frame()
            self.received += 1
            server.received += 1
            xid, op, req = p.read_request(data)
            if not registry.has_session(self.session_id):
                raise Closing(f"session 0x{self.session_id:x} expired")
            self._active()
            if server.limiter is not None and op != p.PING:
                await self._throttle(server.limiter)
            if op in WRITE_OPS:
                if len(self._replies) >= MAX_IN_FLIGHT:
                    await self._drained.wait()
                started = time.perf_counter()
                self._replies.append((xid, op, start_write(xid, op, req), started))
                self._drained.clear()
                self._wake.set()
                continue
            if not self._drained.is_set():
                await self._drained.wait()
            if op == p.CLOSE_SESSION:
                await registry.close_session(self.session_id)
                self._write(Writer().header(xid, registry.revision, p.OK).frame())
                await self._drain()
                raise Closing("session closed by the client")
            started = time.perf_counter()
            try:
                out = await (self._auth(req) if op == p.AUTH else answer(xid, op, req))
            finally:
                record((time.perf_counter() - started) * 1000)
            self._write(out)

    async def _throttle(self, limiter: RateLimiter) -> None:
        """Wait until the rate limit admits one more request from this address.

        A ZooKeeper client has no "retry later" answer (an error code would reach the
        application as a failed call), so over the limit the connection is read more slowly, as
        ZooKeeper's own throttle does: the request waits, TCP pushes back on what follows, and a
        client that waits for each reply runs at the limit. The waiting request counts as the
        session's activity, so a throttled session does not expire.
        """
        wait = limiter.check(self.rate_key)
        if not wait:
            return
        self.server.throttled += 1
        while wait:
            await asyncio.sleep(min(wait, self.timeout_ms / 3000) if self.timeout_ms else wait)
            if self.session_id:
                self._active()
            wait = limiter.check(self.rate_key)

    async def _reply_loop(self) -> None:
        ops, record = self._ops, self.server.record
        assert ops is not None  # set by the handshake
        finish = ops.finish
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._replies:
                xid, op, fut, started = self._replies[0]
                if not fut.done():
                    with contextlib.suppress(Exception):  # finish() reads the outcome
                        await fut
                self._replies.popleft()
                try:
                    self._write(finish(xid, op, fut))
                finally:
                    record((time.perf_counter() - started) * 1000)
            self._drained.set()
            await self._drain()

    async def _auth(self, req: p.AuthRequest) -> bytes:
        """An auth packet: a digest identity joins self.ids (shared with ZkOps); anything else closes."""
        if req.scheme == "digest":
            text = req.auth.decode("utf-8", "replace")
            if ":" in text:
                ident = ("digest", auth.digest_id(text))
                if ident not in self.ids:
                    self.ids.append(ident)
                return Writer().header(p.XID_AUTH, self.registry.revision, p.OK).frame()
        # ZooKeeper answers a failed auth with AuthFailed and closes the connection.
        self._write(Writer().header(p.XID_AUTH, self.registry.revision, p.AUTH_FAILED).frame())
        await self._drain()
        raise Closing(f"authentication with scheme {req.scheme!r} failed")
