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
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from app.aio import Signal
from app.errors import FleetmateError
from app.services.registry import paths
from app.services.registry.errors import (
    BadArguments,
    NoAuth,
    NoNode,
    RegistryError,
    SessionExpired,
    Unimplemented,
)
from app.services.registry.messages import (
    PERM_ADMIN,
    PERM_CREATE,
    PERM_DELETE,
    PERM_READ,
    PERM_WRITE,
    Check,
    Create,
    Created,
    Delete,
    Event,
    SetData,
    Updated,
)
from app.services.registry.service import RegistryService
from app.services.registry.view import OneShotKind, Subscription
from app.zk import auth
from app.zk import protocol as p
from app.zk.jute import JuteError, Writer

if TYPE_CHECKING:
    from app.web.ratelimit import RateLimiter
    from app.zk.server import ZkServer

log = logging.getLogger("fleetmate.zk")

WRITE_OPS = frozenset({p.CREATE, p.CREATE2, p.CREATE_CONTAINER, p.CREATE_TTL, p.DELETE, p.SET_DATA, p.SET_ACL, p.MULTI})
MAX_IN_FLIGHT = 1024
CONNECT_TIMEOUT_S = 10.0


class NoWatcher(RegistryError):
    """removeWatches/checkWatches found no such watch."""

    code = "NoWatcher"
    zk_code = -121
    status = 404


class Closing(Exception):
    """Stop serving this connection (after its reply, if any, was sent)."""


class ZkConnection:
    """Serves one TCP connection until the client leaves, the session ends, or a packet is bad."""

    def __init__(self, server: ZkServer, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
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
        self._one_shot: dict[tuple[str, str], int] = {}  # (path, "data"|"children") -> hub handle
        self._persistent: dict[tuple[str, bool], Subscription] = {}
        self._last_event: Event | None = None
        self._last_keepalive = 0.0  # when activity was last forwarded to the leader
        self._last_activity = 0.0  # when the client last sent anything
        self._forward: asyncio.TimerHandle | None = None
        self._closing = False
        self._tasks: list[asyncio.Task[Any]] = []

    @property
    def registry(self) -> RegistryService:
        registry = self.server.node.registry
        if registry is None:
            raise Closing("the registry is not running")
        return registry

    # ---- life cycle -----------------------------------------------------------------------------

    async def serve(self) -> None:
        """Run the connection to its end; never raises."""
        reason = "client closed the connection"
        try:
            first = await asyncio.wait_for(self.reader.readexactly(4), CONNECT_TIMEOUT_S)
            if first in self.server.four_letter_words.known:
                self._write(self.server.four_letter_words.answer(first.decode(), self.server))
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
        registry = self.server.node.registry
        if registry is not None:
            for (path, kind), handle in self._one_shot.items():
                registry.cancel_once(path, "exists" if kind == "data" else "children", handle)
        for sub in self._persistent.values():
            sub.close()
        self._one_shot.clear()
        self._persistent.clear()
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
        while True:
            data = await self._frame()
            self.received += 1
            self.server.received += 1
            xid, op, req = p.read_request(data)
            if not self.registry.has_session(self.session_id):
                raise Closing(f"session 0x{self.session_id:x} expired")
            self._active()
            if self.server.limiter is not None and op != p.PING:
                await self._throttle(self.server.limiter)
            if op in WRITE_OPS:
                if len(self._replies) >= MAX_IN_FLIGHT:
                    await self._drained.wait()
                self._replies.append(self._start_write(xid, op, req))
                self._drained.clear()
                self._wake.set()
                continue
            if not self._drained.is_set():
                await self._drained.wait()
            if op == p.CLOSE_SESSION:
                await self.registry.close_session(self.session_id)
                self._write(Writer().header(xid, self.registry.revision, p.OK).frame())
                await self._drain()
                raise Closing("session closed by the client")
            self._write(await self._guard(xid, op, self._read_op(xid, op, req)))

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
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._replies:
                xid, op, fut, started = self._replies[0]
                if not fut.done():
                    with contextlib.suppress(Exception):  # _finish() reads the outcome
                        await fut
                self._replies.popleft()
                self._write(self._finish(xid, op, fut, started))
            self._drained.set()
            await self._drain()

    async def _guard(self, xid: int, op: int, work: Awaitable[Writer | bytes]) -> bytes:
        """Run one request; turn its errors into a reply header with ZooKeeper's code."""
        started = time.perf_counter()
        try:
            out = await work
        except Exception as exc:
            return self._error_reply(xid, op, exc)
        finally:
            self.server.record((time.perf_counter() - started) * 1000)
        return self._ok_reply(xid, out)

    def _error_reply(self, xid: int, op: int, exc: Exception) -> bytes:
        if isinstance(exc, RegistryError):
            return Writer().header(xid, self.registry.revision, exc.zk_code).frame()
        if isinstance(exc, FleetmateError):
            code = -7 if exc.status in (503, 504) else p.SYSTEM_ERROR
            log.warning("ZooKeeper request failed", extra={"op": op, "error": str(exc)})
            return Writer().header(xid, self.registry.revision, code).frame()
        raise exc

    def _ok_reply(self, xid: int, out: Writer | bytes) -> bytes:
        if isinstance(out, bytes):
            return out
        # Replies are built after the work, so the header's zxid includes the write itself.
        head = Writer().header(xid, self.registry.revision, p.OK)
        head.buf += out.buf[4:]
        return head.frame()

    def _start_write(self, xid: int, op: int, req: Any) -> tuple[int, int, asyncio.Future[Any], float]:
        """Check and queue a write; the reply loop answers it, in order, once its future is done.

        create, setData and delete go to the log without a task of their own (a task per write
        cost more than the write's apply); setACL and multi run as tasks that produce the reply.
        """
        started = time.perf_counter()
        try:
            if op == p.SET_DATA:
                self._path(req.path)
                self._require(req.path, PERM_WRITE)
                return xid, op, self.registry.submit_set(req.path, req.data, req.version), started
            if op == p.DELETE:
                self._path(req.path, allow_root=False)
                self._require(paths.parent_of(req.path), PERM_DELETE)
                return xid, op, self.registry.submit_delete(req.path, req.version), started
            if op in (p.CREATE, p.CREATE2, p.CREATE_CONTAINER, p.CREATE_TTL):
                if op == p.CREATE_CONTAINER and req.flags != p.CONTAINER:
                    req = p.CreateRequest(req.path, req.data, req.acl, p.CONTAINER)
                cmd = self._create_cmd(req)
                fut = self.registry.submit_create(
                    cmd.path,
                    cmd.data,
                    session_id=cmd.session_id,
                    sequential=cmd.sequential,
                    container=cmd.container,
                    acl=cmd.acl,
                    ttl_ms=cmd.ttl_ms,
                )
                return xid, op, fut, started
        except Closing:
            raise
        except Exception as exc:
            failed: asyncio.Future[Any] = self._loop.create_future()
            failed.set_exception(exc)
            return xid, op, failed, started
        return xid, op, self._loop.create_task(self._write_op(xid, op, req)), started

    def _finish(self, xid: int, op: int, fut: asyncio.Future[Any], started: float) -> bytes:
        """The reply to a write whose future is done."""
        try:
            if isinstance(fut, asyncio.Task):  # setACL, multi: the task built the reply body
                return self._ok_reply(xid, fut.result())
            return self._ok_reply(xid, self._write_body(op, self.registry.settle(fut)))
        except Closing:
            raise
        except Exception as exc:
            return self._error_reply(xid, op, exc)
        finally:
            self.server.record((time.perf_counter() - started) * 1000)

    @staticmethod
    def _write_body(op: int, result: Any) -> Writer:
        if op == p.SET_DATA:
            return p.write_stat(Writer(), result.stat)
        if op == p.DELETE:
            return Writer()
        w = Writer().ustring(result.path)
        return p.write_stat(w, result.stat) if op != p.CREATE else w

    # ---- ACLs -----------------------------------------------------------------------------------

    def _require(self, path: str, perm: int) -> None:
        node = self.registry.node(path)
        if node is None:
            raise NoNode(f"no node {path}", path)
        if not auth.allowed(node.acl, perm, self.ids):
            raise NoAuth(f"not authorised for {path}", path)

    def _path(self, path: str, allow_root: bool = True) -> str:
        return paths.validate(path, self.registry.cfg.max_path_bytes, allow_root=allow_root)

    # ---- writes ---------------------------------------------------------------------------------

    def _create_cmd(self, req: p.CreateRequest) -> Create:
        flags = p.CREATE_FLAGS.get(req.flags)
        if flags is None:
            raise Unimplemented(f"create mode {req.flags} is not supported", req.path)
        ephemeral, sequential, container, ttl = flags
        if ttl and req.ttl_ms <= 0:
            raise BadArguments("a TTL node needs a TTL above 0 ms (createTTL)", req.path)
        if req.ttl_ms and not ttl:
            raise BadArguments(f"create mode {req.flags} takes no TTL", req.path)
        self._path(req.path + ("0" if sequential else ""), allow_root=False)
        self._require(paths.parent_of(req.path), PERM_CREATE)
        acl = auth.resolve(req.acl, self.ids, req.path)
        owner = self.session_id if ephemeral else 0
        return Create(req.path, req.data, owner, sequential, container, False, acl, 0, req.ttl_ms)

    async def _write_op(self, xid: int, op: int, req: Any) -> Writer | bytes:
        """setACL and multi (create, setData and delete go through _start_write)."""
        registry = self.registry
        if op == p.SET_ACL:
            self._path(req.path)
            self._require(req.path, PERM_ADMIN)
            updated = await registry.set_acl(req.path, auth.resolve(req.acl, self.ids, req.path), req.version)
            return p.write_stat(Writer(), updated.stat)
        try:
            return await self._multi(req)
        except RegistryError as exc:
            if exc.failed_index < 0:
                raise
            return self._multi_failure(xid, exc, len(req.ops))

    async def _multi(self, req: p.MultiRequest) -> Writer:
        ops: list[Create | SetData | Delete | Check] = []
        for index, (op, sub) in enumerate(req.ops):
            try:
                if op in (p.CREATE, p.CREATE2, p.CREATE_CONTAINER, p.CREATE_TTL):
                    ops.append(self._create_cmd(sub))
                elif op == p.DELETE:
                    self._path(sub.path, allow_root=False)
                    self._require(paths.parent_of(sub.path), PERM_DELETE)
                    ops.append(Delete(sub.path, sub.version))
                elif op == p.SET_DATA:
                    self._path(sub.path)
                    if self.registry.exists(sub.path):
                        self._require(sub.path, PERM_WRITE)
                    ops.append(SetData(sub.path, sub.data, sub.version))
                else:
                    self._path(sub.path)
                    ops.append(Check(sub.path, sub.version))
            except RegistryError as err:
                err.failed_index = index
                raise
        done = await self.registry.multi(ops)
        w = Writer()
        for (op, _), result in zip(req.ops, done.results, strict=True):
            w.int(op).bool(False).int(p.OK)
            if op == p.CREATE:
                assert isinstance(result, Created)
                w.ustring(result.path)
            elif op in (p.CREATE2, p.CREATE_CONTAINER, p.CREATE_TTL):
                assert isinstance(result, Created)
                p.write_stat(w.ustring(result.path), result.stat)
            elif op == p.SET_DATA:
                assert isinstance(result, Updated)
                p.write_stat(w, result.stat)
        return w.int(-1).bool(True).int(-1)

    def _multi_failure(self, xid: int, exc: RegistryError, count: int) -> bytes:
        # ZooKeeper's shape: ops before the failing one report OK, the failing one its code,
        # the rest RuntimeInconsistency; each as an error result. The reply header says OK: the
        # failure is in the results (clients read them and raise per operation).
        w = Writer().header(xid, self.registry.revision, p.OK)
        for index in range(count):
            code = p.OK if index < exc.failed_index else exc.zk_code
            if index > exc.failed_index:
                code = p.RUNTIME_INCONSISTENCY
            w.int(p.ERROR).bool(False).int(code).int(code)
        return w.int(-1).bool(True).int(-1).frame()

    # ---- reads and session requests -------------------------------------------------------------

    async def _read_op(self, xid: int, op: int, req: Any) -> Writer | bytes:
        registry = self.registry
        if op == p.PING:
            return Writer().header(p.XID_PING, registry.revision, p.OK).frame()
        if op == p.GET_DATA:
            self._path(req.path)
            self._require(req.path, PERM_READ)
            data, stat = registry.read(req.path)
            if req.watch:
                self._watch_once(req.path, "data")
            return p.write_stat(Writer().buffer(data), stat)
        if op == p.EXISTS:
            self._path(req.path)
            if req.watch:
                self._watch_once(req.path, "data")
            return p.write_stat(Writer(), registry.stat_of(req.path))
        if op in (p.GET_CHILDREN, p.GET_CHILDREN2):
            self._path(req.path)
            self._require(req.path, PERM_READ)
            names = registry.child_names(req.path)
            if req.watch:
                self._watch_once(req.path, "children")
            w = Writer().strings(names)
            return p.write_stat(w, registry.stat_of(req.path)) if op == p.GET_CHILDREN2 else w
        if op == p.SYNC:
            self._path(req.path)
            await registry.sync()
            return Writer().ustring(req.path)
        if op == p.GET_ACL:
            # As ZooKeeper: READ or ADMIN to see the ACL; without ADMIN, digest hashes are hidden.
            self._path(req.path)
            self._require(req.path, PERM_READ | PERM_ADMIN)
            acl, stat = await registry.get_acl(req.path, linearizable=False)
            if not auth.allowed(acl, PERM_ADMIN, self.ids):
                acl = auth.hide_digests(acl)
            return p.write_stat(p.write_acl(Writer(), acl), stat)
        if op == p.CHECK:
            self._path(req.path)
            registry.check_version(req.path, req.version)
            return Writer()
        if op == p.MULTI_READ:
            return self._multi_read(xid, req)
        if op == p.GET_EPHEMERALS:
            prefix = req.path or "/"
            mine = [x for x in registry.ephemerals(self.session_id) if x.startswith(prefix)]
            return Writer().strings(mine)
        if op == p.GET_ALL_CHILDREN_NUMBER:
            self._path(req.path)
            return Writer().int(registry.count_descendants(req.path))
        if op == p.ADD_WATCH:
            self._path(req.path)
            if req.kind not in (p.ADD_WATCH_PERSISTENT, p.ADD_WATCH_PERSISTENT_RECURSIVE):
                raise Unimplemented(f"addWatch mode {req.kind} is not supported", req.path)
            self._watch_persistent(req.path, req.kind == p.ADD_WATCH_PERSISTENT_RECURSIVE)
            return Writer().int(p.OK)  # ZooKeeper answers addWatch with an ErrorResponse body
        if op in (p.REMOVE_WATCHES, p.CHECK_WATCHES):
            self._path(req.path)
            return self._remove_watches(req.path, req.kind, remove=op == p.REMOVE_WATCHES, xid=xid)
        if op in (p.SET_WATCHES, p.SET_WATCHES2):
            # The reply echoes the request's xid: kazoo sends -8, Java's client an ordinary xid
            # that it expects back in order.
            self._set_watches(req)
            return Writer()
        if op == p.AUTH:
            return await self._auth(req)
        if op == p.WHO_AM_I:
            w = Writer().int(len(self.ids))
            for scheme, ident in self.ids:
                w.ustring(scheme).ustring(ident.split(":", 1)[0] if scheme == "digest" else ident)
            return w
        raise Unimplemented(f"op code {op} is not supported")

    def _multi_read(self, xid: int, req: p.MultiRequest) -> bytes:
        registry = self.registry
        w = Writer().header(xid, registry.revision, p.OK)
        for op, sub in req.ops:
            try:
                self._path(sub.path)
                self._require(sub.path, PERM_READ)
                if op == p.GET_DATA:
                    data, stat = registry.read(sub.path)
                    p.write_stat(w.int(op).bool(False).int(p.OK).buffer(data), stat)
                else:
                    w.int(op).bool(False).int(p.OK).strings(registry.child_names(sub.path))
            except RegistryError as exc:
                w.int(p.ERROR).bool(False).int(exc.zk_code).int(exc.zk_code)
        return w.int(-1).bool(True).int(-1).frame()

    async def _auth(self, req: p.AuthRequest) -> bytes:
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

    # ---- watches --------------------------------------------------------------------------------

    def _notify(self, event: Event) -> None:
        # One notification per event per connection, however many of its watches match
        # (ZooKeeper's server counts a connection once; the client fans out locally).
        if event is self._last_event:
            return
        self._last_event = event
        self._write(self.server.encoded(event))

    def _watch_once(self, path: str, kind: str) -> None:
        key = (path, kind)
        if key in self._one_shot:
            return

        def fired(event: Event) -> None:
            self._one_shot.pop(key, None)
            self._notify(event)

        hub_kind: OneShotKind = "exists" if kind == "data" else "children"
        self._one_shot[key] = self.registry.watch_once(path, hub_kind, fired)

    def _watch_persistent(self, path: str, recursive: bool) -> None:
        key = (path, recursive)
        if key not in self._persistent:
            self._persistent[key] = self.registry.subscribe(path, recursive, callback=self._notify)

    def _remove_watches(self, path: str, kind: int, *, remove: bool, xid: int) -> Writer:
        kinds = {p.WATCH_CHILDREN: ["children"], p.WATCH_DATA: ["data"], p.WATCH_ANY: ["data", "children"]}.get(kind)
        if kinds is None:
            raise Unimplemented(f"watcher type {kind} is not supported", path)
        found = [(path, k) for k in kinds if (path, k) in self._one_shot]
        persistent = [key for key in self._persistent if key[0] == path] if kind == p.WATCH_ANY else []
        if not found and not persistent:
            raise NoWatcher(f"no watch of type {kind} on {path}", path)
        if remove:
            for key in found:
                handle = self._one_shot.pop(key)
                self.registry.cancel_once(path, "exists" if key[1] == "data" else "children", handle)
            for pkey in persistent:
                self._persistent.pop(pkey).close()
        return Writer()

    def _set_watches(self, req: p.SetWatchesRequest) -> None:
        # After a reconnect: fire at once what changed since the client's last zxid (ZooKeeper's rules).
        registry = self.registry
        rel = req.relative_zxid
        fired: list[tuple[int, str]] = []
        for path in req.data:
            node = registry.node(path)
            if node is None:
                fired.append((p.EV_DELETED, path))
            elif node.mzxid > rel:
                fired.append((p.EV_CHANGED, path))
            else:
                self._watch_once(path, "data")
        for path in req.exist:
            if registry.exists(path):
                fired.append((p.EV_CREATED, path))
            else:
                self._watch_once(path, "data")
        for path in req.child:
            node = registry.node(path)
            if node is None:
                fired.append((p.EV_DELETED, path))
            elif node.pzxid > rel:
                fired.append((p.EV_CHILDREN, path))
            else:
                self._watch_once(path, "children")
        for path in req.persistent:
            self._watch_persistent(path, False)
        for path in req.persistent_recursive:
            self._watch_persistent(path, True)
        for event_type, path in fired:
            self._write(p.notification(registry.revision, event_type, path))
