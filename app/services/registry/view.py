"""The registry as other services see it: a read-only view of the applied state, its figures, watches.

Everything outside app/services/registry/ reads the registry through these (and writes through
RegistryService's commands); its state, store, watch hub, log and session keeper stay private, so
their representation can change without touching a consumer. Reads here are local and at once:
`sync()` first for a linearizable one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import msgspec

from app.services.registry.messages import Event, Stat
from app.services.registry.state import SessionRecord, Znode
from app.services.registry.watches import OneShotKind, Subscription

__all__ = ["OneShotKind", "RegistryStats", "RegistryView", "Subscription", "Watchable"]


class RegistryStats(msgspec.Struct, frozen=True):
    """One replica's registry figures (/metrics, GET /api/v1/registry and the mntr word read these)."""

    revision: int
    nodes: int
    sessions: int
    ephemerals: int  # ephemeral nodes, over every session
    watches: int  # one-shot and persistent, on this replica
    term: int  # of the latest leader_elected entry applied
    leader: str  # the node id it elected
    oldest_resumable_revision: int  # a watch can resume from here; older is compacted
    sessions_expired: int  # by this replica while it led
    applied_seq: int  # the last log sequence applied
    applied_entries: int
    applied_commands: int
    appended_entries: int  # by this replica
    appended_commands: int
    apply_seconds: float  # spent applying and committing entries


class Watchable(Protocol):
    """Watch registration: events are delivered while the log applies, in revision order."""

    def subscribe(
        self,
        path: str,
        recursive: bool,
        since: int | None = None,
        callback: Callable[[Event], None] | None = None,
    ) -> Subscription:
        """A persistent watch on path (its subtree when recursive); raises Compacted for a `since` too old."""
        ...

    def watch_once(self, path: str, kind: OneShotKind, callback: Callable[[Event], None]) -> int:
        """A one-shot watch (ZooKeeper's getData/exists/getChildren); returns a handle for cancel_once()."""
        ...

    def cancel_once(self, path: str, kind: OneShotKind, handle: int) -> bool:
        """Remove a one-shot watch that has not fired; False when it fired or never existed."""
        ...


class RegistryView(Watchable, Protocol):
    """Read-only access to one replica's applied registry."""

    @property
    def revision(self) -> int:
        """The latest applied revision."""
        ...

    @property
    def duty_term(self) -> int:
        """The lease term this replica's leader duties carry (0 before it first led).

        A write passing it is refused once a newer leader is elected, so a deposed leader is
        fenced; this is not the newest term (RegistryStats.term).
        """
        ...

    @property
    def applied_seq(self) -> int:
        """The last log sequence this replica applied."""
        ...

    @property
    def failed(self) -> str | None:
        """Why the log stopped applying on this replica; None while it works."""
        ...

    async def sync(self) -> None:
        """Wait until everything appended before the call is applied here (then read at once)."""
        ...

    def exists(self, path: str) -> bool:
        """True when the node exists."""
        ...

    def node(self, path: str) -> Znode | None:
        """The node as stored (data, stat fields and ACL); None when absent."""
        ...

    def read(self, path: str) -> tuple[bytes | None, Stat]:
        """Data and stat; raises NoNode."""
        ...

    def stat_of(self, path: str) -> Stat:
        """The node's stat; raises NoNode."""
        ...

    def check_version(self, path: str, version: int) -> Stat:
        """The stat when the node is at version (-1: any); raises NoNode or BadVersion."""
        ...

    def child_names(self, path: str) -> list[str]:
        """Sorted child names; raises NoNode."""
        ...

    def count_descendants(self, path: str) -> int:
        """Nodes below path (not path itself); raises NoNode."""
        ...

    def has_session(self, session_id: int) -> bool:
        """True while the session is open."""
        ...

    def session_record(self, session_id: int) -> SessionRecord | None:
        """The open session; None when it does not exist."""
        ...

    def ephemerals(self, session_id: int) -> list[str]:
        """The session's ephemeral nodes, sorted (empty for an unknown session)."""
        ...

    def stats(self) -> RegistryStats:
        """This replica's figures (cost grows with sessions, not nodes)."""
        ...

    def data_bytes(self) -> int:
        """Bytes of node data (a walk over every node: for diagnostics, not hot paths)."""
        ...
