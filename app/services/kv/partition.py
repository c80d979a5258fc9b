"""A KV log partition as its log sees it: the entry codec, the partition machine, its SQLite file and watchers."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec

from app.log.snapshots import Image
from app.log.user import FileBacked
from app.services.kv.machine import Event, PartitionState
from app.services.kv.messages import Command, Entry
from app.services.kv.store import PartitionStore

_entry_enc = msgspec.msgpack.Encoder()
_entry_dec = msgspec.msgpack.Decoder(Entry)


def encode_entry(commands: Sequence[Command]) -> bytes:
    """One log entry holding a batch of KV commands."""
    return _entry_enc.encode(Entry(list(commands)))


def decode_entry(data: bytes) -> list[Command]:
    """The commands of one log entry."""
    return _entry_dec.decode(data).commands


def stream_name(partition: int) -> str:
    """The JetStream stream of a partition."""
    return f"FLEETMATE_KV_{partition}"


def log_subject(partition: int) -> str:
    """The subject a partition's entries are published on."""
    return f"fleetmate.log.kv.{partition}"


def log_name(partition: int) -> str:
    """The engine's name for a partition's log (also the service name in its log lines)."""
    return f"kv.{partition}"


class PartitionLog(FileBacked):
    """One partition's LogUser (app.log.user): machine, file, and a listener for applied events."""

    store: PartitionStore

    def __init__(
        self, state: PartitionState, store: PartitionStore, listener: Callable[[int, list[Event]], None]
    ) -> None:
        self.state = state
        self.store = store
        self.encode = encode_entry
        self.decode = decode_entry
        self.apply: Callable[[Command], tuple[Any, list[Event]]] = state.apply
        self.begin_entry: Callable[[int], None] = state.begin_entry
        self._listener = listener

    def applied(self, events: list[Any]) -> None:
        """Hand one applied batch's events to the service (watches, splits to act on)."""
        self._listener(self.state.partition, events)

    def load(self) -> int:
        """Fill the state from the SQLite file; the sequence it covers."""
        return self.store.load(self.state)

    def commit(self, applied_seq: int, events: list[Any]) -> None:
        """Write what changed through applied_seq."""
        self.store.commit(self.state, applied_seq, events)

    def image(self) -> Image:
        """Partitions are not snapshotted as a whole: each replica holds other shards (copies move by import)."""
        return Image(self.store.applied_seq(), 0, b"")
