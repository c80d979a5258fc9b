"""The registry's SQLite file: nodes, sessions, watch-event history and the applied sequence, in one transaction."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from app.services.registry.messages import Event
from app.services.registry.state import RegistryState, SessionRecord, Znode
from app.storage.sqlite import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    term INTEGER NOT NULL,
    leader TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS nodes (path TEXT PRIMARY KEY, row BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS sessions (id INTEGER PRIMARY KEY, row BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS event_batches (
    pos INTEGER PRIMARY KEY AUTOINCREMENT,
    count INTEGER NOT NULL,
    last_rev INTEGER NOT NULL,
    rows BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS log (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    log_id TEXT NOT NULL
);
"""

_enc = msgspec.msgpack.Encoder()
_node_dec = msgspec.msgpack.Decoder(Znode)
_session_dec = msgspec.msgpack.Decoder(SessionRecord)
_events_dec = msgspec.msgpack.Decoder(list[Event])


def _without_wal(data: bytes) -> bytes:
    if len(data) >= 100 and data[18:20] == b"\x02\x02":
        # The image of a WAL database says so in its header; an in-memory copy cannot be
        # in WAL mode, so mark it as a rollback-journal file (the new file turns WAL on open).
        return data[:18] + b"\x01\x01" + data[20:]
    return data


def image_position(data: bytes) -> tuple[int, int]:
    """(applied sequence, revision) that an image says it holds; ValueError when it is no registry image."""
    probe = sqlite3.connect(":memory:")
    try:
        probe.deserialize(_without_wal(data))
        row = probe.execute("SELECT seq, revision FROM applied WHERE id = 1").fetchone()
    except sqlite3.DatabaseError as exc:
        raise ValueError(f"not a registry image: {exc}") from exc
    finally:
        probe.close()
    return (int(row[0]), int(row[1])) if row else (0, 0)


def rebase_image(data: bytes, seq: int, revision: int) -> bytes:
    """The same state, placed at log sequence `seq` with its revision counter at `revision` (`fleetmate restore`).

    The nodes keep their stats; only the counter moves, so the next write gets revision + 1 and
    revisions never go back below what clients of the abandoned history have seen.
    """
    probe = sqlite3.connect(":memory:")
    try:
        try:
            probe.deserialize(_without_wal(data))
            row = probe.execute("SELECT term, leader FROM applied WHERE id = 1").fetchone()
            term, leader = row or (0, "")
            probe.executescript(_SCHEMA)  # an image from an older version may lack a table
            with probe:
                probe.execute("DELETE FROM log")
                probe.execute(
                    "INSERT OR REPLACE INTO applied (id, seq, revision, term, leader) VALUES (1, ?, ?, ?, ?)",
                    (seq, revision, term, leader),
                )
        except sqlite3.DatabaseError as exc:
            raise ValueError(f"not a registry image: {exc}") from exc
        return probe.serialize()
    finally:
        probe.close()


class RegistryStore:
    """Persists what apply changed; load() rebuilds a RegistryState and the applied sequence."""

    def __init__(self, path: Path, history: int) -> None:
        self.path = path
        self.history = history
        self.conn: sqlite3.Connection = open_db(path)
        self.conn.executescript(_SCHEMA)
        self._since_trim = 0

    def applied_seq(self) -> int:
        """The log sequence the file has applied (0 for a new file)."""
        row = self.conn.execute("SELECT seq FROM applied WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def image(self) -> tuple[int, int, bytes]:
        """(applied seq, revision, the whole database as bytes), consistent: taken between commits."""
        row = self.conn.execute("SELECT seq, revision FROM applied WHERE id = 1").fetchone()
        seq, revision = row or (0, 0)
        return seq, revision, self.conn.serialize()

    def install(self, data: bytes) -> int:
        """Replace the file with a snapshot image; return the sequence the image applied.

        The image is checked (it must open as a registry database) before anything local is
        touched; then it is written beside the file and renamed over it.
        """
        data = _without_wal(data)
        probe = sqlite3.connect(":memory:")
        try:
            try:
                probe.deserialize(data)
                row = probe.execute("SELECT seq FROM applied WHERE id = 1").fetchone()
                probe.execute("SELECT count(*) FROM nodes").fetchone()
            except sqlite3.DatabaseError as exc:
                raise ValueError(f"not a registry image: {exc}") from exc
            seq = int(row[0]) if row else 0
            tmp = self.path.with_name(self.path.name + ".restore")
            tmp.unlink(missing_ok=True)
            target = sqlite3.connect(tmp)
            try:
                probe.backup(target)
            finally:
                target.close()
        finally:
            probe.close()
        self.conn.close()
        for suffix in ("-wal", "-shm"):
            self.path.with_name(self.path.name + suffix).unlink(missing_ok=True)
        tmp.replace(self.path)
        self.conn = open_db(self.path)
        self.conn.executescript(_SCHEMA)
        return seq

    def position(self) -> tuple[int, int]:
        """(applied sequence, revision) of the file's state ((0, 0) for a new file)."""
        row = self.conn.execute("SELECT seq, revision FROM applied WHERE id = 1").fetchone()
        return (int(row[0]), int(row[1])) if row else (0, 0)

    def log_id(self) -> str:
        """The identity of the log this file's state follows ("" when not recorded)."""
        row = self.conn.execute("SELECT log_id FROM log WHERE id = 1").fetchone()
        return str(row[0]) if row else ""

    def set_log_id(self, log_id: str) -> None:
        """Record which log the state follows (local to this replica: never replicated)."""
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO log (id, log_id) VALUES (1, ?)", (log_id,))

    def reset(self) -> None:
        """Forget the local state (it follows a log that is gone): an empty registry at sequence 0."""
        with self.conn:
            for table in ("applied", "nodes", "sessions", "event_batches", "log"):
                self.conn.execute(f"DELETE FROM {table}")

    def load(self, state: RegistryState) -> tuple[int, list[Event]]:
        """Fill state from the file; return (applied stream sequence, retained events oldest first)."""
        row = self.conn.execute("SELECT seq, revision, term, leader FROM applied WHERE id = 1").fetchone()
        seq, revision, term, leader = row or (0, 0, 0, "")
        nodes = {p: _node_dec.decode(row) for p, row in self.conn.execute("SELECT path, row FROM nodes")}
        sessions = {sid: _session_dec.decode(row) for sid, row in self.conn.execute("SELECT id, row FROM sessions")}
        state.load(nodes, sessions, revision=revision, term=term, leader=leader)
        # Newest batches first, until the history is full; each row holds one commit's events.
        batches: list[list[Event]] = []
        kept = 0
        for (rows,) in self.conn.execute("SELECT rows FROM event_batches ORDER BY pos DESC"):
            if kept >= self.history:
                break
            batch = _events_dec.decode(rows)
            batches.append(batch)
            kept += len(batch)
        events = [e for batch in reversed(batches) for e in batch][-self.history :] if self.history else []
        return seq, events

    def commit(self, state: RegistryState, applied_seq: int, events: list[Event]) -> None:
        """Write the changed rows, new events and the applied sequence atomically."""
        nodes, sessions, _ = state.take_dirty()
        conn = self.conn
        conn.execute("BEGIN")
        try:
            upserts, deletes = [], []
            for path in nodes:
                node = state.nodes.get(path)
                if node is None:
                    deletes.append((path,))
                else:
                    upserts.append((path, _enc.encode(node)))
            if deletes:
                conn.executemany("DELETE FROM nodes WHERE path = ?", deletes)
            if upserts:
                conn.executemany("INSERT OR REPLACE INTO nodes (path, row) VALUES (?, ?)", upserts)
            for sid in sessions:
                record = state.sessions.get(sid)
                if record is None:
                    conn.execute("DELETE FROM sessions WHERE id = ?", (sid,))
                else:
                    conn.execute("INSERT OR REPLACE INTO sessions (id, row) VALUES (?, ?)", (sid, _enc.encode(record)))
            if events and self.history:
                # One row per commit (a few hundred events at load), not one per event: a
                # row per event was most of the commit's cost.
                kept = events[-self.history :]
                conn.execute(
                    "INSERT INTO event_batches (count, last_rev, rows) VALUES (?, ?, ?)",
                    (len(kept), kept[-1].revision, _enc.encode(kept)),
                )
                self._since_trim += len(kept)
                if self._since_trim > max(1000, self.history // 10):
                    self._trim_events()
                    self._since_trim = 0
            conn.execute(
                "INSERT OR REPLACE INTO applied (id, seq, revision, term, leader) VALUES (1, ?, ?, ?, ?)",
                (applied_seq, state.revision, state.term, state.leader),
            )
            conn.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk does that); the rows stay dirty so
            # the next commit writes them, whatever else changes meanwhile.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            state.dirty_nodes |= nodes
            state.dirty_sessions |= sessions
            raise

    def _trim_events(self) -> None:
        # Keep the newest batches that hold `history` events; drop every older batch.
        total = 0
        for pos, count in self.conn.execute("SELECT pos, count FROM event_batches ORDER BY pos DESC"):
            total += count
            if total >= self.history:
                self.conn.execute("DELETE FROM event_batches WHERE pos < ?", (pos,))
                return

    def close(self) -> None:
        """Close the file."""
        self.conn.close()
