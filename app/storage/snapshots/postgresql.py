"""Snapshots in PostgreSQL: a meta row (JSONB) and the blob in BYTEA chunks (asyncpg)."""

from __future__ import annotations

from typing import ClassVar

from app.storage.snapshots._sql import SqlSnapshotStore


class PostgreSQLSnapshotStore(SqlSnapshotStore):
    """Tables `<prefix>snapshots` and `<prefix>snapshot_chunks` in the sql.dsn database."""

    name: ClassVar[str] = "postgresql"
    flavor: ClassVar[str] = "postgresql"
    chunk_size: ClassVar[int] = 4 << 20  # asyncpg sends parameters in binary: no escaping overhead
    ddl: ClassVar[tuple[str, ...]] = (
        "CREATE TABLE IF NOT EXISTS {snapshots} ("
        " service TEXT NOT NULL,"
        " seq BIGINT NOT NULL,"
        " meta JSONB NOT NULL,"
        " PRIMARY KEY (service, seq)"
        ")",
        "CREATE TABLE IF NOT EXISTS {chunks} ("
        " service TEXT NOT NULL,"
        " seq BIGINT NOT NULL,"
        " idx INTEGER NOT NULL,"
        " data BYTEA NOT NULL,"
        " PRIMARY KEY (service, seq, idx)"
        ")",
    )
