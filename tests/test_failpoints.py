"""Failpoints where a crash costs most (issue 18): a save cut short in the middle of the write is never
listed nor restored, and its leftovers are swept; a restore cut short leaves the local state untouched;
a `fleetmate restore` killed midway leaves replicas refusing to start until it is run again."""

from __future__ import annotations

import uuid
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from app import failpoints
from app.config import SnapshotConfig
from app.log.snapshots import Image, LogBounds, Snapshotter
from app.storage.snapshots._sql import SqlSnapshotStore
from app.storage.snapshots.base import SnapshotStore, make_meta
from app.storage.snapshots.file import FileSnapshotStore
from app.storage.snapshots.memory import MemorySnapshotStore
from app.storage.snapshots.s3 import S3SnapshotStore
from tests.harness import Fleetmate
from tests.test_lost_disk import _applied, _create, _present
from tests.test_restore_cli import _env, _phase, _restore
from tests.test_snapshot_stores import StoreCase, _open_file, _open_s3, _open_sql, blob, meta_for


@pytest.fixture(autouse=True)
def no_failpoints() -> Iterator[None]:
    failpoints.configure("")
    yield
    failpoints.configure("")


@pytest.fixture(params=["file", "s3", "mysql", "postgresql"])
async def durable(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[StoreCase]:
    """An opened durable store of the parametrized kind, with tables or prefixes nobody else uses."""
    tag = uuid.uuid4().hex[:10]
    if request.param == "s3":
        made = await _open_s3(request, tag)
    elif request.param == "file":
        made = _open_file(tmp_path)
    else:
        made = await _open_sql(request, tag, request.param)
    await made.store.open()
    try:
        yield made
    finally:
        await made.store.close()


async def _traces(store: SnapshotStore, name: str) -> list[str]:
    """Whatever the store holds of snapshot `name`, listed or not: files, objects, rows."""
    if isinstance(store, FileSnapshotStore):
        return sorted(p.name for p in (store.dir / "registry").iterdir() if name in p.name)
    if isinstance(store, S3SnapshotStore):
        return [k for k in await store.client.list(store.client.key("snapshots", "registry")) if name in k]
    assert isinstance(store, SqlSnapshotStore)
    seq = int(name.rpartition("-")[2])
    rows = [f"{store.snapshots}" for _ in await store.db.fetch(f"SELECT 1 FROM {store.snapshots} WHERE seq = ?", seq)]
    return rows + [f"{store.chunks}" for _ in await store.db.fetch(f"SELECT 1 FROM {store.chunks} WHERE seq = ?", seq)]


async def test_a_save_cut_short_is_never_listed_and_its_leftovers_are_swept(durable: StoreCase) -> None:
    store = durable.store
    first = blob(300_000, 1)
    kept = meta_for("registry", 10, first)
    await store.save(kept, first)
    cut = meta_for("registry", 20, blob(300_000, 2))
    failpoints.configure("snapshot.write=raise")  # a crash in the middle of the write, in-process
    with pytest.raises(failpoints.FailpointError):
        await store.save(cut, blob(300_000, 2))
    failpoints.configure("")
    assert await store.list("registry") == [kept]  # never listed, so never restored
    assert await store.load(kept) == first
    left = await _traces(store, cut.name)
    if isinstance(store, SqlSnapshotStore):
        assert left == []  # one transaction: rolled back
    else:
        assert left  # half a temporary file, or a blob without its meta
    for seq in (30, 40):
        await store.save(meta_for("registry", seq, b"x"), b"x")
    assert [m.seq for m in await store.prune("registry", 2)] == [40, 30]
    assert await _traces(store, cut.name) == []  # behind the oldest kept: swept


async def test_a_leftover_newer_than_the_oldest_kept_snapshot_stays(tmp_path: Path) -> None:
    store = FileSnapshotStore(tmp_path)
    await store.open()
    await store.save(meta_for("registry", 10, b"a"), b"a")
    failpoints.configure("snapshot.write=raise")
    with pytest.raises(failpoints.FailpointError):
        await store.save(meta_for("registry", 20, b"bb"), b"bb")
    failpoints.configure("")
    await store.prune("registry", 1)
    assert len(list((tmp_path / "registry").glob(".registry-*20.snap.tmp-*"))) == 1  # maybe still being written


class _DurableMemory(MemorySnapshotStore):
    durable = True  # as if it outlived the process: the leader trims behind it


class _Local:
    """A local state that records installs."""

    def __init__(self) -> None:
        self.installed: list[bytes] = []

    def applied_seq(self) -> int:
        return 0

    def log_id(self) -> str:
        return ""

    def set_log_id(self, log_id: str) -> None:
        pass

    def install(self, data: bytes) -> int:
        self.installed.append(data)
        return int(data.decode())

    def reset(self) -> None:
        pass


def _snapshotter(store: MemorySnapshotStore, trims: list[int]) -> Snapshotter:
    async def peers() -> list[int]:
        return []

    async def trim(seq: int) -> None:
        trims.append(seq)

    return Snapshotter(
        store,
        SnapshotConfig(keep=1),
        service="registry",
        node_id="n1",
        image=lambda: Image(7, 7, b"7"),
        applied_seq=lambda: 7,
        is_leader=lambda: True,
        peers_applied=peers,
        trim=trim,
    )


async def test_a_restore_cut_short_leaves_the_local_state_untouched() -> None:
    store = MemorySnapshotStore()
    blob7 = zlib.compress(b"7")
    await store.save(make_meta("registry", 7, 7, 0.0, "n1", blob7), blob7)
    local = _Local()
    snaps = _snapshotter(store, [])
    failpoints.configure("snapshot.restore=raise")
    with pytest.raises(failpoints.FailpointError):
        await snaps.recover(local, LogBounds(8, 9, 2, "L"), _no_advance)
    assert local.installed == []  # the next start finds nothing and restores again
    failpoints.configure("")
    got = await snaps.recover(local, LogBounds(8, 9, 2, "L"), _no_advance)
    assert got.restored is not None
    assert got.restored.seq == 7
    assert local.installed == [b"7"]


async def _no_advance(seq: int) -> None:
    raise AssertionError("the log is not lost here")


async def test_a_trim_cut_short_trims_nothing_and_the_next_snapshot_trims() -> None:
    trims: list[int] = []
    snaps = _snapshotter(_DurableMemory(), trims)
    failpoints.configure("log.trim=1*raise")
    with pytest.raises(failpoints.FailpointError):
        await snaps.take()
    assert trims == []
    assert snaps.trimmed_to == 0
    await snaps.take()
    assert trims == [7]
    assert snaps.trimmed_to == 7


@pytest.mark.slow
def test_a_restore_command_killed_midway_leaves_replicas_refusing_until_it_is_run_again(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path / "r1", env=_env(tmp_path, FLEETMATE_NODE_ID="r1"))
    made, _, _ = _phase(fm, "a", 10)  # a snapshot at stop holds these
    fm.restart()
    _create(httpx.Client(base_url=fm.url, timeout=10), "b", 0, 5)  # in the log only
    highest = _applied(httpx.Client(base_url=fm.url, timeout=10))["revision"]
    fm.kill()
    # Killed after saving the restored snapshot, before installing it and emptying the log.
    fm.env["FLEETMATE_FAILPOINTS"] = "snapshot.restore=1*kill"
    code, out, err = _restore(fm, "--yes")
    assert code == -9, err + out
    saved = [p.read_text() for p in (tmp_path / "snapshots" / "registry").glob("*.json")]
    assert sum('"node_id":"restore of' in meta for meta in saved) == 1  # saved, the rest not done
    del fm.env["FLEETMATE_FAILPOINTS"]
    fm.restart(wait_ready=False)
    assert fm.proc is not None
    assert fm.proc.wait(30) == 1  # not serving half a restore
    (failed,) = fm.logged("start-up failed")
    assert "run `fleetmate restore`" in failed["error"]
    code, out, err = _restore(fm, "--yes")
    assert code == 0, err + out
    fm.restart()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        assert _present(api) == made
        assert _applied(api)["revision"] > highest
    finally:
        fm.kill()
