"""Watches on one replica: ZooKeeper one-shot watches, persistent (recursive) streams, and resumable history."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable
from typing import Literal, TypeVar

from app.aio import Mailbox
from app.services.registry import paths
from app.services.registry.errors import Compacted
from app.services.registry.messages import Event

OneShotKind = Literal["data", "exists", "children"]
T = TypeVar("T")

# Which event types fire which one-shot watch (ZooKeeper's rules).
_FIRES: dict[str, tuple[OneShotKind, ...]] = {
    "created": ("exists",),
    "changed": ("data", "exists"),
    "deleted": ("data", "exists", "children"),
    "children": ("children",),
}

SLOW_CONSUMER_LIMIT = 100_000


class WatchOverflow(Exception):
    """A persistent watcher fell too far behind and was dropped; resume from its last revision."""


class Subscription:
    """A persistent watch: events for a path (and its subtree when recursive) in revision order."""

    def __init__(
        self, hub: WatchHub, sid: int, path: str, recursive: bool, callback: Callable[[Event], None] | None = None
    ) -> None:
        self.hub = hub
        self.id = sid
        self.path = path
        self.recursive = recursive
        self.queue: Mailbox[Event | WatchOverflow] = Mailbox()
        self.callback = callback  # when set, events go to it at once instead of the queue
        self.closed = False

    def matches(self, event: Event) -> bool:
        """ZooKeeper's persistent-watch rules: recursive sees created/changed/deleted below path;
        a plain persistent watch sees every event type on path itself."""
        if self.recursive:
            return event.type != "children" and paths.is_under(event.path, self.path)
        return event.path == self.path

    def push(self, event: Event) -> None:
        if self.closed:
            return
        if self.callback is not None:
            self.callback(event)
            return
        if self.queue.qsize() >= SLOW_CONSUMER_LIMIT:
            self.queue.put_nowait(WatchOverflow(f"watcher fell {SLOW_CONSUMER_LIMIT} events behind"))
            self.close()
            return
        self.queue.put_nowait(event)

    async def next(self) -> Event:
        """The next event; raises WatchOverflow when dropped for being slow."""
        item = await self.queue.get()
        if isinstance(item, WatchOverflow):
            raise item
        return item

    def close(self) -> None:
        """Stop receiving events."""
        if not self.closed:
            self.closed = True
            self.hub._remove(self)


class WatchHub:
    """Fans applied events out to this replica's watchers and keeps a bounded history for resumes."""

    def __init__(self, history: int) -> None:
        self.history: deque[Event] = deque(maxlen=max(history, 1))
        self.keep = history
        self.compacted = 0  # events with revision <= compacted may be missing from history
        self._one_shot: dict[tuple[str, OneShotKind], dict[int, Callable[[Event], None]]] = {}
        self._exact: dict[str, set[Subscription]] = {}
        self._recursive: dict[str, set[Subscription]] = {}
        self._ids = itertools.count(1)

    def load(self, events: Iterable[Event], revision: int) -> None:
        """Seed the history from the store at start-up; `revision` is the state's current revision."""
        kept = list(events)
        self.history.clear()
        if not self.keep:
            self.compacted = revision
            return
        self.history.extend(kept)
        # A full history may have been trimmed, possibly in the middle of its oldest revision.
        self.compacted = kept[0].revision if len(kept) >= self.keep else 0

    def publish(self, events: list[Event]) -> None:
        """Called by the applier with every applied event, in order."""
        for event in events:
            if self.keep:
                if len(self.history) == self.history.maxlen:
                    self.compacted = self.history[0].revision
                self.history.append(event)
            else:
                self.compacted = event.revision
            for kind in _FIRES[event.type]:
                callbacks = self._one_shot.pop((event.path, kind), None)
                if callbacks:
                    for callback in callbacks.values():
                        callback(event)
            for sub in tuple(self._exact.get(event.path, ())):
                sub.push(event)
            if self._recursive and event.type != "children":
                prefixes = (
                    (paths.ROOT,)
                    if event.path == paths.ROOT
                    else (paths.ROOT, *paths.ancestors(event.path), event.path)
                )
                for prefix in prefixes:
                    for sub in tuple(self._recursive.get(prefix, ())):
                        sub.push(event)

    # ---- one-shot (ZooKeeper getData/exists/getChildren watches) --------------------------------

    def watch_once(self, path: str, kind: OneShotKind, callback: Callable[[Event], None]) -> int:
        """Register a one-shot watch; returns a handle for cancel_once()."""
        handle = next(self._ids)
        self._one_shot.setdefault((path, kind), {})[handle] = callback
        return handle

    def cancel_once(self, path: str, kind: OneShotKind, handle: int) -> bool:
        """Remove a one-shot watch that has not fired; False when it already fired or never existed."""
        callbacks = self._one_shot.get((path, kind))
        if not callbacks or handle not in callbacks:
            return False
        del callbacks[handle]
        if not callbacks:
            del self._one_shot[(path, kind)]
        return True

    def one_shot_count(self) -> int:
        """Registered one-shot watches."""
        return sum(len(v) for v in self._one_shot.values())

    # ---- persistent -----------------------------------------------------------------------------

    def subscribe(
        self, path: str, recursive: bool, since: int | None = None, callback: Callable[[Event], None] | None = None
    ) -> Subscription:
        """A persistent watch; with `since`, first replay retained events with revision >= since.

        Events go to `callback` when given (called while the log applies), else to the
        subscription's queue. Raises Compacted when events at `since` may have been dropped.
        """
        if since is not None and since <= self.compacted:
            raise Compacted(
                f"revision {since} is compacted: the oldest revision that can be resumed is {self.compacted + 1}",
                path,
            )
        sub = Subscription(self, next(self._ids), path, recursive, callback)
        if since is not None:
            for event in self.history:
                if event.revision >= since and sub.matches(event):
                    sub.push(event)
        index = self._recursive if recursive else self._exact
        index.setdefault(path, set()).add(sub)
        return sub

    def _remove(self, sub: Subscription) -> None:
        index = self._recursive if sub.recursive else self._exact
        subs = index.get(sub.path)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del index[sub.path]

    def subscription_count(self) -> int:
        """Open persistent watches."""
        return sum(len(v) for v in self._exact.values()) + sum(len(v) for v in self._recursive.values())
