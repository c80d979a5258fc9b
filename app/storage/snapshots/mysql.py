"""Snapshots in MySQL or MariaDB: a meta row and the blob in LONGBLOB chunks (asyncmy)."""

from __future__ import annotations

from typing import ClassVar

from app.storage.snapshots._sql import SqlSnapshotStore


class MySQLSnapshotStore(SqlSnapshotStore):
    """Tables `<prefix>snapshots` and `<prefix>snapshot_chunks` in the sql.dsn database."""

    name: ClassVar[str] = "mysql"
    flavor: ClassVar[str] = "mysql"
    # asyncmy sends a blob as an escaped literal inside the statement, up to twice its size;
    # 1 MiB chunks stay under even MySQL 5.7's default max_allowed_packet of 4 MiB.
    chunk_size: ClassVar[int] = 1 << 20
    ddl: ClassVar[tuple[str, ...]] = (
        "CREATE TABLE IF NOT EXISTS {snapshots} ("
        " service VARCHAR(128) NOT NULL,"
        " seq BIGINT NOT NULL,"
        " meta JSON NOT NULL,"
        " PRIMARY KEY (service, seq)"
        ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
        "CREATE TABLE IF NOT EXISTS {chunks} ("
        " service VARCHAR(128) NOT NULL,"
        " seq BIGINT NOT NULL,"
        " idx INT NOT NULL,"
        " data LONGBLOB NOT NULL,"
        " PRIMARY KEY (service, seq, idx)"
        ") ENGINE=InnoDB DEFAULT CHARSET=utf8mb4",
    )
