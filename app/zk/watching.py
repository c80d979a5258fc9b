"""One ZooKeeper connection's watches: one-shot (getData/exists/getChildren), persistent
(addWatch), their removal and check, and setWatches after a reconnect.

Events are written while the log applies, so a client gets a watch event before any reply that
shows the change (the connection's writes leave in the order written).
"""

from __future__ import annotations

from collections.abc import Callable

from app.services.registry.errors import NoWatcher, Unimplemented
from app.services.registry.messages import Event
from app.services.registry.view import OneShotKind, RegistryView, Subscription
from app.zk import protocol as p
from app.zk.jute import Writer

_REMOVABLE = {p.WATCH_CHILDREN: ("children",), p.WATCH_DATA: ("data",), p.WATCH_ANY: ("data", "children")}


class ZkWatches:
    """The watches one connection holds in the registry; events go to `write` as notification packets."""

    def __init__(
        self, registry: RegistryView, write: Callable[[bytes], None], encoded: Callable[[Event], bytes]
    ) -> None:
        """write: the connection's ordered write; encoded: an event's packet, encoded once for every connection."""
        self._registry = registry
        self._write = write
        self._encoded = encoded
        self._one_shot: dict[tuple[str, str], int] = {}  # (path, "data"|"children") -> hub handle
        self._persistent: dict[tuple[str, bool], Subscription] = {}
        self._last_event: Event | None = None

    def _notify(self, event: Event) -> None:
        # One notification per event per connection, however many of its watches match
        # (ZooKeeper's server counts a connection once; the client fans out locally).
        if event is self._last_event:
            return
        self._last_event = event
        self._write(self._encoded(event))

    def once(self, path: str, kind: str) -> None:
        """A one-shot watch of kind "data" (getData, exists) or "children" (getChildren); at most one per key."""
        key = (path, kind)
        if key in self._one_shot:
            return

        def fired(event: Event) -> None:
            self._one_shot.pop(key, None)
            self._notify(event)

        hub_kind: OneShotKind = "exists" if kind == "data" else "children"
        self._one_shot[key] = self._registry.watch_once(path, hub_kind, fired)

    def persistent(self, path: str, recursive: bool) -> None:
        """A persistent watch (addWatch) on path, or its subtree when recursive."""
        key = (path, recursive)
        if key not in self._persistent:
            self._persistent[key] = self._registry.subscribe(path, recursive, callback=self._notify)

    def remove(self, path: str, kind: int, *, remove: bool) -> Writer:
        """removeWatches (remove=True) or checkWatches: raises NoWatcher when there is none of that type."""
        kinds = _REMOVABLE.get(kind)
        if kinds is None:
            raise Unimplemented(f"watcher type {kind} is not supported", path)
        found = [(path, k) for k in kinds if (path, k) in self._one_shot]
        persistent = [key for key in self._persistent if key[0] == path] if kind == p.WATCH_ANY else []
        if not found and not persistent:
            raise NoWatcher(f"no watch of type {kind} on {path}", path)
        if remove:
            for key in found:
                handle = self._one_shot.pop(key)
                self._registry.cancel_once(path, "exists" if key[1] == "data" else "children", handle)
            for pkey in persistent:
                self._persistent.pop(pkey).close()
        return Writer()

    def set_watches(self, req: p.SetWatchesRequest) -> None:
        """After a reconnect: fire at once what changed since the client's last zxid (ZooKeeper's
        rules), register the rest again."""
        registry = self._registry
        rel = req.relative_zxid
        fired: list[tuple[int, str]] = []
        for path in req.data:
            node = registry.node(path)
            if node is None:
                fired.append((p.EV_DELETED, path))
            elif node.mzxid > rel:
                fired.append((p.EV_CHANGED, path))
            else:
                self.once(path, "data")
        for path in req.exist:
            if registry.exists(path):
                fired.append((p.EV_CREATED, path))
            else:
                self.once(path, "data")
        for path in req.child:
            node = registry.node(path)
            if node is None:
                fired.append((p.EV_DELETED, path))
            elif node.pzxid > rel:
                fired.append((p.EV_CHILDREN, path))
            else:
                self.once(path, "children")
        for path in req.persistent:
            self.persistent(path, False)
        for path in req.persistent_recursive:
            self.persistent(path, True)
        for event_type, path in fired:
            self._write(p.notification(registry.revision, event_type, path))

    def close(self) -> None:
        """Drop every watch (the connection is closing)."""
        for (path, kind), handle in self._one_shot.items():
            self._registry.cancel_once(path, "exists" if kind == "data" else "children", handle)
        for sub in self._persistent.values():
            sub.close()
        self._one_shot.clear()
        self._persistent.clear()
