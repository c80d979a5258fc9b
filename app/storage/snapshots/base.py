"""The snapshot-store interface: save, list newest first, load with checksum check, delete, prune."""

from __future__ import annotations

import builtins
import hashlib
import logging
from abc import ABC, abstractmethod
from typing import ClassVar

import msgspec

log = logging.getLogger("fleetmate.snapshots")

SNAPSHOT_FORMAT = 1


class SnapshotMeta(msgspec.Struct, frozen=True):
    """What a snapshot holds and how to check it; stored beside (or inside) the blob."""

    service: str
    seq: int
    revision: int
    created_at: float
    node_id: str
    size: int
    sha256: str
    format: int = SNAPSHOT_FORMAT
    #: The identity of the log the snapshot continues (see LogBounds.log_id); "" when not known.
    log_id: str = ""

    @property
    def name(self) -> str:
        """A name that sorts by sequence: `<service>-<seq, 20 digits>`."""
        return f"{self.service}-{self.seq:020d}"


class SnapshotCorrupt(Exception):
    """A snapshot that cannot be read back intact (missing blob, checksum or size mismatch)."""


def make_meta(
    service: str, seq: int, revision: int, created_at: float, node_id: str, data: bytes, log_id: str = ""
) -> SnapshotMeta:
    """Meta for a blob, with its size and SHA-256."""
    return SnapshotMeta(
        service=service,
        seq=seq,
        revision=revision,
        created_at=created_at,
        node_id=node_id,
        size=len(data),
        sha256=hashlib.sha256(data).hexdigest(),
        log_id=log_id,
    )


class SnapshotStore(ABC):
    """Where snapshots live. Backends implement the primitives; callers use the public methods."""

    name: ClassVar[str]
    #: True when other replicas can read what this one saved (the log may be trimmed behind it).
    shared: ClassVar[bool] = True
    #: True when snapshots outlive this process.
    durable: ClassVar[bool] = True

    async def open(self) -> None:  # noqa: B027 - optional hook
        """Create tables, buckets or directories; called once before use."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""

    def describe(self) -> str:
        """Where the snapshots are, for logs and `fleetmate restore` (no secrets)."""
        return self.name

    async def save(self, meta: SnapshotMeta, data: bytes) -> None:
        """Store a snapshot; a save of an existing (service, seq) replaces it."""
        if meta.size != len(data):
            raise ValueError("meta.size does not match the data")
        await self._save(meta, data)
        log.info("snapshot saved", extra={"store": self.name, "snapshot": meta.name, "bytes": meta.size})

    async def list(self, service: str) -> list[SnapshotMeta]:
        """Every snapshot of a service, newest (highest seq) first."""
        return sorted(await self._list(service), key=lambda m: m.seq, reverse=True)

    async def load(self, meta: SnapshotMeta) -> bytes:
        """The blob, checked against meta; SnapshotCorrupt when it is missing or damaged."""
        try:
            data = await self._load(meta)
        except SnapshotCorrupt:
            raise
        except Exception as exc:
            raise SnapshotCorrupt(f"{meta.name}: cannot read it: {exc!r}") from exc
        if len(data) != meta.size:
            raise SnapshotCorrupt(f"{meta.name}: {len(data)} bytes, expected {meta.size}")
        if hashlib.sha256(data).hexdigest() != meta.sha256:
            raise SnapshotCorrupt(f"{meta.name}: checksum mismatch")
        return data

    async def delete(self, meta: SnapshotMeta) -> None:
        """Remove one snapshot (missing is fine)."""
        await self._delete(meta)

    async def prune(self, service: str, keep: int) -> builtins.list[SnapshotMeta]:
        """Delete all but the newest `keep` snapshots and what cut-short saves left behind them.

        Returns what is kept, newest first.
        """
        metas = await self.list(service)
        for old in metas[keep:]:
            await self.delete(old)
        kept = metas[:keep]
        if kept:
            try:
                await self._sweep(service, kept[-1].seq)
            except Exception as exc:  # leftovers cost space only; the next prune tries again
                log.warning("snapshot leftovers not removed", extra={"store": self.name, "error": repr(exc)})
        return kept

    async def _sweep(self, service: str, below_seq: int) -> None:  # noqa: B027 - optional primitive
        """Remove what a save or delete cut short left for sequences below below_seq (default: nothing).

        A process killed midway leaves a temporary file or a blob without its meta: never listed,
        so never restored, but never deleted by prune either. Only sequences below the oldest kept
        snapshot are swept: a save still running there would be pruned at once anyway.
        """

    @abstractmethod
    async def _save(self, meta: SnapshotMeta, data: bytes) -> None: ...

    @abstractmethod
    async def _list(self, service: str) -> builtins.list[SnapshotMeta]: ...

    @abstractmethod
    async def _load(self, meta: SnapshotMeta) -> bytes: ...

    @abstractmethod
    async def _delete(self, meta: SnapshotMeta) -> None: ...
