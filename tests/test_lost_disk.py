"""A lost disk is not a lost registry: a replica whose data directory (and with it, embedded, the log) is gone
comes back from the newest snapshot in its store and continues the log after it; a snapshot on clean stop."""

from __future__ import annotations

import asyncio
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from app.config import SnapshotConfig
from app.log.snapshots import Image, LogBounds, LogConflict, Snapshotter, StartPlan, plan_start, usable
from app.storage.snapshots.base import SnapshotMeta, make_meta
from app.storage.snapshots.memory import MemorySnapshotStore
from tests.harness import Fleetmate, NatsServer, wait_for
from tests.test_snapshots import _metric, _store_env

LOST_LINE = "the log had lost what this state covers; continuing it from the snapshot"


# ---- the decision, alone ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("local", "local_log", "bounds", "newest", "expected"),
    [
        # The log holds (or held, then trimmed) everything: today's path (restore only when trimmed past).
        (0, "", LogBounds(0, 0, 0, "A"), 0, StartPlan(0)),
        (40, "A", LogBounds(1, 40, 40, "A"), 31, StartPlan(40)),
        (0, "", LogBounds(1, 40, 40, "A"), 31, StartPlan(0)),
        # Lost data directory with the embedded server: a new, empty log below the newest snapshot.
        (0, "", LogBounds(0, 0, 0, "B"), 31, StartPlan(0, log_lost=True)),
        # The stream re-created under a replica that kept its file: it continues from its own state...
        (40, "A", LogBounds(0, 0, 0, "B"), 31, StartPlan(40, log_lost=True)),
        # ...unless another replica already began the new log: this file is then another history.
        (40, "A", LogBounds(42, 41, 0, "B"), 41, StartPlan(0, discard=True)),
        (40, "A", LogBounds(42, 50, 9, "B"), 41, StartPlan(0, discard=True)),
        # The same log, emptied below what this replica applied (a server that lost its tail).
        (40, "A", LogBounds(31, 30, 0, "A"), 20, StartPlan(40, log_lost=True)),
        # A file from before log ids were recorded: its sequence alone tells.
        (40, "", LogBounds(0, 0, 0, "B"), 0, StartPlan(40, log_lost=True)),
        # `fleetmate restore` continued the log past everybody: restore from the store as usual.
        (40, "A", LogBounds(45, 44, 0, "A"), 44, StartPlan(40)),
    ],
)
def test_how_a_replica_starts(local: int, local_log: str, bounds: LogBounds, newest: int, expected: StartPlan) -> None:
    assert plan_start(local, local_log, bounds, newest) == expected


@pytest.mark.parametrize(
    ("local", "bounds", "newest"),
    [
        (0, LogBounds(1, 3, 3, "B"), 31),  # the lost log was written again below the newest snapshot
        (40, LogBounds(1, 3, 3, "A"), 0),  # this replica holds entries the log no longer has
    ],
)
def test_a_log_written_again_below_what_is_known_is_a_conflict(local: int, bounds: LogBounds, newest: int) -> None:
    with pytest.raises(LogConflict, match="written again"):
        plan_start(local, "A", bounds, newest)


@pytest.mark.parametrize(
    ("meta_log", "seq", "bounds", "expected"),
    [
        ("A", 40, LogBounds(1, 50, 50, "A"), True),  # this log's
        ("", 40, LogBounds(1, 50, 50, "A"), True),  # taken before logs had ids
        ("A", 40, LogBounds(41, 50, 10, "B"), True),  # the old log's, exactly where the new one continued it
        ("A", 45, LogBounds(41, 50, 10, "B"), False),  # the old log's, past where the new one began
        ("A", 30, LogBounds(41, 50, 10, "B"), False),
    ],
)
def test_which_snapshots_a_log_can_continue_from(meta_log: str, seq: int, bounds: LogBounds, expected: bool) -> None:
    meta = make_meta("registry", seq, seq, 0.0, "t", b"", meta_log)
    assert usable(meta, bounds) is expected


class _SlowStore(MemorySnapshotStore):
    durable = True  # type: ignore[misc]

    def __init__(self, delay: float) -> None:
        super().__init__()
        self.delay = delay

    async def _save(self, meta: SnapshotMeta, data: bytes) -> None:
        await asyncio.sleep(self.delay)
        await super()._save(meta, data)


def _snapshotter(store: MemorySnapshotStore, applied: int) -> Snapshotter:
    async def no_peers() -> list[int]:
        return []

    async def no_trim(seq: int) -> None:
        return None

    return Snapshotter(
        store,
        SnapshotConfig(),
        service="registry",
        node_id="t",
        image=lambda: Image(applied, applied, b"x" * 100),
        applied_seq=lambda: applied,
        is_leader=lambda: False,
        peers_applied=no_peers,
        trim=no_trim,
    )


def test_the_snapshot_at_stop_is_bounded_in_time(caplog: pytest.LogCaptureFixture) -> None:
    started = time.monotonic()
    assert asyncio.run(_snapshotter(_SlowStore(5.0), 7).take_at_stop(0.3)) is None
    assert time.monotonic() - started < 2
    assert "snapshot at stop skipped: not done in time" in caplog.text


def test_the_snapshot_at_stop_only_when_ahead_of_the_store() -> None:
    store = _SlowStore(0.0)

    async def scenario() -> tuple[SnapshotMeta | None, SnapshotMeta | None, SnapshotMeta | None]:
        first = await _snapshotter(store, 7).take_at_stop(5)
        again = await _snapshotter(store, 7).take_at_stop(5)  # the store already covers 7
        behind = await _snapshotter(store, 5).take_at_stop(5)  # a replica behind the newest
        return first, again, behind

    first, again, behind = asyncio.run(scenario())
    assert first is not None
    assert first.seq == 7
    assert again is None
    assert behind is None
    assert [m.seq for m in asyncio.run(store.list("registry"))] == [7]


# ---- end to end --------------------------------------------------------------------------------


def _replica(workdir: Path, env: dict[str, str]) -> Fleetmate:
    return Fleetmate(
        workdir,
        env={
            "FLEETMATE_NODE_ID": "r1",
            "FLEETMATE_LEASE_TTL": "2",
            "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
            **env,
        },
    )


def _wipe_data_dir(fm: Fleetmate) -> None:
    """The disk is gone: the registry file, and with the embedded nats-server the log too."""
    shutil.rmtree(fm.dir / "data")


def _create(api: httpx.Client, prefix: str, start: int, count: int) -> dict[str, int]:
    """Create nodes /lost/<prefix>NNNN with their name as data; returns each path's creation revision."""
    made = {}
    for i in range(start, start + count):
        path = f"/lost/{prefix}{i:04d}"
        resp = api.post(f"/api/v1/registry/nodes{path}", json={"data": path, "parents": True})
        assert resp.status_code == 201, resp.text
        made[path] = resp.json()["stat"]["czxid"]
    return made


def _present(api: httpx.Client) -> set[str]:
    resp = api.get("/api/v1/registry/children/lost")
    if resp.status_code == 404:
        return set()
    return {f"/lost/{name}" for name in resp.json()["children"]}


def _applied(api: httpx.Client) -> dict[str, Any]:
    body: dict[str, Any] = api.get("/api/v1/registry").json()
    return body


def test_a_replica_that_lost_its_data_directory_comes_back_from_the_snapshot(tmp_path: Path) -> None:
    """The finding: the file store elsewhere held revision 31, and the replica came back empty at revision 1."""
    snap_dir = tmp_path / "snapshots"  # not under the data directory
    fm = _replica(
        tmp_path / "r1",
        {
            "FLEETMATE_SNAPSHOT_DIR": str(snap_dir),
            "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "0",
            "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "1",
        },
    ).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        made = _create(api, "k", 0, 30)
        covered = _applied(api)["applied_seq"]
        wait_for(lambda: _metric(fm, "fleetmate_snapshot_seq") >= covered, 10, "a snapshot of the 30 nodes")
        newest = max((snap_dir / "registry").glob("*.json"))
        snapshot_revision = msgspec.json.decode(newest.read_bytes(), type=SnapshotMeta).revision
        fm.kill()  # no snapshot at stop: the one taken on schedule is all there is
        _wipe_data_dir(fm)
        fm.restart()
        api = httpx.Client(base_url=fm.url, timeout=10)
        state = _applied(api)
        assert state["revision"] > snapshot_revision  # revisions go on from the snapshot (leader_elected)
        assert _present(api) == set(made)
        (lost,) = fm.logged(LOST_LINE, service="registry")
        assert lost["revision"] == snapshot_revision
        assert lost["store"] == "file"
        assert str(snap_dir) in lost["source"]
        assert api.get("/api/v1/registry/nodes/lost/k0007").json()["data"] == "/lost/k0007"
        # Writes apply on top: versions and revisions continue.
        updated = api.put("/api/v1/registry/nodes/lost/k0001", json={"data": "again"}).json()
        assert updated["stat"]["version"] == 1
        assert updated["stat"]["mzxid"] > state["revision"]
        # And survive a restart (the log continues after the snapshot's sequence).
        assert fm.stop() == 0
        fm.restart()
        api = httpx.Client(base_url=fm.url, timeout=10)
        assert api.get("/api/v1/registry/nodes/lost/k0001").json()["data"] == "again"
        assert not fm.logged(LOST_LINE)
    finally:
        fm.kill()


@pytest.mark.parametrize("store", ["file", "s3", "mysql", "postgresql"])
def test_lost_data_directory_every_store(tmp_path: Path, request: pytest.FixtureRequest, store: str) -> None:
    """1,000 nodes, a snapshot, more writes, the data directory (and the embedded log) lost: every node the
    snapshot covers is back; the writes after it went with the log (the RPO of a single embedded replica)."""
    tag = f"lost{abs(hash(str(tmp_path))) % 10**8}"
    fm = _replica(
        tmp_path / "r1",
        {
            **_store_env(request, store, tag),
            "FLEETMATE_SNAPSHOT_STORE": store,
            "FLEETMATE_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
            "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "0",
            "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "1",
        },
    ).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        before = _create(api, "a", 0, 1000)
        covered = _applied(api)["applied_seq"]
        wait_for(lambda: _metric(fm, "fleetmate_snapshot_seq") >= covered, 20, "a snapshot of the 1,000 nodes")
        after = _create(api, "b", 0, 100)
        fm.kill()
        _wipe_data_dir(fm)
        fm.restart(timeout=60)
        api = httpx.Client(base_url=fm.url, timeout=10)
        (lost,) = fm.logged(LOST_LINE, service="registry")
        assert lost["store"] == store
        restored = lost["revision"]
        assert restored >= max(before.values())
        back = _present(api)
        assert set(before) <= back
        # Exactly what the snapshot covered: later writes were only in the lost log.
        assert {p for p, rev in after.items() if rev <= restored} <= back
        assert not {p for p, rev in after.items() if rev > restored} & back
        assert _applied(api)["revision"] > restored
        assert api.get("/api/v1/registry/nodes/lost/a0999").json()["data"] == "/lost/a0999"
    finally:
        fm.kill()


def test_lost_data_directory_with_an_external_log_loses_nothing(tmp_path: Path, nats_server: NatsServer) -> None:
    """The log lives in the NATS cluster: the wiped replica restores the snapshot and replays the tail."""
    fm = _replica(
        tmp_path / "r1",
        {
            "FLEETMATE_NATS_URL": nats_server.url,
            "FLEETMATE_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
            "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "200",
            "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0",
        },
    ).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        made = _create(api, "a", 0, 300)
        wait_for(lambda: _metric(fm, "fleetmate_snapshots_taken") >= 1, 10, "a snapshot")
        made |= _create(api, "b", 0, 50)
        fm.kill()
        _wipe_data_dir(fm)
        fm.restart()
        api = httpx.Client(base_url=fm.url, timeout=10)
        assert fm.logged("restored from snapshot")
        assert not fm.logged(LOST_LINE)
        assert _present(api) == set(made)
    finally:
        fm.kill()


def test_a_re_created_stream_is_continued_from_the_replica_s_own_data(tmp_path: Path, nats_server: NatsServer) -> None:
    """The NATS store lost the stream (deleted, or a new NATS): the replica keeps its state and the log goes on."""
    fm = _replica(
        tmp_path / "r1",
        {"FLEETMATE_NATS_URL": nats_server.url, "FLEETMATE_SNAPSHOT_STORE": "memory"},
    ).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        made = _create(api, "a", 0, 20)
        revision = _applied(api)["revision"]
        assert fm.stop() == 0
        asyncio.run(_delete_stream(nats_server.url))
        fm.restart()
        api = httpx.Client(base_url=fm.url, timeout=10)
        (line,) = fm.logged(
            "the log had lost what this state covers; continuing it from this replica's data", service="registry"
        )
        assert line["continues_at_seq"] > line["log_last_seq"]
        assert _present(api) == set(made)
        write = api.put("/api/v1/registry/nodes/lost/a0003", json={"data": "x"}).json()
        assert write["stat"]["mzxid"] > revision
    finally:
        fm.kill()


async def _delete_stream(url: str) -> None:
    import nats

    nc = await nats.connect(url)
    try:
        await nc.jetstream().delete_stream("FLEETMATE_REGISTRY")
    finally:
        await nc.close()


def test_a_lost_log_written_again_stops_start_up_with_the_choice(tmp_path: Path) -> None:
    """The old behaviour left a new history under an older snapshot; two histories: the operator chooses."""
    snap_dir = tmp_path / "snapshots"
    env = {
        "FLEETMATE_SNAPSHOT_DIR": str(snap_dir),
        "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "25",
        "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0",
    }
    fm = _replica(tmp_path / "r1", env).start()
    try:
        _create(httpx.Client(base_url=fm.url, timeout=10), "k", 0, 30)
        wait_for(lambda: _metric(fm, "fleetmate_snapshots_taken") >= 1, 10, "a snapshot")
        fm.kill()
        _wipe_data_dir(fm)
        # Started without its snapshots (another snapshot.dir), it begins a new log from nothing.
        fm.env["FLEETMATE_SNAPSHOT_DIR"] = str(tmp_path / "elsewhere")
        fm.restart()
        _create(httpx.Client(base_url=fm.url, timeout=10), "new", 0, 3)
        assert fm.stop() == 0
        fm.env["FLEETMATE_SNAPSHOT_DIR"] = str(snap_dir)
        fm.restart(wait_ready=False)
        assert fm.proc is not None
        assert fm.proc.wait(30) == 1
        (failed,) = fm.logged("start-up failed")
        assert "written again" in failed["error"]
        assert "fleetmate restore" in failed["error"]
    finally:
        fm.kill()


def test_a_clean_stop_takes_a_snapshot_so_a_lost_disk_loses_nothing(tmp_path: Path) -> None:
    snap_dir = tmp_path / "snapshots"
    fm = _replica(
        tmp_path / "r1",
        {
            "FLEETMATE_SNAPSHOT_DIR": str(snap_dir),
            "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "0",
            "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0",  # nothing on schedule: only the one at stop
        },
    ).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        made = _create(api, "a", 0, 50)
        applied = _applied(api)["applied_seq"]
        assert fm.stop() == 0
        (taken,) = fm.logged("snapshot taken at stop", service="registry")
        assert taken["seq"] >= applied
        assert len(list((snap_dir / "registry").glob("*.snap"))) == 1
        _wipe_data_dir(fm)
        fm.restart()
        assert fm.logged(LOST_LINE)
        assert _present(httpx.Client(base_url=fm.url, timeout=10)) == set(made)
    finally:
        fm.kill()
