"""Snapshots kept in this process only (Mate's null backend): nothing survives a restart."""

from __future__ import annotations

from typing import ClassVar

from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore


class MemorySnapshotStore(SnapshotStore):
    """A dict of snapshots. The log is never trimmed behind them: a wiped replica replays it all."""

    name: ClassVar[str] = "memory"
    shared: ClassVar[bool] = False
    durable: ClassVar[bool] = False

    def __init__(self) -> None:
        self._items: dict[tuple[str, int], tuple[SnapshotMeta, bytes]] = {}

    async def _save(self, meta: SnapshotMeta, data: bytes) -> None:
        self._items[(meta.service, meta.seq)] = (meta, data)

    async def _list(self, service: str) -> list[SnapshotMeta]:
        return [meta for (svc, _), (meta, _) in self._items.items() if svc == service]

    async def _load(self, meta: SnapshotMeta) -> bytes:
        try:
            return self._items[(meta.service, meta.seq)][1]
        except KeyError:
            raise SnapshotCorrupt(f"{meta.name}: not in memory") from None

    async def _delete(self, meta: SnapshotMeta) -> None:
        self._items.pop((meta.service, meta.seq), None)
