"""The scheduler's local copy of its applied state: one SQLite file holding the state image and the applied sequence."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import msgspec

from app.services.scheduler.model import Cluster, Procedure
from app.services.scheduler.state import SchedulerState
from app.storage.sqlite import open_db

_SCHEMA = """
CREATE TABLE IF NOT EXISTS applied (id INTEGER PRIMARY KEY CHECK (id = 1), seq INTEGER NOT NULL, image BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS log (id INTEGER PRIMARY KEY CHECK (id = 1), log_id TEXT NOT NULL);
"""


class StateImage(msgspec.Struct, array_like=True):
    """The whole scheduler state at an applied sequence (what the file and a snapshot hold)."""

    seq: int
    revision: int
    term: int
    leader: str
    next_proc: int
    clusters: dict[str, Cluster]
    procedures: list[Procedure]
    finished: list[int]
    elections: list[tuple[int, str, int]] = []


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(StateImage)


def to_image(state: SchedulerState, seq: int) -> bytes:
    """The state as bytes."""
    return _enc.encode(
        StateImage(
            seq,
            state.revision,
            state.term,
            state.leader,
            state.next_proc,
            state.clusters,
            list(state.procedures.values()),
            state.finished,
            state.elections,
        )
    )


def from_image(data: bytes, state: SchedulerState) -> int:
    """Fill `state` from an image (ValueError if it is not one); the sequence it covers."""
    try:
        img = _dec.decode(data)
    except msgspec.DecodeError as exc:
        raise ValueError(f"not a scheduler image: {exc}") from exc
    state.clusters = img.clusters
    state.procedures = {p.id: p for p in img.procedures}
    state.finished = list(img.finished)
    state.elections = [tuple(e) for e in img.elections]  # type: ignore[misc]  # msgspec gives tuples already
    state.next_proc, state.term, state.leader, state.revision = img.next_proc, img.term, img.leader, img.revision
    state.busy = {
        (p.cluster, sid): p.id for p in state.procedures.values() if not p.finished for sid in (*p.epochs, *p.op.shards)
    }
    return img.seq


class SchedulerStore:
    """The state image in SQLite, written whole at each commit (the log batches commits)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn: sqlite3.Connection = open_db(path)
        self.conn.executescript(_SCHEMA)

    def applied_seq(self) -> int:
        """The log sequence the file covers (0 for a new file)."""
        row = self.conn.execute("SELECT seq FROM applied WHERE id = 1").fetchone()
        return int(row[0]) if row else 0

    def load(self, state: SchedulerState) -> int:
        """Fill the state from the file; the sequence it covers."""
        row = self.conn.execute("SELECT image FROM applied WHERE id = 1").fetchone()
        return from_image(row[0], state) if row else 0

    def commit(self, state: SchedulerState, seq: int) -> None:
        """Write the state as applied through `seq`."""
        with self.conn:
            self.conn.execute(
                "INSERT OR REPLACE INTO applied (id, seq, image) VALUES (1, ?, ?)", (seq, to_image(state, seq))
            )

    def image(self) -> tuple[int, int, bytes]:
        """(seq, revision, image bytes) as last committed."""
        row = self.conn.execute("SELECT seq, image FROM applied WHERE id = 1").fetchone()
        if not row:
            return 0, 0, to_image(SchedulerState(), 0)
        probe = SchedulerState()
        from_image(row[1], probe)
        return int(row[0]), probe.revision, bytes(row[1])

    def install(self, data: bytes) -> int:
        """Replace the state with a snapshot image (checked first); the sequence it covers."""
        seq = from_image(data, SchedulerState())
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO applied (id, seq, image) VALUES (1, ?, ?)", (seq, data))
        return seq

    def log_id(self) -> str:
        """The log the file follows ("" when not recorded)."""
        row = self.conn.execute("SELECT log_id FROM log WHERE id = 1").fetchone()
        return str(row[0]) if row else ""

    def set_log_id(self, log_id: str) -> None:
        """Record the log the file follows."""
        with self.conn:
            self.conn.execute("INSERT OR REPLACE INTO log (id, log_id) VALUES (1, ?)", (log_id,))

    def reset(self) -> None:
        """Forget the state (it follows a log that is gone)."""
        with self.conn:
            self.conn.execute("DELETE FROM applied")
            self.conn.execute("DELETE FROM log")

    def close(self) -> None:
        """Close the file."""
        self.conn.close()
