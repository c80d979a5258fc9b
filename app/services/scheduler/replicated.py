"""The scheduler as its log sees it: the entry codec, the state machine, the SQLite store and the change fan-out."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.log.snapshots import Image
from app.log.user import FileBacked
from app.services.scheduler.messages import Command, Entry
from app.services.scheduler.model import Event
from app.services.scheduler.state import SchedulerState
from app.services.scheduler.store import SchedulerStore

_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(Entry)
MAX_QUEUED = 10_000  # events a change subscriber may have unread before it is dropped


def encode_entry(commands: Sequence[Command]) -> bytes:
    """One log entry holding a batch of scheduler commands."""
    return _entry_enc.encode(Entry(list(commands)))


def decode_entry(data: bytes) -> list[Command]:
    """The commands of one log entry."""
    return _entry_dec.decode(data).commands


class Changes:
    """Applied events fanned out to subscribers (the WebSocket of changes, the leader's pusher)."""

    def __init__(self) -> None:
        self._queues: set[asyncio.Queue[Event | None]] = set()
        self.listeners: list[Callable[[list[Event]], None]] = []

    def publish(self, events: list[Event]) -> None:
        """Hand one applied batch's events to every subscriber; a subscriber too far behind is ended."""
        for listener in self.listeners:
            listener(events)
        for q in list(self._queues):
            if q.qsize() + len(events) > MAX_QUEUED:
                self._queues.discard(q)
                with contextlib.suppress(asyncio.QueueFull):
                    q.put_nowait(None)
                continue
            for e in events:
                q.put_nowait(e)

    def subscribe(self) -> asyncio.Queue[Event | None]:
        """A queue of the events applied from now on (None: dropped for falling behind)."""
        q: asyncio.Queue[Event | None] = asyncio.Queue()
        self._queues.add(q)
        return q

    def unsubscribe(self, q: asyncio.Queue[Event | None]) -> None:
        """Stop feeding a queue."""
        self._queues.discard(q)


class SchedulerLog(FileBacked):
    """The scheduler's LogUser (app.log.user)."""

    store: SchedulerStore

    def __init__(self, state: SchedulerState, store: SchedulerStore, changes: Changes) -> None:
        self.state = state
        self.store = store
        self.changes = changes
        self.apply: Callable[[Command], tuple[Any, list[Event]]] = state.apply
        self.applied: Callable[[list[Event]], None] = changes.publish
        self.encode = encode_entry
        self.decode = decode_entry

    def load(self) -> int:
        """Fill the state from the SQLite file; the sequence it covers."""
        return self.store.load(self.state)

    def commit(self, applied_seq: int, events: list[Any]) -> None:
        """Write the state as applied through applied_seq."""
        self.store.commit(self.state, applied_seq)

    def image(self) -> Image:
        """The state as a snapshot image (the log commits it up to date first)."""
        seq, revision, data = self.store.image()
        return Image(seq, revision, data)
