"""The registry's public Python API: validate, append to the shared log, read the applied state, watch."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from nats.aio.subscription import Subscription as NatsSubscription

from app.bus import subjects
from app.bus.connection import Bus
from app.bus.micro import serve_every_subscriber
from app.config import RegistryConfig, SnapshotConfig
from app.log.batcher import AppendError, UnencodableCommand
from app.log.engine import ApplyFailed, LogFailed, SharedLog
from app.log.host import LogEngine, SnapshotPolicy
from app.services.registry import keepalive, paths
from app.services.registry.commands import MultiOp as MultiOp  # noqa: PLC0414 - re-exported for HA and membership
from app.services.registry.commands import (
    build_create,
    build_delete,
    build_multi,
    build_set,
    build_set_acl,
    multi_size,
    now_ms,
    version_in_range,
)
from app.services.registry.errors import (
    BadArguments,
    DiskFull,
    OperationTimeout,
    RegistryError,
    SessionExpired,
)
from app.services.registry.messages import (
    INT64_MAX,
    Acl,
    CloseSession,
    Command,
    Create,
    Created,
    Delete,
    Deleted,
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
from app.services.registry.reads import LocalReads
from app.services.registry.replicated import RegistryLog
from app.services.registry.sessions import SessionKeeper
from app.services.registry.state import RegistryState
from app.services.registry.store import RegistryStore
from app.services.registry.view import RegistryStats, RegistryView
from app.services.registry.watches import WatchHub
from app.storage.diskspace import guard as disk_guard
from app.storage.snapshots.base import SnapshotStore
from app.storage.snapshots.memory import MemorySnapshotStore

log = logging.getLogger("fleetmate.registry")

SNAPSHOT_SERVICE = "registry"


async def _no_peers() -> list[int]:
    return []


def _session_bound(session_id: int) -> None:
    if not 0 < session_id <= INT64_MAX:
        raise BadArguments(f"session_id must be 1..{INT64_MAX} (ZooKeeper's int64), not {session_id}")


def new_session_id() -> int:
    """A random positive 63-bit session id, chosen by the appender (apply stays pure)."""
    while True:
        sid = int.from_bytes(os.urandom(8), "big") >> 1
        if sid:
            return sid


class RegistryService(LocalReads, RegistryView):
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

    def submit_set(self, cmd: SetData) -> asyncio.Future[Any]:
        """Append a built SetData (commands.build_set) without waiting: the future settles to Updated."""
        return self._submit(cmd, len(cmd.data or b"") + 48)

    def submit_delete(self, cmd: Delete) -> asyncio.Future[Any]:
        """Append a built Delete (commands.build_delete) without waiting: the future settles to Deleted."""
        return self._submit(cmd, 64)

    def submit_create(self, cmd: Create) -> asyncio.Future[Any]:
        """Append a built Create (commands.build_create) without waiting: the future settles to Created."""
        return self._submit(cmd, len(cmd.data or b"") + len(cmd.path) + 32)

    async def _wait(self, fut: asyncio.Future[Any]) -> Any:
        try:  # noqa: SIM105 - contextlib.suppress() builds an object per write on the hottest path
            await fut
        except Exception:
            pass  # settle() raises it, translated
        return self.settle(fut)

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
        cmd = build_create(
            self.cfg,
            path,
            data,
            session_id=session_id,
            sequential=sequential,
            container=container,
            parents=parents,
            acl=acl,
            ttl_ms=ttl_ms,
            now=now_ms(),
        )
        result = await self._wait(self.submit_create(cmd))
        assert isinstance(result, Created)
        return result

    async def set(self, path: str, data: bytes | None, version: int = -1) -> Updated:
        """Replace a node's data if its version matches (-1: any)."""
        result = await self._wait(self.submit_set(build_set(self.cfg, path, data, version, now_ms())))
        assert isinstance(result, Updated)
        return result

    async def delete(self, path: str, version: int = -1, recursive: bool = False) -> Deleted:
        """Delete a node (and, recursive, its subtree)."""
        result = await self._wait(self.submit_delete(build_delete(self.cfg, path, version, recursive)))
        assert isinstance(result, Deleted)
        return result

    async def set_acl(self, path: str, acl: tuple[Acl, ...], version: int = -1) -> Updated:
        """Replace a node's ACL if its aversion matches (-1: any)."""
        return await self.append_set_acl(build_set_acl(self.cfg, path, acl, version))

    async def append_set_acl(self, cmd: SetAcl) -> Updated:
        """Append a built SetAcl (commands.build_set_acl) and wait for its result."""
        result = await self._append(cmd)
        assert isinstance(result, Updated)
        return result

    async def multi(self, ops: Sequence[MultiOp], term: int = 0) -> MultiDone:
        """Apply ops atomically; on failure raises the failing op's error (failed_index set).

        A leader's duty passes its lease term: the multi is then refused with StaleTerm once a
        newer leader has been elected, so a deposed leader cannot overwrite its successor.
        """
        return await self.append_multi(build_multi(self.cfg, ops, now_ms(), term))

    async def append_multi(self, cmd: Multi) -> MultiDone:
        """Append a built Multi (commands.build_multi or assemble_multi) and wait for its result."""
        result = await self._append(cmd, multi_size(cmd.ops))
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

    def _path(self, path: str) -> str:
        return paths.validate(path, self.cfg.max_path_bytes)

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
        version_in_range(version, path)
        await self._read_point(linearizable)
        return self.check_version(path, version)

    async def get_acl(self, path: str, linearizable: bool = True) -> tuple[tuple[Acl, ...], Stat]:
        """A node's ACL and stat."""
        self._path(path)
        await self._read_point(linearizable)
        stat = self._state.stat(path)
        return self._state.nodes[path].acl, stat

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

    # ---- sessions -----------------------------------------------------------------------------

    def negotiate_timeout(self, timeout_ms: int) -> int:
        """Clamp a requested session timeout to the configured bounds."""
        return max(self.cfg.session_timeout_min_ms, min(self.cfg.session_timeout_max_ms, timeout_ms))

    async def open_session(self, timeout_ms: int, password: bytes | None = None) -> SessionOpened:
        """Open a session; its ephemeral nodes live until it is closed or expires."""
        if timeout_ms <= 0:
            raise BadArguments("timeout_ms must be positive")
        cmd = OpenSession(new_session_id(), self.negotiate_timeout(timeout_ms), now_ms(), password or os.urandom(16))
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
        return await keepalive.ask_leader(self.bus.nc, session_id, last_active)

    async def _on_keepalive(self, data: bytes) -> bytes:
        return keepalive.answer(self._keeper, data)
