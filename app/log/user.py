"""What a log needs from the service it feeds: one collaborator with its codec, machine, store and results."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, TypeVar

from app.log.snapshots import Image

C = TypeVar("C")


class LogUser(Protocol[C]):
    """The service side of one log (the registry's, a KV partition's), given to SharedLog whole.

    Codec: `encode` a batch of commands into one entry, `decode` it back (on every replica).
    Machine: `apply` one command, deterministically; never raises for a command it refuses (the
    refusal is its result); returns (result, events).
    Store: `load` the local copy of the state (returning the sequence it covers), `commit` what was
    applied since the last commit, and for snapshots `image`, `install`, `reset`, the log ids.
    Results: `applied` gets the events of every applied batch, in order (watches, fan-out).
    Optional: `begin_entry(seq)`, called before an entry's commands are applied, for a machine
    whose results depend on the entry's position (the KV's revisions).
    """

    def encode(self, commands: Sequence[C]) -> bytes: ...
    def decode(self, data: bytes) -> Sequence[C]: ...
    def apply(self, command: C) -> tuple[Any, list[Any]]: ...
    def applied(self, events: list[Any]) -> None: ...
    def load(self) -> int: ...
    def commit(self, applied_seq: int, events: list[Any]) -> None: ...
    def image(self) -> Image: ...

    # The local state as snapshot restore sees it (app.log.snapshots.LocalState).
    def applied_seq(self) -> int: ...
    def log_id(self) -> str: ...
    def set_log_id(self, log_id: str) -> None: ...
    def install(self, data: bytes) -> int: ...
    def reset(self) -> None: ...


class LocalFile(Protocol):
    """A service's local copy of its state on disk, as snapshot restore reads and replaces it."""

    def applied_seq(self) -> int: ...
    def log_id(self) -> str: ...
    def set_log_id(self, log_id: str) -> None: ...
    def install(self, data: bytes) -> int: ...
    def reset(self) -> None: ...


class FileBacked:
    """The local-state half of a LogUser, handed to its store file (the registry's, the scheduler's)."""

    store: LocalFile

    def applied_seq(self) -> int:
        """The sequence the file covers."""
        return self.store.applied_seq()

    def log_id(self) -> str:
        """The log the file follows."""
        return self.store.log_id()

    def set_log_id(self, log_id: str) -> None:
        """Record the log the file follows."""
        self.store.set_log_id(log_id)

    def install(self, data: bytes) -> int:
        """Replace the file with a snapshot image; the sequence it covers."""
        return self.store.install(data)

    def reset(self) -> None:
        """Empty the file (it follows a log that is gone)."""
        self.store.reset()
