"""The DuckDB time-series store: series, raw points, rollups, the ingested stream sequence; retention.

Every method blocks: the service calls them from its one store thread, never from the event loop.

Tables: `series` (id, name, labels as canonical JSON), `raw` (series_id, ts ms, value), `rollup`
(series_id, bucket ms, count, sum, min, max, p95 per rollup_step bucket), `dirty` (rollup buckets
that late points changed) and `meta` (last_seq, rolled_through, raw_floor, rollup_step).

- append() inserts a batch through an Arrow table and stores the stream sequence it reached in the
  same transaction: after a crash the store holds exactly the messages up to last_seq, so the
  consumer resumes at last_seq + 1 and skips anything at or below it (exactly once).
- maintain() rolls up closed buckets (those that ended a rollup_step ago) from raw, recomputes
  buckets that late points touched, deletes raw older than raw_retention (never past what is rolled
  up, and always at a rollup_step boundary: the "raw floor") and rollups older than rollup_retention.
- Points older than the raw floor when they arrive are dropped (counted): their bucket's raw data is
  gone, so they could not be rolled up correctly.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import duckdb
import msgspec
import pyarrow as pa
import pyarrow.compute as pc

from app.config import MetricsConfig
from app.services.metrics.errors import BadQuery
from app.services.metrics.messages import PointFrame, QueryResult, SeriesInfo, parse_key, series_key
from app.services.metrics.query import MAX_SERIES, Query, build_sql, matches

log = logging.getLogger("fleetmate.metrics")

SCHEMA = """
CREATE TABLE IF NOT EXISTS series (id INTEGER PRIMARY KEY, name VARCHAR NOT NULL, labels VARCHAR NOT NULL);
CREATE TABLE IF NOT EXISTS raw (series_id INTEGER, ts BIGINT, value DOUBLE);
CREATE TABLE IF NOT EXISTS rollup (
    series_id INTEGER, bucket BIGINT, count BIGINT, sum DOUBLE, min DOUBLE, max DOUBLE, p95 DOUBLE
);
CREATE TABLE IF NOT EXISTS dirty (series_id INTEGER, bucket BIGINT);
CREATE TABLE IF NOT EXISTS meta (key VARCHAR PRIMARY KEY, value BIGINT NOT NULL);
"""
META_KEYS = ("last_seq", "rolled_through", "raw_floor", "rollup_step")


def _pack_id(sid: int) -> bytes:
    return sid.to_bytes(4, sys.byteorder, signed=True)


class AppendResult(msgspec.Struct, frozen=True):
    """What one append stored: points kept, points dropped as older than the raw floor, new series."""

    points: int
    dropped: int
    new_series: int


class MetricsStore:
    """One DuckDB file holding this replica's time series."""

    def __init__(self, path: Path, cfg: MetricsConfig) -> None:
        self.path = path
        self.cfg = cfg
        self.step_ms = round(cfg.rollup_step * 1000)
        self._con: duckdb.DuckDBPyConnection | None = None
        self._packed_ids: dict[str, bytes] = {}  # series key -> id as int32 LE (a column piece)
        self._by_id: dict[int, SeriesInfo] = {}
        self._max_id = 0
        self.last_seq = 0
        self.rolled_through = 0  # ms: every bucket before this is rolled up
        self.raw_floor = 0  # ms: raw holds every point from here on; rollups answer for earlier times

    @property
    def con(self) -> duckdb.DuckDBPyConnection:
        """The open connection."""
        if self._con is None:
            raise RuntimeError("the metrics store is not open")
        return self._con

    def open(self) -> None:
        """Open (or create) the file, its tables, and load the series and the stored positions."""
        if sys.byteorder != "little":
            raise RuntimeError("the metrics store reads little-endian point frames as native buffers")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._con = duckdb.connect(str(self.path))
        self.con.execute(SCHEMA)
        stored = dict(self.con.execute("SELECT key, value FROM meta").fetchall())
        for key in META_KEYS:
            if key not in stored:
                value = self.step_ms if key == "rollup_step" else 0
                self.con.execute("INSERT INTO meta VALUES (?, ?)", [key, value])
                stored[key] = value
        if stored["rollup_step"] != self.step_ms:
            log.warning(
                "metrics.rollup_step changed: older rollups keep their step",
                extra={"was_ms": stored["rollup_step"], "now_ms": self.step_ms},
            )
            self.con.execute("UPDATE meta SET value = ? WHERE key = 'rollup_step'", [self.step_ms])
        self.last_seq = stored["last_seq"]
        self.rolled_through = stored["rolled_through"]
        self.raw_floor = stored["raw_floor"]
        for sid, name, labels in self.con.execute("SELECT id, name, labels FROM series").fetchall():
            self._remember(sid, name, labels)

    def _remember(self, sid: int, name: str, labels_json: str) -> None:
        labels: dict[str, str] = json.loads(labels_json)
        self._packed_ids[series_key(name, labels)] = _pack_id(sid)
        self._by_id[sid] = SeriesInfo(name, labels)
        self._max_id = max(self._max_id, sid)

    def close(self) -> None:
        """Checkpoint and close."""
        if self._con is not None:
            con, self._con = self._con, None
            try:
                con.execute("CHECKPOINT")
            finally:
                con.close()

    # ---- ingest ------------------------------------------------------------------------------------

    def append(self, frames: Sequence[PointFrame], last_seq: int) -> AppendResult:
        """Store frames and last_seq in one transaction (frames must be checked, keys canonical)."""
        new: list[tuple[int, str, str]] = []
        sid_parts: list[bytes] = []
        ts_parts: list[bytes] = []
        value_parts: list[bytes] = []
        next_id = self._max_id + 1
        packed = self._packed_ids
        pending: dict[str, bytes] = {}
        for frame in frames:
            for key, count in zip(frame.keys, frame.counts, strict=True):
                sid = packed.get(key) or pending.get(key)
                if sid is None:
                    sid = pending[key] = _pack_id(next_id)
                    name, labels = parse_key(key)
                    new.append((next_id, name, series_key("", labels) or "{}"))
                    next_id += 1
                sid_parts.append(sid * count)
            ts_parts.append(frame.ts)
            value_parts.append(frame.values)
        sids = b"".join(sid_parts)
        total = len(sids) // 4
        con = self.con
        dropped = 0
        con.execute("BEGIN TRANSACTION")
        try:
            if new:
                con.executemany("INSERT INTO series VALUES (?, ?, ?)", new)
            if total:
                ts = pa.Array.from_buffers(pa.int64(), total, [None, pa.py_buffer(b"".join(ts_parts))])
                batch = pa.table(
                    {
                        "series_id": pa.Array.from_buffers(pa.int32(), total, [None, pa.py_buffer(sids)]),
                        "ts": ts,
                        "value": pa.Array.from_buffers(
                            pa.float64(), total, [None, pa.py_buffer(b"".join(value_parts))]
                        ),
                    }
                )
                low = pc.min(ts).as_py()
                con.register("batch", batch)
                try:
                    if low < self.raw_floor:
                        dropped = pc.sum(pc.less(ts, self.raw_floor)).as_py()
                        con.execute("INSERT INTO raw SELECT * FROM batch WHERE ts >= ?", [self.raw_floor])
                    else:
                        con.execute("INSERT INTO raw SELECT * FROM batch")
                    if low < self.rolled_through:
                        con.execute(
                            f"INSERT INTO dirty SELECT DISTINCT series_id, ts // {self.step_ms} * {self.step_ms} "
                            "FROM batch WHERE ts >= ? AND ts < ?",
                            [self.raw_floor, self.rolled_through],
                        )
                finally:
                    con.unregister("batch")
            con.execute("UPDATE meta SET value = ? WHERE key = 'last_seq'", [last_seq])
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        for new_id, series, labels_json in new:
            self._remember(new_id, series, labels_json)
        self.last_seq = last_seq
        return AppendResult(total - dropped, dropped, len(new))

    # ---- rollups and retention ----------------------------------------------------------------------

    def maintain(self, now: float | None = None) -> dict[str, int]:
        """Roll up closed buckets, redo dirty ones, apply retention; returns what it did (rows)."""
        now_ms = round((time.time() if now is None else now) * 1000)
        step = self.step_ms
        closed = (now_ms - step) // step * step
        floor = min((now_ms - round(self.cfg.raw_retention * 1000)) // step * step, max(closed, self.rolled_through))
        rollup_cut = now_ms - round(self.cfg.rollup_retention * 1000)
        rollup_cols = "count(*), sum(value), min(value), max(value), quantile_cont(value, 0.95)"
        done = {"rolled": 0, "redone": 0, "raw_deleted": 0, "rollups_deleted": 0}
        con = self.con
        con.execute("BEGIN TRANSACTION")
        try:
            span = con.execute("SELECT min(bucket), max(bucket) FROM dirty").fetchone()
            if span is not None and span[0] is not None:
                lo, hi = span
                con.execute(
                    "DELETE FROM rollup USING (SELECT DISTINCT series_id, bucket FROM dirty) d "
                    "WHERE rollup.series_id = d.series_id AND rollup.bucket = d.bucket"
                )
                row = con.execute(
                    f"INSERT INTO rollup SELECT r.series_id, r.ts // {step} * {step} AS b, {rollup_cols} "
                    "FROM raw r JOIN (SELECT DISTINCT series_id, bucket FROM dirty) d "
                    f"ON r.series_id = d.series_id AND r.ts // {step} * {step} = d.bucket "
                    "WHERE r.ts >= ? AND r.ts < ? GROUP BY ALL",
                    [lo, hi + step],
                ).fetchone()
                done["redone"] = row[0] if row else 0
                con.execute("DELETE FROM dirty")
            if closed > self.rolled_through:
                row = con.execute(
                    f"INSERT INTO rollup SELECT series_id, ts // {step} * {step} AS b, {rollup_cols} "
                    "FROM raw WHERE ts >= ? AND ts < ? GROUP BY ALL",
                    [self.rolled_through, closed],
                ).fetchone()
                done["rolled"] = row[0] if row else 0
                con.execute("UPDATE meta SET value = ? WHERE key = 'rolled_through'", [closed])
            if floor > self.raw_floor:
                row = con.execute("DELETE FROM raw WHERE ts < ?", [floor]).fetchone()
                done["raw_deleted"] = row[0] if row else 0
                con.execute("UPDATE meta SET value = ? WHERE key = 'raw_floor'", [floor])
            row = con.execute("DELETE FROM rollup WHERE bucket < ?", [rollup_cut]).fetchone()
            done["rollups_deleted"] = row[0] if row else 0
            gone: list[int] = []
            if done["raw_deleted"] or done["rollups_deleted"]:
                # A series whose every point and rollup has expired is forgotten (no longer listed).
                gone = [
                    sid
                    for (sid,) in con.execute(
                        "SELECT id FROM series WHERE id NOT IN (SELECT DISTINCT series_id FROM raw) "
                        "AND id NOT IN (SELECT DISTINCT series_id FROM rollup)"
                    ).fetchall()
                ]
                if gone:
                    con.execute(f"DELETE FROM series WHERE id IN ({', '.join(map(str, gone))})")
            done["series_deleted"] = len(gone)
            con.execute("COMMIT")
        except BaseException:
            con.execute("ROLLBACK")
            raise
        for sid in gone:
            info = self._by_id.pop(sid)
            self._packed_ids.pop(series_key(info.series, info.labels), None)
        self.rolled_through = max(self.rolled_through, closed)
        self.raw_floor = max(self.raw_floor, floor)
        return done

    # ---- reads ---------------------------------------------------------------------------------------

    def matching(self, name: str, query_labels: Any = ()) -> list[int]:
        """Ids of the series called name whose labels meet the conditions, in id order."""
        return sorted(
            sid for sid, info in self._by_id.items() if info.series == name and matches(info.labels, query_labels)
        )

    def query(self, q: Query) -> list[QueryResult]:
        """Downsample the matching series over [q.start, q.end) (see app.services.metrics.query)."""
        ids = self.matching(q.series, q.labels)
        if not ids:
            return []
        if len(ids) > MAX_SERIES:
            raise BadQuery(f"{len(ids)} label sets match: at most {MAX_SERIES}; narrow the labels")
        step_ms = max(1, round(q.step * 1000))
        start_ms, end_ms = round(q.start * 1000), round(q.end * 1000)
        sql = build_sql(q.agg, ids, start_ms, end_ms, step_ms, self.raw_floor)
        rows = self.con.execute(sql).fetchall()
        results: list[QueryResult] = []
        current = -1
        points: list[tuple[float, float]] = []
        for sid, bucket, value in rows:
            if sid != current:
                current = sid
                info = self._by_id[sid]
                points = []
                results.append(QueryResult(info.series, info.labels, q.step, q.agg, points))
            points.append((bucket * step_ms / 1000, value))
        return results

    def series(self, name: str | None = None, query_labels: Any = ()) -> list[SeriesInfo]:
        """Known series (optionally one name), with label conditions, sorted by name then labels."""
        found = [
            info
            for info in self._by_id.values()
            if (name is None or info.series == name) and matches(info.labels, query_labels)
        ]
        return sorted(found, key=lambda i: (i.series, sorted(i.labels.items())))

    @property
    def series_count(self) -> int:
        """How many series the store knows."""
        return len(self._by_id)

    def counts(self) -> tuple[int, int]:
        """Rows in raw and in rollup."""
        raw = self.con.execute("SELECT count(*) FROM raw").fetchone()
        rollup = self.con.execute("SELECT count(*) FROM rollup").fetchone()
        return (raw[0] if raw else 0), (rollup[0] if rollup else 0)
