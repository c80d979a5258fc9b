"""The log engine: any number of independent logs in one process, each opened and closed on demand.

Each log is its own JetStream stream applied in order into its own LogUser, with its own applied
sequence, read barrier, snapshots and trimming; opening one restores a snapshot first when the log
no longer holds what the local state needs. The registry is one log; a KV partition will be another.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from app.bus.connection import Bus
from app.config import SnapshotConfig
from app.log.engine import SharedLog
from app.log.snapshots import Image, Recovery, Snapshotter
from app.log.user import LogUser
from app.storage.snapshots.base import SnapshotStore
from app.storage.snapshots.memory import MemorySnapshotStore

log = logging.getLogger("fleetmate.log")

C = TypeVar("C")


async def _no_peers() -> list[int]:
    return []


def _never() -> bool:
    return False


@dataclass(frozen=True)
class SnapshotPolicy:
    """Where a log's snapshots go and who takes and trims them (see Snapshotter)."""

    store: SnapshotStore
    cfg: SnapshotConfig
    is_leader: Callable[[], bool] = _never
    peers_applied: Callable[[], Awaitable[list[int]]] = _no_peers


class OpenLog(Generic[C]):
    """One log of the engine: the shared log itself and its snapshotter."""

    def __init__(self, name: str, log: SharedLog[C], snapshots: Snapshotter, user: LogUser[C]) -> None:
        self.name = name
        self.log = log
        self.snapshots = snapshots
        self.user = user
        self.recovery = Recovery()
        self.started = False


class LogEngine:
    """Opens, starts and closes logs by name; every log is independent of the others."""

    def __init__(self, bus: Bus, node_id: str) -> None:
        self.bus = bus
        self.node_id = node_id
        self._logs: dict[str, OpenLog[Any]] = {}

    def add(
        self,
        name: str,
        user: LogUser[C],
        *,
        stream: str,
        subject: str,
        replicas: int,
        snapshots: SnapshotPolicy | None = None,
        never_trimmed: bool = False,
    ) -> OpenLog[C]:
        """Set a log up (nothing is read or sent yet); start() opens it. Names are unique per engine."""
        if name in self._logs:
            raise ValueError(f"a log named {name!r} is already open")
        shared: SharedLog[C] = SharedLog(
            self.bus,
            stream=stream,
            subject=subject,
            replicas=replicas,
            node_id=self.node_id,
            user=user,
            never_trimmed=never_trimmed,
        )
        policy = snapshots or SnapshotPolicy(MemorySnapshotStore(), SnapshotConfig())

        def image() -> Image:  # the local store brought up to what is applied, then imaged
            shared.flush_commit()
            return user.image()

        snapshotter = Snapshotter(
            policy.store,
            policy.cfg,
            service=name,
            node_id=self.node_id,
            image=image,
            applied_seq=lambda: shared.applied_seq,
            is_leader=policy.is_leader,
            peers_applied=policy.peers_applied,
            trim=shared.trim,
        )
        opened: OpenLog[C] = OpenLog(name, shared, snapshotter, user)
        self._logs[name] = opened
        return opened

    def get(self, name: str) -> OpenLog[Any]:
        """An open log by name (KeyError when it is not)."""
        return self._logs[name]

    @property
    def names(self) -> list[str]:
        """The logs open now."""
        return sorted(self._logs)

    async def start(self, name: str, barrier_timeout: float = 60.0) -> Recovery:
        """Restore a snapshot if the local state needs one, load it, follow the log, catch up, snapshot.

        Returns what the restore did. The caller's local state is loaded when this returns.
        """
        opened = self._logs[name]
        shared, user = opened.log, opened.user
        bounds = await shared.prepare()
        # A snapshot when the log was trimmed past us or we have nothing; when the log lost what
        # the newest snapshot (or the local state) covers, that state and the stream moved past it.
        opened.recovery = await opened.snapshots.recover(user, bounds, shared.trim)
        shared.applied_seq = shared.committed_seq = user.load()
        await shared.start()
        await shared.barrier(timeout=barrier_timeout)
        opened.snapshots.start(take_now=bool(opened.recovery.continued_at))
        opened.started = True
        return opened.recovery

    async def open(self, name: str, user: LogUser[C], **kwargs: Any) -> OpenLog[C]:
        """add() and start() in one step."""
        opened = self.add(name, user, **kwargs)
        try:
            await self.start(name)
        except BaseException:
            self._logs.pop(name, None)
            raise
        return opened

    async def close(self, name: str, last_snapshot: bool = True) -> None:
        """Stop snapshotting and applying; a clean stop takes a last snapshot (snapshot.on_stop_timeout)."""
        opened = self._logs.pop(name, None)
        if opened is None:
            return
        await opened.snapshots.stop()
        await opened.log.stop()
        if last_snapshot and opened.started and not opened.log.failed:
            await opened.snapshots.take_at_stop(opened.snapshots.cfg.on_stop_timeout)

    async def close_all(self) -> None:
        """Close every log, each with its last snapshot."""
        for name in list(self._logs):
            await self.close(name)
