"""Snapshot stores by name (the `snapshot.store` config key): a new store is a module plus one entry."""

from __future__ import annotations

from pathlib import Path

from app.config import Config
from app.storage.snapshots.base import SnapshotStore
from app.storage.snapshots.file import FileSnapshotStore
from app.storage.snapshots.memory import MemorySnapshotStore
from app.storage.snapshots.mysql import MySQLSnapshotStore
from app.storage.snapshots.postgresql import PostgreSQLSnapshotStore
from app.storage.snapshots.s3 import S3SnapshotStore


def snapshot_dir(cfg: Config) -> Path:
    """The file store's directory: snapshot.dir, or data_dir/snapshots."""
    return Path(cfg.snapshot.dir).expanduser().resolve() if cfg.snapshot.dir else cfg.data_path / "snapshots"


def create(cfg: Config) -> SnapshotStore:
    """The configured store (not yet opened)."""
    kind = cfg.snapshot.store
    if kind == "file":
        return FileSnapshotStore(snapshot_dir(cfg))
    if kind == "memory":
        return MemorySnapshotStore()
    if kind == "s3":
        return S3SnapshotStore(cfg.s3)
    if kind == "mysql":
        return MySQLSnapshotStore(cfg.sql.dsn, cfg.sql.table_prefix)
    return PostgreSQLSnapshotStore(cfg.sql.dsn, cfg.sql.table_prefix)
