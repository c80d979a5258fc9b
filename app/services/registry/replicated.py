"""The registry as its log sees it: the entry codec, the state machine, the SQLite store and the watch fan-out."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.log.snapshots import Image
from app.log.user import FileBacked
from app.services.registry.messages import Command, Entry, Event
from app.services.registry.state import RegistryState
from app.services.registry.store import RegistryStore
from app.services.registry.watches import WatchHub

_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(Entry)


def encode_entry(commands: Sequence[Command]) -> bytes:
    """One log entry holding a batch of registry commands."""
    return _entry_enc.encode(Entry(list(commands)))


def decode_entry(data: bytes) -> list[Command]:
    """The commands of one log entry."""
    return _entry_dec.decode(data).commands


class RegistryLog(FileBacked):
    """The registry's LogUser (app.log.user): what the shared log needs from the registry, in one place."""

    store: RegistryStore

    def __init__(self, state: RegistryState, store: RegistryStore, watches: WatchHub) -> None:
        self.state = state
        self.store = store
        self.watches = watches
        # Bound once: the applier calls these per command and per batch.
        self.apply: Callable[[Command], tuple[Any, list[Event]]] = state.apply
        self.applied: Callable[[list[Event]], None] = watches.publish
        self.encode = encode_entry
        self.decode = decode_entry

    def load(self) -> int:
        """Fill the state and the watch history from the SQLite file; the sequence it covers."""
        applied_seq, events = self.store.load(self.state)
        self.watches.load(events, self.state.revision)
        return applied_seq

    def commit(self, applied_seq: int, events: list[Any]) -> None:
        """Write what was applied since the last commit."""
        self.store.commit(self.state, applied_seq, events)

    def image(self) -> Image:
        """The SQLite file as a snapshot image (the log commits it up to date first)."""
        seq, revision, data = self.store.image()
        return Image(seq, revision, data)
