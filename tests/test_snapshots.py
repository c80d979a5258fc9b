"""Snapshots end to end: taken on schedule, the log trimmed behind them, a wiped replica restored, bad ones skipped."""

from __future__ import annotations

import re
import shutil
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.log.snapshots import LogBounds, needs_restore
from tests.harness import Fleetmate, NatsServer, wait_for


@pytest.mark.parametrize(
    ("local", "bounds", "expected"),
    [
        (0, LogBounds(0, 0, 0), False),  # new replica, new log
        (0, LogBounds(1, 40, 40), True),  # new or wiped replica, log has entries
        (40, LogBounds(1, 40, 40), False),  # up to date
        (30, LogBounds(1, 40, 40), False),  # behind, but the log still holds the tail
        (30, LogBounds(31, 40, 10), False),  # the log starts right after what we applied
        (30, LogBounds(35, 40, 6), True),  # trimmed past us
        (40, LogBounds(41, 40, 0), False),  # everything trimmed, nothing missed
        (30, LogBounds(41, 40, 0), True),  # everything trimmed, entries missed
    ],
)
def test_when_a_replica_restores(local: int, bounds: LogBounds, expected: bool) -> None:
    assert needs_restore(local, bounds) is expected


def _metric(fm: Fleetmate, name: str) -> float:
    text = fm.get("/metrics").text
    match = re.search(rf"^{name}(?:_total)? ([0-9.e+-]+)$", text, re.M)
    assert match, f"{name} not in /metrics"
    return float(match.group(1))


def _tree(api: httpx.Client) -> dict[str, Any]:
    """Every node's data, version and revisions, read linearizably (the registry's own revision moves
    on with a restart: the new leader appends leader_elected)."""
    out: dict[str, Any] = {}
    stack = ["/"]
    while stack:
        path = stack.pop()
        if path != "/":
            body = api.get(f"/api/v1/registry/nodes{path}").json()
            stat = body["stat"]
            out[path] = (body["data"], stat["version"], stat["czxid"], stat["mzxid"], stat["pzxid"])
        kids = api.get(f"/api/v1/registry/children{path}").json()["children"]
        stack.extend(f"{path.rstrip('/')}/{name}" for name in kids)
    return out


def _wipe(fm: Fleetmate) -> None:
    for file in (fm.dir / "data").glob("registry.sqlite*"):
        file.unlink()


def _store_env(request: pytest.FixtureRequest, store: str, tag: str) -> dict[str, str]:
    """Variables pointing a replica at the test session's own MariaDB, PostgreSQL or S3 server."""
    if store == "s3":
        s3 = request.getfixturevalue("s3_server")
        return {
            "FLEETMATE_S3_ENDPOINT": s3.endpoint,
            "FLEETMATE_S3_ACCESS_KEY": s3.access_key,
            "FLEETMATE_S3_SECRET_KEY": s3.secret_key,
            "FLEETMATE_S3_BUCKET": s3.bucket,  # a new bucket needs new SeaweedFS volumes: share the warm one
            "FLEETMATE_S3_PREFIX": f"{tag}/",
        }
    if store in ("mysql", "postgresql"):
        server = request.getfixturevalue("mariadb" if store == "mysql" else "postgres")
        return {"FLEETMATE_SQL_DSN": server.dsn, "FLEETMATE_SQL_TABLE_PREFIX": f"{tag}_"}
    return {}


def _replica(
    tmp_path: Path, nats: NatsServer, store: str, snap_dir: Path, extra: dict[str, str] | None = None
) -> Fleetmate:
    return Fleetmate(
        tmp_path / "r1",
        env={
            **(extra or {}),
            "FLEETMATE_NATS_URL": nats.url,
            "FLEETMATE_NODE_ID": "r1",
            "FLEETMATE_SNAPSHOT_STORE": store,
            "FLEETMATE_SNAPSHOT_DIR": str(snap_dir),
            "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "25",
            "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0",
            "FLEETMATE_SNAPSHOT_KEEP": "2",
            "FLEETMATE_LEASE_TTL": "2",
            "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
        },
    )


def _write(api: httpx.Client, start: int, count: int) -> None:
    for i in range(start, start + count):
        assert api.put(f"/api/v1/registry/nodes/snap/k{i % 40}", json={"data": f"v{i}"}).status_code in (200, 201)


def _seed(api: httpx.Client) -> None:
    assert api.post("/api/v1/registry/nodes/snap", json={"data": "root"}).status_code == 201
    for i in range(40):
        assert api.post(f"/api/v1/registry/nodes/snap/k{i}", json={"data": "0"}).status_code == 201


def _fill(fm: Fleetmate, api: httpx.Client) -> None:
    _seed(api)
    for rnd in range(3):  # the schedule looks once a second: a snapshot per round of writes
        _write(api, rnd * 30, 30)
        wait_for(lambda n=rnd + 1: _metric(fm, "fleetmate_snapshots_taken") >= n, 10, f"snapshot {rnd + 1}")
    wait_for(lambda: _metric(fm, "fleetmate_log_trimmed_through_seq") > 0, 10, "the log trimmed")


@pytest.mark.parametrize("store", ["file", "s3", "mysql", "postgresql"])
def test_wipe_restore_replay(
    tmp_path: Path, nats_server: NatsServer, request: pytest.FixtureRequest, store: str
) -> None:
    snap_dir = tmp_path / "snapshots"
    extra = _store_env(request, store, f"wipe{abs(hash(str(tmp_path))) % 10**8}")
    fm = _replica(tmp_path, nats_server, store, snap_dir, extra).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        _fill(fm, api)
        if store == "file":
            assert len(list((snap_dir / "registry").glob("*.snap"))) == 2  # keep = 2
        _write(api, 1000, 7)  # a tail after the last snapshot, to be replayed
        before = _tree(api)
        assert fm.stop() == 0
        _wipe(fm)
        fm.restart()
        api = httpx.Client(base_url=fm.url, timeout=10)
        (restored,) = fm.logged("restored from snapshot")
        assert restored["store"] == store
        assert _tree(api) == before
        # Writes go on from where the state left off.
        assert api.put("/api/v1/registry/nodes/snap/k1", json={"data": "after"}).json()["stat"]["version"] == (
            before["/snap/k1"][1] + 1
        )
    finally:
        fm.kill()


def test_corrupt_snapshot_falls_back_to_an_older_one(tmp_path: Path, nats_server: NatsServer) -> None:
    snap_dir = tmp_path / "snapshots"
    fm = _replica(tmp_path, nats_server, "file", snap_dir).start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        _fill(fm, api)
        before = _tree(api)
        assert fm.stop() == 0
        newest, older = sorted((snap_dir / "registry").glob("*.snap"), reverse=True)
        damaged = bytearray(newest.read_bytes())
        damaged[len(damaged) // 2] ^= 0xFF
        newest.write_bytes(bytes(damaged))
        _wipe(fm)
        fm.restart()
        (bad,) = fm.logged("snapshot unusable; trying an older one")
        assert bad["snapshot"] == newest.stem
        assert "checksum" in bad["error"]
        (restored,) = fm.logged("restored from snapshot")
        assert restored["snapshot"] == older.stem
        assert _tree(httpx.Client(base_url=fm.url, timeout=10)) == before
    finally:
        fm.kill()


def test_trimmed_log_and_no_snapshot_stops_with_a_clear_error(tmp_path: Path, nats_server: NatsServer) -> None:
    snap_dir = tmp_path / "snapshots"
    fm = _replica(tmp_path, nats_server, "file", snap_dir).start()
    try:
        _fill(fm, httpx.Client(base_url=fm.url, timeout=10))
        assert fm.stop() == 0
        _wipe(fm)
        shutil.rmtree(snap_dir)
        fm.restart(wait_ready=False)
        assert fm.proc is not None
        assert fm.proc.wait(30) == 1
        (failed,) = fm.logged("start-up failed")
        assert "no snapshot" in failed["error"]
        assert "bridges the gap" in failed["error"]
    finally:
        fm.kill()


def test_memory_store_never_trims_and_a_wiped_replica_replays_everything(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    fm = _replica(tmp_path, nats_server, "memory", tmp_path / "unused").start()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        _seed(api)
        for rnd in range(2):
            _write(api, rnd * 30, 30)
            wait_for(lambda n=rnd + 1: _metric(fm, "fleetmate_snapshots_taken") >= n, 10, "a snapshot in memory")
        assert _metric(fm, "fleetmate_log_trimmed_through_seq") == 0
        before = _tree(api)
        assert fm.stop() == 0
        _wipe(fm)
        fm.restart()
        assert not fm.logged("restored from snapshot")
        assert _tree(httpx.Client(base_url=fm.url, timeout=10)) == before
    finally:
        fm.kill()
