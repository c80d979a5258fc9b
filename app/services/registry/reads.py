"""The registry's local reads and watch registration (RegistryView's at-once half), over the applied state.

RegistryService inherits these: the reads answer from this replica's applied state with no read
barrier (sync() first for a linearizable one), and watches register in its hub.
"""

from __future__ import annotations

from collections.abc import Callable

from app.services.registry.errors import SessionExpired
from app.services.registry.messages import Check, Event, Stat
from app.services.registry.state import RegistryState, SessionRecord, Znode
from app.services.registry.watches import OneShotKind, Subscription, WatchHub


class LocalReads:
    """The applied state read at once, and watches; RegistryService sets _state and _watches."""

    _state: RegistryState
    _watches: WatchHub

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
