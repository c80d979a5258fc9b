"""Open SQLite databases the way fleetmate uses them: WAL, one writer, NORMAL sync (the log is the truth)."""

from __future__ import annotations

import sqlite3
from pathlib import Path


def open_db(path: Path) -> sqlite3.Connection:
    """A connection in WAL mode with autocommit off by explicit transactions.

    synchronous=NORMAL: a power cut may lose the last commits, never corrupt; the
    applied sequence is stored with the state, so a restart replays what was lost
    from the JetStream log, which is fsynced before it acknowledges.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA foreign_keys=ON")
    conn.execute("PRAGMA busy_timeout=5000")
    return conn
