"""Disk full and read-only data directories, on size-limited tmpfs mounts the tests make (issue 18).

A replica whose data directory is short of space refuses client writes with 503 DiskFull (the
ZooKeeper port: THROTTLEDOP) while reads go on, and lets them in again by itself once space is
freed; nothing acknowledged is lost, even when the disk fills to the last byte under load.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from kazoo.client import KazooClient
from kazoo.exceptions import ThrottledOpError

from tests.harness import Fleetmate, wait_for

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")

MIB = 1 << 20


@contextlib.contextmanager
def tmpfs(where: Path, size_mib: int, *, read_only: bool = False) -> Iterator[Path]:
    """A tmpfs of `size_mib` MiB mounted at `where` for the block's duration."""
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_mib}m", "tmpfs", str(where)], check=True)
    try:
        (where / "data").mkdir()
        if read_only:
            subprocess.run(["mount", "-o", "remount,ro", str(where)], check=True)
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def free(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def ballast(path: Path, size: int) -> Path:
    """The filler file, made before a server runs on `path` and holding `size` bytes, so that freeing
    it later gives that much room back even if the server itself filled the rest of the disk."""
    filler = path / "filler"
    with open(filler, "wb") as fh:
        fh.write(b"\0" * size)
    return filler


def fill(path: Path, leave: int) -> Path:
    """Write a file under `path` until only `leave` bytes are free (0: to the last byte)."""
    filler = path / "filler"
    # Unbuffered: a buffered file keeps what the full disk refused and fails again on close.
    with open(filler, "ab", buffering=0) as fh:
        chunk = b"\0" * MIB
        while (left := free(path) - leave) > 0:
            try:
                fh.write(chunk[: min(len(chunk), left)])
                fh.flush()
            except OSError:  # ENOSPC: full
                break
    return filler


def serve_once(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
    base.update({"FLEETMATE_HTTP_PORT": "0", "FLEETMATE_NATS_PORT": "0", "FLEETMATE_ZK_PORT": "0", **env})
    return subprocess.run(
        [sys.executable, "-m", "app", "serve"],
        check=False,
        env=base,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_a_data_dir_short_of_space_stops_start_up_naming_it_and_the_key(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 16) as disk:
        done = serve_once({"FLEETMATE_DATA_DIR": str(disk / "data")}, tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"data_dir: {disk / 'data'} has" in done.stderr
    assert "below disk.min_free_mb (64 MiB)" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_read_only_data_dir_stops_start_up_naming_it(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 16, read_only=True) as disk:
        done = serve_once({"FLEETMATE_DATA_DIR": str(disk / "data"), "FLEETMATE_DISK_MIN_FREE_MB": "1"}, tmp_path)
    assert done.returncode == 2, done.stderr
    assert f"data_dir (FLEETMATE_DATA_DIR): {disk / 'data'} is not writable: Read-only file system" in done.stderr
    assert "Traceback" not in done.stderr


def _replica(tmp_path: Path, disk: Path, min_free_mb: int) -> Fleetmate:
    return Fleetmate(
        tmp_path / "run",
        env={
            "FLEETMATE_DATA_DIR": str(disk / "data"),
            "FLEETMATE_DISK_MIN_FREE_MB": str(min_free_mb),
            "FLEETMATE_DISK_CHECK_INTERVAL": "0.2",
            "FLEETMATE_METRICS_STREAM_MAX_BYTES": str(4 * MIB),  # JetStream reserves it at start
        },
    ).start(timeout=30)


def _refusal(fm: Fleetmate) -> str:
    return str(fm.get("/api/v1/ready").json().get("writes_refused", ""))


def test_below_the_reserve_writes_are_refused_reads_go_on_and_writes_resume(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "disk", 96) as disk:
        fm = _replica(tmp_path, disk, min_free_mb=32)
        zk = KazooClient(hosts=fm.zk, timeout=10)
        try:
            zk.start(timeout=15)
            for i in range(50):
                assert (
                    fm.post(f"/api/v1/registry/nodes/acked/n{i}", {"data": f"v{i}", "parents": True}).status_code == 201
                )
            zk.create("/acked/zk", b"z")
            filler = fill(disk, leave=16 * MIB)
            wait_for(lambda: _refusal(fm) or None, 10, "writes refused")

            # Every kind of client write is refused, saying why; nothing changes.
            create = fm.post("/api/v1/registry/nodes/acked/late", {"data": "x"})
            assert create.status_code == 503, create.text
            body = create.json()
            assert body["error"] == "DiskFull"
            assert body["message"].startswith(f"disk full: {disk / 'data'} has ")
            assert "disk.min_free_mb (32 MiB)" in body["message"]
            put = httpx.put(fm.url + "/api/v1/registry/nodes/acked/n1", json={"data": "changed"}, timeout=10)
            assert (put.status_code, put.json()["error"]) == (503, "DiskFull")
            multi = fm.post("/api/v1/registry/multi", {"ops": [{"op": "delete", "path": "/acked/n2"}]})
            assert (multi.status_code, multi.json()["error"]) == (503, "DiskFull")
            points = fm.post("/api/v1/metrics/points", [{"series": "s", "ts": time.time(), "value": 1.0}])
            assert (points.status_code, points.json()["error"]) == (503, "DiskFull")
            with pytest.raises(ThrottledOpError):
                zk.create("/acked/zk-late", b"z")
            with pytest.raises(ThrottledOpError):
                zk.set("/acked/zk", b"changed")

            figures = dict(
                line.rsplit(" ", 1)
                for line in fm.get("/metrics").text.splitlines()
                if line.startswith("fleetmate_disk_")
            )
            assert figures["fleetmate_disk_writes_refused"] == "1.0"
            assert float(figures["fleetmate_disk_refused_writes_total"]) >= 6
            assert float(figures["fleetmate_disk_free_bytes"]) < 32 * MIB

            # Reads go on, on both ports; the replica stays ready.
            ready = fm.get("/api/v1/ready")
            assert ready.status_code == 200
            assert ready.json()["ready"] is True
            assert fm.get("/api/v1/registry/nodes/acked/n1").json()["data"] == "v1"
            assert fm.get("/api/v1/registry/nodes/acked/late").status_code == 404
            assert zk.get("/acked/zk")[0] == b"z"
            assert sorted(zk.get_children("/acked")) == sorted([f"n{i}" for i in range(50)] + ["zk"])

            # Space is freed: writes come back by themselves.
            filler.unlink()
            wait_for(lambda: not _refusal(fm) or None, 10, "writes let in again")
            assert fm.post("/api/v1/registry/nodes/acked/late", {"data": "x"}).status_code == 201
            zk.set("/acked/zk", b"after")
            for i in range(50):
                assert fm.get(f"/api/v1/registry/nodes/acked/n{i}").json()["data"] == f"v{i}"
            assert fm.logged("refusing client writes")
            assert fm.logged("space is back; client writes are let in again")
        finally:
            zk.stop()
            zk.close()
            fm.stop()


def test_a_disk_filled_to_the_last_byte_under_load_loses_nothing_acknowledged(tmp_path: Path) -> None:
    """No reserve (disk.min_free_mb = 0): the disk fills under writers until SQLite and the embedded
    nats-server's store fail their writes. Every acknowledged write survives, through the refill and
    a restart; writes come back by themselves once space is freed."""
    with tmpfs(tmp_path / "disk", 96) as disk:
        ballast(disk, 8 * MIB)  # made first: an open() on a full tmpfs can fail (ENOSPC) too
        fm = _replica(tmp_path, disk, min_free_mb=0)
        acked: dict[str, str] = {}
        refused: dict[str, int] = {}
        stop = threading.Event()

        def writer(w: int) -> None:
            with httpx.Client(base_url=fm.url, timeout=15) as http:
                n = 0
                while not stop.is_set():
                    path, value = f"/load/w{w}-{n}", f"{w}-{n}-" + "x" * 2000
                    n += 1
                    try:
                        got = http.post(f"/api/v1/registry/nodes{path}", json={"data": value, "parents": True})
                    except httpx.HTTPError:
                        continue
                    if got.status_code == 201:
                        acked[path] = value
                    else:
                        code = got.json().get("error", str(got.status_code))
                        refused[code] = refused.get(code, 0) + 1
                        time.sleep(0.05)

        threads = [threading.Thread(target=writer, args=(w,), daemon=True) for w in range(3)]
        try:
            for t in threads:
                t.start()
            wait_for(lambda: len(acked) >= 200 or None, 30, "writes before the disk fills")
            print(f"free before filling: {free(disk)} bytes")  # shown if the test fails
            filler = fill(disk, leave=0)
            wait_for(lambda: refused.get("DiskFull", 0) >= 5 or None, 30, "writes refused on a full disk")
            refused_so_far = refused["DiskFull"]
            wait_for(lambda: refused["DiskFull"] >= refused_so_far + 30, 30, "writes still refused on a full disk")
            assert fm.alive
            assert fm.get("/api/v1/ready").json()["ready"] is True
            some = next(iter(acked))
            assert fm.get(f"/api/v1/registry/nodes{some}").json()["data"] == acked[some]

            filler.unlink()
            before = len(acked)
            wait_for(lambda: len(acked) >= before + 50 or None, 30, "writes coming back once space is freed")
        finally:
            stop.set()
            for t in threads:
                t.join(20)
        assert fm.alive

        def check_all() -> None:
            missing = [p for p, v in acked.items() if fm.get(f"/api/v1/registry/nodes{p}").json().get("data") != v]
            assert not missing, f"{len(missing)} acknowledged writes lost, e.g. {missing[:3]}"

        check_all()
        assert fm.logged("refusing client writes")
        assert fm.logged("space is back; client writes are let in again")
        store_failed = any("Critical write error" in line.get("msg", "") for line in fm.lines)
        if store_failed:  # the embedded nats-server's store failed a write: restarted once there was room
            assert fm.logged(
                "restarting the embedded nats-server: its store stopped at a failed write and there is room again"
            )
        fm.stop()
        fm.restart(timeout=30)
        check_all()
        fm.stop()
        print(f"acknowledged {len(acked)}, refused {refused}, nats store write failed: {store_failed}")


def test_a_commit_that_fails_on_a_full_disk_keeps_its_rows_for_the_next_one(tmp_path: Path) -> None:
    """The registry's SQLite file is a cache of the applied state: a commit that fails (SQLITE_FULL)
    must leave every changed row to the next commit, or a restart would load a state with holes."""
    import sqlite3

    from app.services.registry.messages import Create, SetData
    from app.services.registry.state import RegistryState
    from app.services.registry.store import RegistryStore

    with tmpfs(tmp_path / "disk", 4) as disk:
        state = RegistryState()
        store = RegistryStore(disk / "data" / "r.sqlite", history=100)
        for i in range(5):
            state.apply(Create(f"/small{i}", b"s", time_ms=1))
        store.commit(state, 5, [])
        filler = fill(disk, leave=0)
        for i in range(20):  # more than the file can take now
            state.apply(Create(f"/big{i}", b"b" * 100_000, time_ms=1))
        state.apply(SetData("/small0", b"changed", -1, time_ms=1))
        with pytest.raises(sqlite3.OperationalError, match="full"):
            store.commit(state, 26, [])
        filler.unlink()
        store.commit(state, 26, [])  # nothing else changed meanwhile: only the kept rows are written
        store.close()
        loaded = RegistryState()
        seq, _ = RegistryStore(disk / "data" / "r.sqlite", history=100).load(loaded)
    assert seq == 26
    assert loaded.nodes.keys() == state.nodes.keys()
    assert loaded.nodes["/small0"].data == b"changed"
    assert all(loaded.nodes[f"/big{i}"].data == b"b" * 100_000 for i in range(20))
