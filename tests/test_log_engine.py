"""The log engine runs independent logs in one process: each its own stream, applied sequence,
restart point, snapshots and trimming (issue 19), on a real nats-server."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgspec

from app.bus.connection import Bus
from app.config import SnapshotConfig
from app.log.host import LogEngine, OpenLog, SnapshotPolicy
from app.log.snapshots import Image
from app.storage.snapshots.file import FileSnapshotStore
from tests.harness import NatsServer

Cmd = tuple[str, int]  # set key to value


class KvLog:
    """The smallest complete LogUser: a dict of str -> int kept in its own SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)  # restore installs on a thread
        self.conn.executescript(
            "CREATE TABLE IF NOT EXISTS kv (k TEXT PRIMARY KEY, v INTEGER);"
            "CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY, seq INTEGER, log TEXT);"
            "INSERT OR IGNORE INTO meta VALUES (1, 0, '');"
        )
        self.data: dict[str, int] = {}
        self.dirty: set[str] = set()
        self.seen: list[Cmd] = []  # events handed to applied(), in order

    # codec and machine
    def encode(self, commands: Sequence[Cmd]) -> bytes:
        return msgspec.msgpack.encode(list(commands))

    def decode(self, data: bytes) -> list[Cmd]:
        return [tuple(c) for c in msgspec.msgpack.decode(data)]  # type: ignore[misc]

    def apply(self, cmd: Cmd) -> tuple[Any, list[Any]]:
        key, value = cmd
        self.data[key] = value
        self.dirty.add(key)
        return value, [cmd]

    def applied(self, events: list[Any]) -> None:
        self.seen.extend(events)

    # store
    def load(self) -> int:
        self.data = dict(self.conn.execute("SELECT k, v FROM kv"))
        return self.applied_seq()

    def commit(self, applied_seq: int, events: list[Any]) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?)", [(k, self.data[k]) for k in self.dirty])
            self.conn.execute("UPDATE meta SET seq = ? WHERE id = 1", (applied_seq,))
        self.dirty.clear()

    def image(self) -> Image:
        seq = self.applied_seq()
        rows = dict(self.conn.execute("SELECT k, v FROM kv"))
        return Image(seq, seq, json.dumps({"seq": seq, "kv": rows}).encode())

    def applied_seq(self) -> int:
        return int(self.conn.execute("SELECT seq FROM meta WHERE id = 1").fetchone()[0])

    def log_id(self) -> str:
        return str(self.conn.execute("SELECT log FROM meta WHERE id = 1").fetchone()[0])

    def set_log_id(self, log_id: str) -> None:
        self.conn.execute("UPDATE meta SET log = ? WHERE id = 1", (log_id,))

    def install(self, data: bytes) -> int:
        image = json.loads(data)
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("DELETE FROM kv")
            self.conn.executemany("INSERT INTO kv VALUES (?, ?)", list(image["kv"].items()))
            self.conn.execute("UPDATE meta SET seq = ? WHERE id = 1", (image["seq"],))
        return int(image["seq"])

    def reset(self) -> None:
        with self.conn:
            self.conn.execute("BEGIN")
            self.conn.execute("DELETE FROM kv")
            self.conn.execute("UPDATE meta SET seq = 0, log = '' WHERE id = 1")


async def _open(engine: LogEngine, name: str, user: KvLog, snapshots: SnapshotPolicy | None = None) -> OpenLog[Cmd]:
    return await engine.open(
        name, user, stream=f"T_{name.upper()}", subject=f"t.log.{name}", replicas=1, snapshots=snapshots
    )


async def test_two_logs_in_one_process_resume_snapshot_and_trim_independently(
    nats_server: NatsServer, tmp_path: Path
) -> None:
    snaps = FileSnapshotStore(tmp_path / "snapshots")
    await snaps.open()
    # alpha: a durable store, the leader's trimming; beta: no snapshots kept, never trimmed.
    alpha_policy = SnapshotPolicy(
        snaps, SnapshotConfig(every_entries=0, every_seconds=0, keep=1, on_stop_timeout=0), is_leader=lambda: True
    )
    bus = Bus([nats_server.url], "test-engine")
    await bus.connect(timeout=10)
    try:
        engine = LogEngine(bus, "t")
        alpha = await _open(engine, "alpha", KvLog(tmp_path / "alpha.sqlite"), alpha_policy)
        beta = await _open(engine, "beta", KvLog(tmp_path / "beta.sqlite"))
        assert engine.names == ["alpha", "beta"]
        for i in range(50):
            assert await alpha.log.append((f"a{i % 10}", i)) == i
        for i in range(30):
            assert await beta.log.append((f"b{i % 5}", 100 + i)) == 100 + i
        assert (alpha.log.applied_seq, beta.log.applied_seq) == (50, 30)
        assert alpha.user.data == {f"a{k}": 40 + k for k in range(10)}
        assert beta.user.seen == [(f"b{i % 5}", 100 + i) for i in range(30)]  # only its own entries
        await engine.close_all()

        # A restart: each log resumes from its own applied sequence, replaying nothing it committed.
        engine = LogEngine(bus, "t")
        alpha_user, beta_user = KvLog(tmp_path / "alpha.sqlite"), KvLog(tmp_path / "beta.sqlite")
        alpha = await _open(engine, "alpha", alpha_user, alpha_policy)
        beta = await _open(engine, "beta", beta_user)
        assert (alpha.log.applied_seq, beta.log.applied_seq) == (50, 30)
        assert (alpha_user.seen, beta_user.seen) == ([], [])
        assert alpha_user.data == {f"a{k}": 40 + k for k in range(10)}
        assert beta_user.data == {f"b{k}": 125 + k for k in range(5)}

        # A snapshot and trim of alpha leave beta's stream whole.
        await alpha.log.append(("a0", 999))
        meta = await alpha.snapshots.take()
        assert meta.seq == 51
        alpha_bounds, beta_bounds = await alpha.log.bounds(), await beta.log.bounds()
        assert alpha_bounds.first_seq == 52  # everything the snapshot covers is gone from the log
        assert (beta_bounds.first_seq, beta_bounds.last_seq, beta_bounds.messages) == (1, 30, 30)
        assert await beta.log.append(("b0", 7)) == 7
        assert await alpha.log.append(("a1", 8)) == 8
        await engine.close_all()

        # alpha loses its file: it restores the snapshot and replays the rest; beta is untouched.
        (tmp_path / "alpha.sqlite").unlink()
        engine = LogEngine(bus, "t")
        alpha_user, beta_user = KvLog(tmp_path / "alpha.sqlite"), KvLog(tmp_path / "beta.sqlite")
        alpha = await _open(engine, "alpha", alpha_user, alpha_policy)
        beta = await _open(engine, "beta", beta_user)
        assert alpha.recovery.restored is not None
        assert alpha.recovery.restored.seq == 51
        assert beta.recovery.restored is None
        assert alpha_user.data == {**{f"a{k}": 40 + k for k in range(10)}, "a0": 999, "a1": 8}
        assert beta_user.data == {**{f"b{k}": 125 + k for k in range(5)}, "b0": 7}
        assert (alpha.log.applied_seq, beta.log.applied_seq) == (52, 31)
        await engine.close_all()
    finally:
        await bus.close()


async def test_a_log_opens_and_closes_while_another_runs(nats_server: NatsServer, tmp_path: Path) -> None:
    """As the KV will open and close partitions at run time."""
    bus = Bus([nats_server.url], "test-engine")
    await bus.connect(timeout=10)
    try:
        engine = LogEngine(bus, "t")
        steady = await _open(engine, "steady", KvLog(tmp_path / "steady.sqlite"))
        for round_ in range(3):
            part = await _open(engine, "part", KvLog(tmp_path / "part.sqlite"))
            assert await part.log.append(("p", round_)) == round_
            assert await steady.log.append(("s", round_)) == round_
            await engine.close("part")
            assert engine.names == ["steady"]
        assert steady.log.applied_seq == 3
        part = await _open(engine, "part", KvLog(tmp_path / "part.sqlite"))
        assert (part.log.applied_seq, part.user.data) == (3, {"p": 2})
        await engine.close_all()
    finally:
        await bus.close()


async def test_a_consumer_that_stops_delivering_is_replaced(nats_server: NatsServer, tmp_path: Path) -> None:
    """nats-py's ordered consumer can stop for good (its heartbeat watch ends on an unexpected error):
    the log notices nothing arrives while the stream has more, and subscribes again from where it is."""
    bus = Bus([nats_server.url], "test-engine")
    await bus.connect(timeout=10)
    try:
        engine = LogEngine(bus, "t")
        opened = await _open(engine, "stall", KvLog(tmp_path / "stall.sqlite"))
        shared = opened.log
        assert await shared.append(("a", 1)) == 1
        await shared._sub.unsubscribe()  # the consumer is gone; nothing tells the log
        for value in range(2, 6):  # another replica's writes land in the stream
            await bus.js.publish("t.log.stall", opened.user.encode([("a", value)]))
        await shared.wait_applied(5, timeout=20)
        assert shared.resubscribed == 1
        assert opened.user.data == {"a": 5}
        assert await shared.append(("a", 6)) == 6
        await engine.close_all()
    finally:
        await bus.close()


async def test_entries_lost_inside_the_log_are_skipped(nats_server: NatsServer, tmp_path: Path) -> None:
    """A server that failed to store an entry (disk full) leaves a hole inside the stream: nobody was told it
    was appended, so the replicas skip it and go on (a trimmed log, by contrast, needs a snapshot)."""
    bus = Bus([nats_server.url], "test-engine")
    await bus.connect(timeout=10)
    try:
        engine = LogEngine(bus, "t")
        writer = await _open(engine, "holes", KvLog(tmp_path / "writer.sqlite"))
        for value in (1, 2, 3):
            assert await writer.log.append(("k", value)) == value
        await engine.close("holes")
        reply = await bus.nc.request("$JS.API.STREAM.MSG.DELETE.T_HOLES", b'{"seq": 2, "no_erase": true}', timeout=5)
        assert json.loads(reply.data).get("success") is True, reply.data
        reader = await _open(LogEngine(bus, "u"), "holes", KvLog(tmp_path / "reader.sqlite"))
        assert reader.log.applied_seq == 3
        assert reader.user.data == {"k": 3}
        assert reader.log.failed is None
        assert await reader.log.append(("k", 4)) == 4
    finally:
        await bus.close()
