"""ZooKeeper requests translated into registry calls, and results into jute replies.

ZkOps is one connection's translator: built from the registry's public API, the connection's
authenticated ids and its session id, and the connection's watches. It checks ACLs, builds each
write once (app/services/registry/commands.py: the path is validated there, once per write) and
hands it to the registry; the connection frames, orders and sends what it returns.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from app.errors import FleetmateError
from app.services.registry import paths
from app.services.registry.commands import (
    MultiOp,
    assemble_multi,
    build_check,
    build_create,
    build_delete,
    build_set,
    build_set_acl,
    now_ms,
)
from app.services.registry.errors import BadArguments, NoAuth, NoNode, RegistryError, Unimplemented
from app.services.registry.messages import (
    PERM_ADMIN,
    PERM_CREATE,
    PERM_DELETE,
    PERM_READ,
    PERM_WRITE,
    Create,
    Created,
    Updated,
)
from app.services.registry.service import RegistryService
from app.zk import auth
from app.zk import protocol as p
from app.zk.jute import Writer
from app.zk.watching import ZkWatches

log = logging.getLogger("fleetmate.zk")

WRITE_OPS = frozenset({p.CREATE, p.CREATE2, p.CREATE_CONTAINER, p.CREATE_TTL, p.DELETE, p.SET_DATA, p.SET_ACL, p.MULTI})
CREATE_OPS = frozenset({p.CREATE, p.CREATE2, p.CREATE_CONTAINER, p.CREATE_TTL})


class ZkOps:
    """Maps one connection's decoded requests to registry calls and their results to replies."""

    def __init__(
        self,
        registry: RegistryService,
        ids: list[tuple[str, str]],
        session_id: int,
        watches: ZkWatches,
    ) -> None:
        """ids: the connection's identities (auth packets add to the same list)."""
        self.registry = registry
        self.limits = registry.cfg
        self.ids = ids
        self.session_id = session_id
        self.watches = watches
        self._loop = asyncio.get_running_loop()

    # ---- replies --------------------------------------------------------------------------------

    def error_reply(self, xid: int, op: int, exc: Exception) -> bytes:
        """A reply header with ZooKeeper's code for a failed request (non-fleetmate errors raise)."""
        if isinstance(exc, RegistryError):
            return Writer().header(xid, self.registry.revision, exc.zk_code).frame()
        if isinstance(exc, FleetmateError):
            code = -7 if exc.status in (503, 504) else p.SYSTEM_ERROR
            log.warning("ZooKeeper request failed", extra={"op": op, "error": str(exc)})
            return Writer().header(xid, self.registry.revision, code).frame()
        raise exc

    def ok_reply(self, xid: int, out: Writer | bytes) -> bytes:
        """The framed reply to a request that succeeded (bytes: already framed)."""
        if isinstance(out, bytes):
            return out
        # Replies are built after the work, so the header's zxid includes the write itself.
        head = Writer().header(xid, self.registry.revision, p.OK)
        head.buf += out.buf[4:]
        return head.frame()

    async def answer(self, xid: int, op: int, req: Any) -> bytes:
        """The framed reply to a read or session request; errors become ZooKeeper's codes."""
        try:
            out = await self._read_op(xid, op, req)
        except Exception as exc:
            return self.error_reply(xid, op, exc)
        return self.ok_reply(xid, out)

    # ---- ACLs -----------------------------------------------------------------------------------

    def _require(self, path: str, perm: int, checked: str | None = None, allow_root: bool = True) -> None:
        """Raise NoNode or NoAuth unless the node grants perm. checked: a write's path, not yet
        validated: on a refusal it is validated first, so a bad path says so, as before the ACL."""
        node = self.registry.node(path)
        if node is None:
            if checked is not None:
                paths.validate(checked, self.limits.max_path_bytes, allow_root=allow_root)
            raise NoNode(f"no node {path}", path)
        if not auth.allowed(node.acl, perm, self.ids):
            if checked is not None:
                paths.validate(checked, self.limits.max_path_bytes, allow_root=allow_root)
            raise NoAuth(f"not authorised for {path}", path)

    def _path(self, path: str) -> str:
        return paths.validate(path, self.limits.max_path_bytes)

    # ---- writes ---------------------------------------------------------------------------------

    def start_write(self, xid: int, op: int, req: Any) -> asyncio.Future[Any]:
        """Check and queue a write; its future is done once applied (finish() makes the reply).

        create, setData and delete go to the log without a task of their own (a task per write
        cost more than the write's apply); setACL and multi run as tasks that produce the reply.
        """
        try:
            if op == p.SET_DATA:
                self._require(req.path, PERM_WRITE, req.path)
                return self.registry.submit_set(build_set(self.limits, req.path, req.data, req.version, now_ms()))
            if op == p.DELETE:
                self._require(paths.parent_of(req.path), PERM_DELETE, req.path, allow_root=False)
                return self.registry.submit_delete(build_delete(self.limits, req.path, req.version))
            if op in CREATE_OPS:
                if op == p.CREATE_CONTAINER and req.flags != p.CONTAINER:
                    req = p.CreateRequest(req.path, req.data, req.acl, p.CONTAINER)
                return self.registry.submit_create(self._create_cmd(req, now_ms()))
        except Exception as exc:
            failed: asyncio.Future[Any] = self._loop.create_future()
            failed.set_exception(exc)
            return failed
        return self._loop.create_task(self._write_op(xid, op, req))

    def finish(self, xid: int, op: int, fut: asyncio.Future[Any]) -> bytes:
        """The reply to a write whose future is done."""
        try:
            if isinstance(fut, asyncio.Task):  # setACL, multi: the task built the reply body
                return self.ok_reply(xid, fut.result())
            return self.ok_reply(xid, self._write_body(op, self.registry.settle(fut)))
        except Exception as exc:
            return self.error_reply(xid, op, exc)

    @staticmethod
    def _write_body(op: int, result: Any) -> Writer:
        if op == p.SET_DATA:
            return p.write_stat(Writer(), result.stat)
        if op == p.DELETE:
            return Writer()
        w = Writer().ustring(result.path)
        return p.write_stat(w, result.stat) if op != p.CREATE else w

    def _create_cmd(self, req: p.CreateRequest, now: int) -> Create:
        flags = p.CREATE_FLAGS.get(req.flags)
        if flags is None:
            raise Unimplemented(f"create mode {req.flags} is not supported", req.path)
        ephemeral, sequential, container, ttl = flags
        if ttl and req.ttl_ms <= 0:
            raise BadArguments("a TTL node needs a TTL above 0 ms (createTTL)", req.path)
        if req.ttl_ms and not ttl:
            raise BadArguments(f"create mode {req.flags} takes no TTL", req.path)
        if req.path == paths.ROOT and not sequential:
            raise BadArguments("the root node cannot be used here", req.path)
        checked = req.path + "0" if sequential else req.path
        self._require(paths.parent_of(req.path), PERM_CREATE, checked, allow_root=False)
        return build_create(
            self.limits,
            req.path,
            req.data,
            session_id=self.session_id if ephemeral else 0,
            sequential=sequential,
            container=container,
            acl=auth.resolve(req.acl, self.ids, req.path),
            ttl_ms=req.ttl_ms,
            now=now,
        )

    async def _write_op(self, xid: int, op: int, req: Any) -> Writer | bytes:
        """setACL and multi (create, setData and delete go through start_write)."""
        if op == p.SET_ACL:
            self._require(req.path, PERM_ADMIN, req.path)
            cmd = build_set_acl(self.limits, req.path, auth.resolve(req.acl, self.ids, req.path), req.version)
            updated = await self.registry.append_set_acl(cmd)
            return p.write_stat(Writer(), updated.stat)
        try:
            return await self._multi(req)
        except RegistryError as exc:
            if exc.failed_index < 0:
                raise
            return self._multi_failure(xid, exc, len(req.ops))

    async def _multi(self, req: p.MultiRequest) -> Writer:
        now = now_ms()
        ops: list[MultiOp] = []
        for index, (op, sub) in enumerate(req.ops):
            try:
                if op in CREATE_OPS:
                    ops.append(self._create_cmd(sub, now))
                elif op == p.DELETE:
                    self._require(paths.parent_of(sub.path), PERM_DELETE, sub.path, allow_root=False)
                    ops.append(build_delete(self.limits, sub.path, sub.version))
                elif op == p.SET_DATA:
                    if self.registry.exists(sub.path):
                        self._require(sub.path, PERM_WRITE, sub.path)
                    ops.append(build_set(self.limits, sub.path, sub.data, sub.version, now))
                else:
                    ops.append(build_check(self.limits, sub.path, sub.version))
            except RegistryError as err:
                err.failed_index = index
                raise
        done = await self.registry.append_multi(assemble_multi(self.limits, ops, now))
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
                self.watches.once(req.path, "data")
            return p.write_stat(Writer().buffer(data), stat)
        if op == p.EXISTS:
            self._path(req.path)
            if req.watch:
                self.watches.once(req.path, "data")
            return p.write_stat(Writer(), registry.stat_of(req.path))
        if op in (p.GET_CHILDREN, p.GET_CHILDREN2):
            self._path(req.path)
            self._require(req.path, PERM_READ)
            names = registry.child_names(req.path)
            if req.watch:
                self.watches.once(req.path, "children")
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
            self.watches.persistent(req.path, req.kind == p.ADD_WATCH_PERSISTENT_RECURSIVE)
            return Writer().int(p.OK)  # ZooKeeper answers addWatch with an ErrorResponse body
        if op in (p.REMOVE_WATCHES, p.CHECK_WATCHES):
            self._path(req.path)
            return self.watches.remove(req.path, req.kind, remove=op == p.REMOVE_WATCHES)
        if op in (p.SET_WATCHES, p.SET_WATCHES2):
            # The reply echoes the request's xid: kazoo sends -8, Java's client an ordinary xid
            # that it expects back in order.
            self.watches.set_watches(req)
            return Writer()
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
