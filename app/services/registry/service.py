"""The registry's public Python API: validate, append to the shared log, read the applied state, watch."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import msgspec
from nats.aio.subscription import Subscription as NatsSubscription
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from app.bus import codec, subjects
from app.bus.connection import Bus
from app.bus.micro import HandlerError, call, serve_every_subscriber
from app.config import RegistryConfig, SnapshotConfig
from app.log.batcher import AppendError, UnencodableCommand
from app.log.engine import ApplyFailed, LogFailed, SharedLog
from app.log.host import LogEngine, SnapshotPolicy
from app.services.registry import paths
from app.services.registry.errors import (
    BadArguments,
    DiskFull,
    InvalidACL,
    NodeExists,
    OperationTimeout,
    RegistryError,
    SessionExpired,
)
from app.services.registry.messages import (
    INT32_MAX,
    INT64_MAX,
    OPEN_ACL_UNSAFE,
    Acl,
    Check,
    CloseSession,
    Command,
    Create,
    Created,
    Delete,
    Deleted,
    Event,
    KeepaliveReply,
    KeepaliveRequest,
    Multi,
    MultiDone,
    OpenSession,
    SessionClosed,
    SessionOpened,
    SetAcl,
    SetData,
    Stat,
    Updated,
)
from app.services.registry.replicated import RegistryLog
from app.services.registry.sessions import SessionKeeper
from app.services.registry.state import RegistryState, SessionRecord, Znode
from app.services.registry.store import RegistryStore
from app.services.registry.view import RegistryStats, RegistryView
from app.services.registry.watches import OneShotKind, Subscription, WatchHub
from app.storage.diskspace import guard as disk_guard
from app.storage.snapshots.base import SnapshotStore
from app.storage.snapshots.memory import MemorySnapshotStore

log = logging.getLogger("fleetmate.registry")

MultiOp = Create | SetData | Delete | Check
SNAPSHOT_SERVICE = "registry"


async def _no_peers() -> list[int]:
    return []


def _now_ms() -> int:
    return int(time.time() * 1000)


def _session_bound(session_id: int) -> None:
    if not 0 < session_id <= INT64_MAX:
        raise BadArguments(f"session_id must be 1..{INT64_MAX} (ZooKeeper's int64), not {session_id}")


def new_session_id() -> int:
    """A random positive 63-bit session id, chosen by the appender (apply stays pure)."""
    while True:
        sid = int.from_bytes(os.urandom(8), "big") >> 1
        if sid:
            return sid


class RegistryService(RegistryView):
    """One replica's registry: every write goes through the log; reads come from applied state.

    Other modules use its commands, its async reads and RegistryView (local reads, figures,
    watch registration); its state, store, watch hub, log and session keeper are its own.
    """

    def __init__(
        self,
        bus: Bus,
        cfg: RegistryConfig,
        data_dir: Path,
        node_id: str,
        *,
        snapshot_store: SnapshotStore | None = None,
        snapshot_cfg: SnapshotConfig | None = None,
        peers_applied: Callable[[], Awaitable[list[int]]] | None = None,
        engine: LogEngine | None = None,
    ) -> None:
        self.bus = bus
        self.cfg = cfg
        self.node_id = node_id
        self._state = RegistryState()
        self._store = RegistryStore(data_dir / "registry.sqlite", cfg.event_history)
        self._watches = WatchHub(cfg.event_history)
        self.engine = engine or LogEngine(bus, node_id)
        opened = self.engine.add(
            SNAPSHOT_SERVICE,
            RegistryLog(self._state, self._store, self._watches),
            stream=subjects.REGISTRY_STREAM,
            subject=subjects.REGISTRY_LOG,
            replicas=cfg.stream_replicas,
            snapshots=SnapshotPolicy(
                snapshot_store or MemorySnapshotStore(),
                snapshot_cfg or SnapshotConfig(),
                is_leader=lambda: self._keeper.leading,
                peers_applied=peers_applied or _no_peers,
            ),
        )
        self._log: SharedLog[Command] = opened.log
        self.snapshots = opened.snapshots
        self._keeper = SessionKeeper(self._state, self._append_raw, node_id, reap_every_s=cfg.container_check_interval)
        self._keepalives: NatsSubscription | None = None

    async def start(self) -> None:
        """Restore a snapshot if this replica needs one, catch up with the log, start snapshotting.

        Leading comes later, from the lease (become_leader).
        """
        await self.engine.start(SNAPSHOT_SERVICE)
        log.info(
            "registry ready",
            extra={
                "revision": self._state.revision,
                "nodes": len(self._state.nodes),
                "applied_seq": self._log.applied_seq,
            },
        )

    async def become_leader(self) -> None:
        """This replica took the lease: append leader_elected, expire sessions, answer keepalives."""
        await self._keeper.lead()
        self._keepalives = await serve_every_subscriber(
            self.bus.nc, "keepalive", subjects.REGISTRY_KEEPALIVE, self._on_keepalive
        )

    async def stop_leading(self) -> None:
        """The lease is gone: stop every leader duty at once."""
        await self._keeper.stop()
        sub, self._keepalives = self._keepalives, None
        if sub is not None:
            try:
                await sub.unsubscribe()
            except Exception as exc:  # the connection may be closing
                log.debug("keepalive unsubscribe failed", extra={"error": str(exc)})

    async def stop(self) -> None:
        """Stop leading, snapshotting, appending and applying; a snapshot if ahead of the store; close the store."""
        await self.stop_leading()
        await self.engine.close(SNAPSHOT_SERVICE)
        self._store.close()

    @property
    def revision(self) -> int:
        """The latest applied revision on this replica."""
        return self._state.revision

    @property
    def duty_term(self) -> int:
        """The lease term this replica's leader duties carry (0 before it first led): see RegistryView."""
        return self._keeper.term

    @property
    def applied_seq(self) -> int:
        """The last log sequence this replica applied."""
        return self._log.applied_seq

    @property
    def failed(self) -> str | None:
        """Why the log stopped applying on this replica; None while it works."""
        return self._log.failed

    # ---- append -------------------------------------------------------------------------------

    def _timed_out(self, exc: Exception) -> OperationTimeout:
        if isinstance(exc, TimeoutError):
            return OperationTimeout(f"the write was not applied within {self.cfg.write_timeout:.0f}s")
        return OperationTimeout(str(exc))

    @staticmethod
    def _admit(cmd: Command) -> None:
        """Refuse a client's write while the disk is short of space (DiskFull, 503).

        Sessions and leader duties (a multi with a term, expiries, reaps) still go in: they keep
        what exists alive and consistent, and the space kept free (disk.min_free_mb) is for them.
        """
        if disk_guard.reason is not None and (
            isinstance(cmd, Create | SetData | Delete | SetAcl) or (isinstance(cmd, Multi) and not cmd.term)
        ):
            disk_guard.refused += 1
            raise DiskFull(disk_guard.reason)

    async def _append_raw(self, cmd: Command, size: int = 64) -> object:
        self._admit(cmd)
        try:
            result = await self._log.append(cmd, size, self.cfg.write_timeout)
        except UnencodableCommand as exc:
            raise BadArguments(str(exc)) from None
        except (TimeoutError, AppendError, LogFailed) as exc:
            raise self._timed_out(exc) from None
        if isinstance(result, ApplyFailed):
            return RegistryError(str(result))  # SystemError (500): the same on every replica
        return result

    async def _append(self, cmd: Command, size: int = 64) -> object:
        result = await self._append_raw(cmd, size)
        if isinstance(result, RegistryError):
            raise result
        return result

    # Writes without a coroutine each: the ZooKeeper port keeps thousands in flight, and a task
    # per write cost more than the write's own apply. submit_*() checks and queues the command;
    # settle() turns the done future into the result, raising what create/set/delete raise.

    def _submit(self, cmd: Command, size: int) -> asyncio.Future[Any]:
        self._admit(cmd)
        try:
            return self._log.submit(cmd, size, self.cfg.write_timeout)
        except LogFailed as exc:
            raise self._timed_out(exc) from None

    def settle(self, fut: asyncio.Future[Any]) -> Any:
        """The apply result of a done future from submit_*(); raises its RegistryError or OperationTimeout."""
        try:
            result = fut.result()
        except UnencodableCommand as exc:
            raise BadArguments(str(exc)) from None
        except (TimeoutError, AppendError, LogFailed) as exc:
            raise self._timed_out(exc) from None
        if isinstance(result, RegistryError):
            raise result
        if isinstance(result, ApplyFailed):
            raise RegistryError(str(result))
        return result

    def submit_set(self, path: str, data: bytes | None, version: int = -1) -> asyncio.Future[Any]:
        """set() without waiting: the future settles to Updated (data None: ZooKeeper's null)."""
        self._path(path)
        size = self._data(data, path)
        return self._submit(SetData(path, data, self._version(version, path), _now_ms()), size + 48)

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        try:  # noqa: SIM105 - contextlib.suppress() builds an object per write on the hottest path
            await fut
        except Exception:
            pass  # settle() raises it, translated
        return self.settle(fut)

    def submit_delete(self, path: str, version: int = -1, recursive: bool = False) -> asyncio.Future[Any]:
        """delete() without waiting: the future settles to Deleted."""
        self._path(path, allow_root=False)
        return self._submit(Delete(path, self._version(version, path), recursive), 64)

    def submit_create(
        self,
        path: str,
        data: bytes | None = b"",
        *,
        session_id: int = 0,
        sequential: bool = False,
        container: bool = False,
        parents: bool = False,
        acl: tuple[Acl, ...] | None = None,
        ttl_ms: int = 0,
    ) -> asyncio.Future[Any]:
        """create() without waiting: the future settles to Created."""
        cmd = self._create_cmd(
            path,
            data,
            session_id=session_id,
            sequential=sequential,
            container=container,
            parents=parents,
            acl=acl,
            now=_now_ms(),
            ttl_ms=ttl_ms,
        )
        return self._submit(cmd, len(data or b"") + len(path) + 32)

    def _path(self, path: str, *, allow_root: bool = True) -> str:
        return paths.validate(path, self.cfg.max_path_bytes, allow_root=allow_root)

    def _data(self, data: bytes | None, path: str) -> int:
        """Check data (None is ZooKeeper's null); returns its size."""
        if data is None:
            return 0
        if not isinstance(data, bytes):
            raise BadArguments("data must be bytes or None", path)
        if len(data) > self.cfg.max_data_bytes:
            raise BadArguments(f"data is {len(data)} bytes; the limit is {self.cfg.max_data_bytes}", path)
        return len(data)

    @staticmethod
    def _version(version: int, path: str) -> int:
        if not -1 <= version <= INT32_MAX:
            raise BadArguments(f"version must be -1 (any) or 0..{INT32_MAX} (ZooKeeper's int32), not {version}", path)
        return version

    def _create_cmd(
        self,
        path: str,
        data: bytes | None,
        *,
        session_id: int,
        sequential: bool,
        container: bool,
        parents: bool,
        acl: tuple[Acl, ...] | None,
        now: int,
        ttl_ms: int = 0,
    ) -> Create:
        if path == paths.ROOT:
            raise NodeExists("the root node always exists", path)
        self._path(path + "0" if sequential else path)
        self._data(data, path)
        if container and (session_id or sequential):
            raise BadArguments("a container node cannot be ephemeral or sequential", path)
        if not 0 <= session_id <= INT64_MAX:
            raise BadArguments(f"session_id must be 0..{INT64_MAX} (ZooKeeper's int64), not {session_id}", path)
        if acl is not None and not acl:
            raise InvalidACL("an ACL needs at least one entry", path)
        if not 0 <= ttl_ms <= INT64_MAX:
            raise BadArguments(f"ttl_ms must be 0..{INT64_MAX}, not {ttl_ms}", path)
        if ttl_ms and (session_id or container):
            raise BadArguments("a TTL node is persistent (not ephemeral nor a container), with a positive TTL", path)
        return Create(path, data, session_id, sequential, container, parents, acl or OPEN_ACL_UNSAFE, now, ttl_ms)

    async def create(
        self,
        path: str,
        data: bytes | None = b"",
        *,
        session_id: int = 0,
        sequential: bool = False,
        container: bool = False,
        parents: bool = False,
        acl: tuple[Acl, ...] | None = None,
        ttl_ms: int = 0,
    ) -> Created:
        """Create a node; ephemeral when session_id is given, a TTL node when ttl_ms > 0.

        Returns the actual path and stat.
        """
        fut = self.submit_create(
            path,
            data,
            session_id=session_id,
            sequential=sequential,
            container=container,
            parents=parents,
            acl=acl,
            ttl_ms=ttl_ms,
        )
        result = await self._wait(fut)
        assert isinstance(result, Created)
        return result

    async def set(self, path: str, data: bytes | None, version: int = -1) -> Updated:
        """Replace a node's data if its version matches (-1: any)."""
        result = await self._wait(self.submit_set(path, data, version))
        assert isinstance(result, Updated)
        return result

    async def delete(self, path: str, version: int = -1, recursive: bool = False) -> Deleted:
        """Delete a node (and, recursive, its subtree)."""
        result = await self._wait(self.submit_delete(path, version, recursive))
        assert isinstance(result, Deleted)
        return result

    async def set_acl(self, path: str, acl: tuple[Acl, ...], version: int = -1) -> Updated:
        """Replace a node's ACL if its aversion matches (-1: any)."""
        self._path(path)
        if not acl:
            raise InvalidACL("an ACL needs at least one entry", path)
        result = await self._append(SetAcl(path, acl, self._version(version, path)))
        assert isinstance(result, Updated)
        return result

    async def multi(self, ops: Sequence[MultiOp], term: int = 0) -> MultiDone:
        """Apply ops atomically; on failure raises the failing op's error (failed_index set).

        A leader's duty passes its lease term: the multi is then refused with StaleTerm once a
        newer leader has been elected, so a deposed leader cannot overwrite its successor.
        """
        if not ops:
            raise BadArguments("multi needs at least one operation")
        now = _now_ms()
        checked: list[MultiOp] = []
        size = 32
        for index, op in enumerate(ops):
            try:
                match op:
                    case Create():
                        checked.append(
                            self._create_cmd(
                                op.path,
                                op.data,
                                session_id=op.session_id,
                                sequential=op.sequential,
                                container=op.container,
                                parents=op.parents,
                                acl=op.acl,
                                now=now,
                                ttl_ms=op.ttl_ms,
                            )
                        )
                        size += len(op.data or b"")
                    case SetData():
                        self._path(op.path)
                        size += self._data(op.data, op.path)
                        checked.append(SetData(op.path, op.data, self._version(op.version, op.path), now))
                    case Delete() | Check():
                        self._path(op.path, allow_root=isinstance(op, Check))
                        self._version(op.version, op.path)
                        checked.append(op)
                    case _:
                        raise BadArguments(f"unknown operation {type(op).__name__}")
            except RegistryError as err:
                err.failed_index = index
                raise
            size += len(op.path) + 16
        if size > self.cfg.max_data_bytes + (64 << 10):
            raise BadArguments(f"multi is {size} bytes; the limit is {self.cfg.max_data_bytes} plus 64 KiB")
        result = await self._append(Multi(tuple(checked), now, term), size)
        assert isinstance(result, MultiDone)
        return result

    # ---- reads --------------------------------------------------------------------------------

    async def sync(self) -> None:
        """Wait until this replica has applied everything appended before the call (read index)."""
        try:
            await self._log.barrier(self.cfg.write_timeout)
        except TimeoutError:
            raise OperationTimeout("the log did not answer the read barrier in time") from None
        except LogFailed as exc:
            raise OperationTimeout(str(exc)) from None

    async def _read_point(self, linearizable: bool) -> None:
        if linearizable:
            await self.sync()

    async def get(self, path: str, linearizable: bool = True) -> tuple[bytes | None, Stat]:
        """Data and stat of a node."""
        self._path(path)
        await self._read_point(linearizable)
        return self._state.get(path)

    async def stat(self, path: str, linearizable: bool = True) -> Stat:
        """A node's stat (raises NoNode: ZooKeeper's exists answers None instead)."""
        self._path(path)
        await self._read_point(linearizable)
        return self._state.stat(path)

    async def children(self, path: str, linearizable: bool = True) -> tuple[list[str], Stat]:
        """Sorted child names and the parent's stat."""
        self._path(path)
        await self._read_point(linearizable)
        return self._state.child_names(path), self._state.stat(path)

    async def check(self, path: str, version: int, linearizable: bool = True) -> Stat:
        """Raise unless the node exists at this version (-1: any)."""
        self._path(path)
        self._version(version, path)
        await self._read_point(linearizable)
        return self.check_version(path, version)

    async def get_acl(self, path: str, linearizable: bool = True) -> tuple[tuple[Acl, ...], Stat]:
        """A node's ACL and stat."""
        self._path(path)
        await self._read_point(linearizable)
        stat = self._state.stat(path)
        return self._state.nodes[path].acl, stat

    # ---- local reads (RegistryView): the applied state at once, no read barrier -----------------

    def exists(self, path: str) -> bool:
        """True when the node exists."""
        return path in self._state.nodes

    def node(self, path: str) -> Znode | None:
        """The node as stored (data, stat fields and ACL); None when absent."""
        return self._state.nodes.get(path)

    def read(self, path: str) -> tuple[bytes | None, Stat]:
        """Data and stat; raises NoNode."""
        return self._state.get(path)

    def stat_of(self, path: str) -> Stat:
        """The node's stat; raises NoNode."""
        return self._state.stat(path)

    def check_version(self, path: str, version: int) -> Stat:
        """The stat when the node is at version (-1: any); raises NoNode or BadVersion."""
        return self._state.check(Check(path, version)).stat

    def child_names(self, path: str) -> list[str]:
        """Sorted child names; raises NoNode."""
        return self._state.child_names(path)

    def count_descendants(self, path: str) -> int:
        """Nodes below path (not path itself); raises NoNode."""
        self._state.stat(path)
        return len(self._state.descendants(path))

    def has_session(self, session_id: int) -> bool:
        """True while the session is open."""
        return session_id in self._state.sessions

    def session_record(self, session_id: int) -> SessionRecord | None:
        """The open session; None when it does not exist."""
        return self._state.sessions.get(session_id)

    def ephemerals(self, session_id: int) -> list[str]:
        """The session's ephemeral nodes, sorted (empty for an unknown session)."""
        return sorted(self._state.ephemerals.get(session_id, ()))

    def stats(self) -> RegistryStats:
        """This replica's figures (cost grows with sessions, not nodes)."""
        state, watches, counts = self._state, self._watches, self._log.stats()
        return RegistryStats(
            revision=state.revision,
            nodes=len(state.nodes),
            sessions=len(state.sessions),
            ephemerals=sum(len(owned) for owned in state.ephemerals.values()),
            watches=watches.subscription_count() + watches.one_shot_count(),
            term=state.term,
            leader=state.leader,
            oldest_resumable_revision=watches.compacted + 1,
            sessions_expired=self._keeper.expired,
            applied_seq=int(counts["applied_seq"]),
            applied_entries=int(counts["applied_entries"]),
            applied_commands=int(counts["applied_commands"]),
            appended_entries=int(counts["appended_entries"]),
            appended_commands=int(counts["appended_commands"]),
            apply_seconds=counts["apply_seconds"],
        )

    def data_bytes(self) -> int:
        """Bytes of node data (a walk over every node: for diagnostics, not hot paths)."""
        return sum(len(n.data or b"") for n in self._state.nodes.values())

    # ---- watches (RegistryView) -----------------------------------------------------------------

    def subscribe(
        self,
        path: str,
        recursive: bool,
        since: int | None = None,
        callback: Callable[[Event], None] | None = None,
    ) -> Subscription:
        """A persistent watch on path (its subtree when recursive); with `since`, retained events
        from that revision first. Events go to `callback` while the log applies, else to the
        subscription's queue. Raises Compacted for a `since` older than the history."""
        return self._watches.subscribe(path, recursive, since, callback)

    def watch_once(self, path: str, kind: OneShotKind, callback: Callable[[Event], None]) -> int:
        """A one-shot watch (ZooKeeper's getData/exists/getChildren); returns a handle for cancel_once()."""
        return self._watches.watch_once(path, kind, callback)

    def cancel_once(self, path: str, kind: OneShotKind, handle: int) -> bool:
        """Remove a one-shot watch that has not fired; False when it fired or never existed."""
        return self._watches.cancel_once(path, kind, handle)

    # ---- sessions -----------------------------------------------------------------------------

    def negotiate_timeout(self, timeout_ms: int) -> int:
        """Clamp a requested session timeout to the configured bounds."""
        return max(self.cfg.session_timeout_min_ms, min(self.cfg.session_timeout_max_ms, timeout_ms))

    async def open_session(self, timeout_ms: int, password: bytes | None = None) -> SessionOpened:
        """Open a session; its ephemeral nodes live until it is closed or expires."""
        if timeout_ms <= 0:
            raise BadArguments("timeout_ms must be positive")
        cmd = OpenSession(new_session_id(), self.negotiate_timeout(timeout_ms), _now_ms(), password or os.urandom(16))
        result = await self._append(cmd)
        assert isinstance(result, SessionOpened)
        return result

    async def close_session(self, session_id: int) -> SessionClosed:
        """Close a session now: its ephemeral nodes are deleted."""
        _session_bound(session_id)
        result = await self._append(CloseSession(session_id))
        assert isinstance(result, SessionClosed)
        return result

    async def keepalive(self, session_id: int, last_active: float | None = None) -> int:
        """Refresh a session at the leader for activity at `last_active` (time.monotonic() on this
        replica; default now); returns its timeout. Raises SessionExpired."""
        _session_bound(session_id)
        if last_active is None:
            last_active = time.monotonic()
        if self._keeper.leading:  # this replica is the leader: no bus round trip
            timeout = self._keeper.touch(session_id, time.monotonic() - last_active)
            if timeout is None:
                raise SessionExpired(f"session 0x{session_id:x} does not exist")
            return timeout
        # A few short tries: a leader that was just paused or replaced may still hold the
        # subscription for a moment, and the next try reaches the one that answers.
        for attempt in range(4):
            idle_ms = min(2**31 - 1, max(0, int((time.monotonic() - last_active) * 1000)))
            payload = codec.encode(KeepaliveRequest(session_id, idle_ms))
            try:
                reply = await call(self.bus.nc, subjects.REGISTRY_KEEPALIVE, payload, timeout=0.5)
                return codec.decode(reply, KeepaliveReply).timeout_ms
            except HandlerError as exc:
                if exc.code == "404":
                    raise SessionExpired(exc.description) from None
                raise OperationTimeout(f"keepalive failed: {exc.description}") from None
            except (TimeoutError, NoRespondersError, NatsTimeout):
                await asyncio.sleep(0.1 * attempt)
        raise OperationTimeout("no registry leader answered the keepalive")

    async def _on_keepalive(self, data: bytes) -> bytes:
        try:
            req = codec.decode(data, KeepaliveRequest)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise HandlerError("400", f"bad KeepaliveRequest: {exc}") from None
        timeout = self._keeper.touch(req.session_id, req.idle_ms / 1000)
        if timeout is None:
            raise HandlerError("404", f"session 0x{req.session_id:x} does not exist")
        return codec.encode(KeepaliveReply(req.session_id, timeout))

    def session(self, session_id: int) -> tuple[SessionRecord, list[str]]:
        """A session and its ephemeral nodes (local state)."""
        record = self._state.sessions.get(session_id)
        if record is None:
            raise SessionExpired(f"session 0x{session_id:x} does not exist")
        return record, sorted(self._state.ephemerals.get(session_id, ()))

    def sessions(self) -> list[SessionRecord]:
        """Every open session (local state)."""
        return sorted(self._state.sessions.values(), key=lambda r: r.session_id)

    def events_since(self, revision: int) -> list[Event]:
        """Retained events with revision >= revision (for tests and diagnostics)."""
        return [e for e in self._watches.history if e.revision >= revision]
