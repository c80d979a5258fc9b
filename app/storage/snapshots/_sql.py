"""The SQL snapshot store shared by the mysql and postgresql modules: a meta row plus the blob in chunk rows."""

from __future__ import annotations

from typing import ClassVar

import msgspec

from app import failpoints
from app.config import sql_flavor
from app.storage import sqldb
from app.storage.snapshots.base import SnapshotCorrupt, SnapshotMeta, SnapshotStore, log

_meta_dec = msgspec.json.Decoder(SnapshotMeta)


class SqlSnapshotStore(SnapshotStore):
    """`<prefix>snapshots` (service, seq, meta JSON) and `<prefix>snapshot_chunks` (service, seq, idx, data).

    A save is one transaction that first removes any snapshot with the same (service, seq), so
    a snapshot is listed only once all its chunks are in, and a re-save replaces it. Chunks keep
    every statement well under the server's packet limit whatever the blob's size. Subclasses give
    the flavor, the DDL and the chunk size.
    """

    flavor: ClassVar[str]
    chunk_size: ClassVar[int]
    ddl: ClassVar[tuple[str, ...]]

    def __init__(self, dsn: str, table_prefix: str = "fleetmate_") -> None:
        if sql_flavor(dsn) != self.flavor:
            raise ValueError(f"{self.name} snapshot store needs a {self.flavor} DSN, got {sqldb.redact(dsn)}")
        self.dsn = dsn
        self.snapshots = f"{table_prefix}snapshots"
        self.chunks = f"{table_prefix}snapshot_chunks"
        self._db: sqldb.Database | None = None

    @property
    def db(self) -> sqldb.Database:
        """The open pool (after open())."""
        if self._db is None:
            raise RuntimeError(f"{self.name} snapshot store used before open()")
        return self._db

    async def open(self) -> None:
        if self._db is None:
            db = await sqldb.connect(self.dsn)
            try:
                await sqldb.ensure_schema(
                    db, [s.format(snapshots=self.snapshots, chunks=self.chunks) for s in self.ddl]
                )
            except BaseException:
                await db.close()
                raise
            self._db = db

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    def describe(self) -> str:
        return f"table {self.snapshots} in {sqldb.redact(self.dsn)}"

    async def _save(self, meta: SnapshotMeta, data: bytes) -> None:
        try:
            await self._save_once(meta, data)
        except sqldb.SqlConflict:
            # Another replica saved the same (service, seq) at the same moment: replace its copy.
            await self._save_once(meta, data)

    async def _save_once(self, meta: SnapshotMeta, data: bytes) -> None:
        async with self.db.transaction() as tx:
            await self._remove(tx, meta.service, meta.seq)
            await tx.execute(
                f"INSERT INTO {self.snapshots} (service, seq, meta) VALUES (?, ?, ?)",
                meta.service,
                meta.seq,
                msgspec.json.encode(meta).decode(),
            )
            step = self.chunk_size
            for idx, start in enumerate(range(0, max(len(data), 1), step)):
                await tx.execute(
                    f"INSERT INTO {self.chunks} (service, seq, idx, data) VALUES (?, ?, ?, ?)",
                    meta.service,
                    meta.seq,
                    idx,
                    data[start : start + step],
                )
            failpoints.hit("snapshot.write")  # every row written, the transaction not committed

    async def _remove(self, tx: sqldb.Executor, service: str, seq: int) -> None:
        await tx.execute(f"DELETE FROM {self.chunks} WHERE service = ? AND seq = ?", service, seq)
        await tx.execute(f"DELETE FROM {self.snapshots} WHERE service = ? AND seq = ?", service, seq)

    async def _list(self, service: str) -> list[SnapshotMeta]:
        out = []
        for (raw,) in await self.db.fetch(f"SELECT meta FROM {self.snapshots} WHERE service = ?", service):
            try:
                out.append(_meta_dec.decode(raw))
            except msgspec.DecodeError as exc:
                log.error("unreadable snapshot meta skipped", extra={"store": self.name, "error": str(exc)})
        return out

    async def _load(self, meta: SnapshotMeta) -> bytes:
        rows = await self.db.fetch(
            f"SELECT idx, data FROM {self.chunks} WHERE service = ? AND seq = ? ORDER BY idx", meta.service, meta.seq
        )
        if not rows:
            raise SnapshotCorrupt(f"{meta.name}: no such snapshot in {self.snapshots}")
        if [idx for idx, _ in rows] != list(range(len(rows))):
            raise SnapshotCorrupt(f"{meta.name}: chunks missing in {self.chunks}")
        return b"".join(bytes(data) for _, data in rows)

    async def _delete(self, meta: SnapshotMeta) -> None:
        async with self.db.transaction() as tx:
            await self._remove(tx, meta.service, meta.seq)
