"""One partition's local copy on disk: the held shards and their keys in SQLite, with the applied sequence."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from pathlib import Path

from sortedcontainers import SortedDict

from app.services.kv.machine import Event, Held, Item, PartitionState
from app.services.kv.messages import KeyEvent, ShardEvent
from app.storage.sqlite import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, log_id TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS created (shard INTEGER PRIMARY KEY);
CREATE TABLE IF NOT EXISTS shards (
    id INTEGER PRIMARY KEY, start TEXT NOT NULL, "end" TEXT NOT NULL, epoch INTEGER NOT NULL, since INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY, value TEXT NOT NULL, create_rev INTEGER NOT NULL, mod_rev INTEGER NOT NULL,
    version INTEGER NOT NULL, expires INTEGER NOT NULL DEFAULT 0, session INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
"""


class PartitionStore:
    """The file behind one PartitionState: rows change at each commit for the keys and shards that changed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        self.conn: sqlite3.Connection = open_db(path)
        self.conn.executescript(_SCHEMA)
        self._created: set[int] = set()

    def applied_seq(self) -> int:
        """The log sequence the file covers (0 for a new file)."""
        row = self.conn.execute("SELECT seq FROM applied WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def log_id(self) -> str:
        """The log the file follows ("" when not recorded)."""
        row = self.conn.execute("SELECT log_id FROM applied WHERE id = 1").fetchone()
        return str(row[0]) if row else ""

    def set_log_id(self, log_id: str) -> None:
        """Record the log the file follows."""
        with self.conn:
            self.conn.execute(
                "INSERT INTO applied (id, seq, log_id) VALUES (1, 0, ?) ON CONFLICT(id) DO UPDATE SET log_id = ?",
                (log_id, log_id),
            )

    def load(self, state: PartitionState) -> int:
        """Fill the state from the file; the sequence it covers."""
        created = {int(r[0]) for r in self.conn.execute("SELECT shard FROM created")}
        self._created = set(created)
        held = {}
        for sid, start, end, epoch, since in self.conn.execute('SELECT id, start, "end", epoch, since FROM shards'):
            held[sid] = Held(sid, start, end, epoch, SortedDict(self._rows(start, end)), since)
        state.load(held, created)
        return self.applied_seq()

    def _rows(self, start: str, end: str) -> Iterable[tuple[str, Item]]:
        sql = "SELECT key, value, create_rev, mod_rev, version, expires, session FROM kv WHERE key >= ?"
        args: tuple[str, ...] = (start,)
        if end:
            sql, args = sql + " AND key < ?", (start, end)
        for key, value, create, mod, version, expires, session in self.conn.execute(sql + " ORDER BY key", args):
            yield key, Item(value, create, mod, version, expires, session)

    def commit(self, state: PartitionState, seq: int, events: list[Event]) -> None:
        """Write what changed since the last commit (the final value of each key touched), then the sequence."""
        keys: dict[str, int] = {}
        shards: set[int] = set()
        for e in events:
            if isinstance(e, KeyEvent):
                keys[e.key] = e.shard
            elif isinstance(e, ShardEvent):
                shards.add(e.shard)
        puts: list[tuple[str, str, int, int, int, int, int]] = []
        dels: list[tuple[str]] = []
        for key, sid in keys.items():
            shard = state.held.get(sid)
            if shard is None or not shard.covers(key):
                shard = state.locate(key)
            item = shard.items.get(key) if shard is not None else None
            if item is None:
                dels.append((key,))
            else:
                puts.append((key, item.value, item.create, item.mod, item.version, item.expires, item.session))
        new_created = state.created - self._created
        with self.conn:
            if dels:
                self.conn.executemany("DELETE FROM kv WHERE key = ?", dels)
            if puts:
                self.conn.executemany(
                    "INSERT OR REPLACE INTO kv (key, value, create_rev, mod_rev, version, expires, session) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    puts,
                )
            self._write_shards(state, shards)
            if new_created:
                self.conn.executemany("INSERT OR IGNORE INTO created (shard) VALUES (?)", [(s,) for s in new_created])
            self.conn.execute(
                "INSERT INTO applied (id, seq, log_id) VALUES (1, ?, '') ON CONFLICT(id) DO UPDATE SET seq = ?",
                (seq, seq),
            )
        self._created |= new_created

    def _write_shards(self, state: PartitionState, ids: Iterable[int]) -> None:
        for sid in ids:
            shard = state.held.get(sid)
            if shard is None:
                self.conn.execute("DELETE FROM shards WHERE id = ?", (sid,))
            else:
                self.conn.execute(
                    'INSERT OR REPLACE INTO shards (id, start, "end", epoch, since) VALUES (?, ?, ?, ?, ?)',
                    (sid, shard.start, shard.end, shard.epoch, shard.since),
                )

    def installed(self, state: PartitionState, ids: Iterable[int]) -> None:
        """Write imported shards whole (their keys, range, epoch and the position they cover)."""
        ids = list(ids)
        with self.conn:
            for sid in ids:
                shard = state.held[sid]
                self._delete_range(shard.start, shard.end)
                self.conn.executemany(
                    "INSERT INTO kv (key, value, create_rev, mod_rev, version, expires, session) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    ((k, i.value, i.create, i.mod, i.version, i.expires, i.session) for k, i in shard.items.items()),
                )
            self._write_shards(state, ids)
            self.conn.executemany("INSERT OR IGNORE INTO created (shard) VALUES (?)", [(s,) for s in ids])
        self._created.update(ids)

    def dropped(self, shard: Held) -> None:
        """Delete a shard no longer held and its keys."""
        with self.conn:
            self._delete_range(shard.start, shard.end)
            self.conn.execute("DELETE FROM shards WHERE id = ?", (shard.id,))

    def _delete_range(self, start: str, end: str) -> None:
        if end:
            self.conn.execute("DELETE FROM kv WHERE key >= ? AND key < ?", (start, end))
        else:
            self.conn.execute("DELETE FROM kv WHERE key >= ?", (start,))

    def install(self, data: bytes) -> int:
        """No whole-partition snapshot exists (each replica holds other shards): start from an empty file."""
        self.reset()
        return 0

    def reset(self) -> None:
        """Forget everything (the file follows a log that is gone)."""
        with self.conn:
            for table in ("applied", "created", "shards", "kv"):
                self.conn.execute(f"DELETE FROM {table}")  # fixed table names
        self._created = set()

    def close(self) -> None:
        """Close the file."""
        self.conn.close()
