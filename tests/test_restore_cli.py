"""`fleetmate restore`: a chosen snapshot back into a stopped cluster, by revision or by time; refused while a
replica runs; every replica continues from it, with revisions above everything the cluster reached."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app import config
from app.bus.connection import Bus
from app.log.lease import registry as lease_backends
from app.log.lease.base import LeaseRecord
from app.storage import datadir
from tests.harness import Fleetmate, NatsServer, run_cli
from tests.test_lost_disk import _applied, _create, _present


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    return {
        "FLEETMATE_SNAPSHOT_DIR": str(tmp_path / "snapshots"),
        "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "0",  # snapshots only at a clean stop: one per phase
        "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0",
        "FLEETMATE_LEASE_TTL": "2",
        "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
        **extra,
    }


def _phase(fm: Fleetmate, prefix: str, count: int) -> tuple[set[str], int, float]:
    """Start, create nodes, stop cleanly (a snapshot at stop): (paths, the revision reached, when it stopped)."""
    fm.restart()
    api = httpx.Client(base_url=fm.url, timeout=10)
    made = set(_create(api, prefix, 0, count))
    revision = _applied(api)["revision"]
    assert fm.stop() == 0
    assert fm.logged("snapshot taken at stop")
    return made, revision, time.time()


def _restore(fm: Fleetmate, *args: str) -> tuple[int, str, str]:
    fm.dir.mkdir(parents=True, exist_ok=True)
    done = run_cli(["restore", *args], fm.env, fm.dir, timeout=90)
    return done.returncode, done.stdout, done.stderr


@pytest.fixture
def three_phases(tmp_path: Path) -> tuple[Fleetmate, list[tuple[set[str], int, float]], int]:
    """Phases a, b (each ending in a snapshot at stop) and c (killed: no snapshot); the highest revision."""
    fm = Fleetmate(tmp_path / "r1", env=_env(tmp_path, FLEETMATE_NODE_ID="r1"))
    phases = [_phase(fm, "a", 10)]
    time.sleep(0.05)  # the snapshots' times are apart for --at
    phases.append(_phase(fm, "b", 10))
    fm.restart()
    api = httpx.Client(base_url=fm.url, timeout=10)
    _create(api, "c", 0, 5)
    highest = _applied(api)["revision"]
    fm.kill()
    return fm, phases, highest


def _check_back_to(fm: Fleetmate, made: set[str], highest: int) -> None:
    fm.restart()
    try:
        api = httpx.Client(base_url=fm.url, timeout=10)
        assert _present(api) == made
        assert _applied(api)["revision"] > highest  # revisions never go back
        write = api.put("/api/v1/registry/nodes/lost/a0001", json={"data": "after"}).json()
        assert write["stat"]["mzxid"] > highest
        assert write["stat"]["version"] == 1
    finally:
        fm.kill()


def test_restore_by_revision(three_phases: tuple[Fleetmate, list[tuple[set[str], int, float]], int]) -> None:
    fm, ((made_a, _, _), (_, rev_b, _)), highest = three_phases
    code, out, err = _restore(fm, "--list")
    assert code == 0, err
    listed = [line.split() for line in out.splitlines() if line.startswith("registry-")]
    assert len(listed) == 2
    (older_revision, newer_revision) = sorted(int(row[2]) for row in listed)
    assert older_revision < rev_b <= newer_revision
    code, out, err = _restore(fm, "--revision", str(rev_b - 1), "--yes")
    assert code == 0, err
    assert f"revision {older_revision}," in out
    assert "dropped" in out
    _check_back_to(fm, made_a, highest)
    # The restored state is now the store's newest snapshot.
    code, out, _ = _restore(fm, "--list")
    listed = [line for line in out.splitlines() if line.startswith("registry-")]
    assert len(listed) == 3
    assert f"restore of {listed[2].split()[0]}" in listed[0]


def test_restore_by_time(three_phases: tuple[Fleetmate, list[tuple[set[str], int, float]], int]) -> None:
    fm, ((made_a, _, _), (made_b, _, stopped_b)), highest = three_phases
    at = datetime.datetime.fromtimestamp(stopped_b, datetime.UTC).isoformat()
    code, out, err = _restore(fm, "--at", at, "--yes")
    assert code == 0, err
    assert "taken" in out
    _check_back_to(fm, made_a | made_b, highest)


def test_restore_default_is_the_newest_and_asks_first(
    three_phases: tuple[Fleetmate, list[tuple[set[str], int, float]], int],
) -> None:
    fm, ((made_a, _, _), (made_b, _, _)), highest = three_phases
    code, _, err = _restore(fm)  # no terminal, no --yes: nothing is touched
    assert code == 1
    assert "--yes" in err
    code, _, err = _restore(fm, "--revision", "1", "--yes")
    assert code == 1
    assert "no snapshot at or before revision 1" in err
    code, _, err = _restore(fm, "--yes")
    assert code == 0, err
    _check_back_to(fm, made_a | made_b, highest)


def test_restore_is_refused_while_a_replica_runs(tmp_path: Path, nats_server: NatsServer) -> None:
    env = _env(tmp_path, FLEETMATE_NATS_URL=nats_server.url)
    r1 = Fleetmate(tmp_path / "r1", env={**env, "FLEETMATE_NODE_ID": "r1"})
    made, _, _ = _phase(r1, "a", 5)
    r1.restart()  # restart(): start() would find the last run's ready line
    try:
        # On its own data directory: the lock.
        code, _, err = _restore(r1, "--yes")
        assert code == 1
        assert "in use by another fleetmate process" in err
        # From another host (another data directory, the same NATS): the replica answers on the bus.
        other = Fleetmate(tmp_path / "elsewhere", env={**env, "FLEETMATE_NODE_ID": "r9"})
        code, _, err = _restore(other, "--yes")
        assert code == 1
        assert "replica r1 answers on the bus" in err
        # A lease that is renewed although nobody answers on the bus (a replica cut off from it).
        r1.kill()
        with _lease_renewed_by("ghost", nats_server.url, env):
            code, out, err = _restore(other, "--yes")
        assert code == 1
        assert "waiting up to" in out
        assert "held by ghost and renewed" in err
        # Nothing was changed by the refusals.
        r1.restart()
        assert _present(httpx.Client(base_url=r1.url, timeout=10)) == made
    finally:
        r1.kill()


@contextlib.contextmanager
def _lease_renewed_by(holder: str, url: str, env: dict[str, str]) -> Iterator[None]:
    """A thread that takes fleetmate's lease (once free) and renews it until the block ends."""
    cfg = config.load(None, environ=env)
    taken = threading.Event()
    done = threading.Event()

    async def hold() -> None:
        bus = Bus([url], name="ghost")
        await bus.connect(5)
        backend = lease_backends.create(cfg, bus, 1)
        record = LeaseRecord(holder, time.time())
        for _ in range(60):  # r1 was killed: its lease expires within the TTL
            if await backend.try_acquire(record):
                break
            await asyncio.sleep(0.2)
        taken.set()
        while not done.is_set():
            await asyncio.sleep(cfg.lease.renew_interval)
            await backend.renew(record)
        await backend.release(record)
        await bus.close()

    thread = threading.Thread(target=asyncio.run, args=(hold(),), daemon=True)
    thread.start()
    assert taken.wait(15), "the lease was not taken"
    try:
        yield
    finally:
        done.set()
        thread.join(10)


def test_every_replica_continues_from_the_restored_snapshot(tmp_path: Path, nats_server: NatsServer) -> None:
    env = _env(tmp_path, FLEETMATE_NATS_URL=nats_server.url)  # one snapshot.dir shared by both replicas
    r1 = Fleetmate(tmp_path / "r1", env={**env, "FLEETMATE_NODE_ID": "r1"})
    r2 = Fleetmate(tmp_path / "r2", env={**env, "FLEETMATE_NODE_ID": "r2"})
    try:
        made, _, stopped = _phase(r1, "a", 10)
        r1.restart()
        r2.restart()
        api = httpx.Client(base_url=r2.url, timeout=10)
        _create(api, "late", 0, 5)  # written after the snapshot, applied by both
        highest = _applied(api)["revision"]
        assert r2.stop() == 0
        assert r1.stop() == 0
        at = datetime.datetime.fromtimestamp(stopped, datetime.UTC).isoformat()
        code, out, err = _restore(r1, "--at", at, "--yes")
        assert code == 0, err + out
        r1.restart()
        r2.restart()
        for fm in (r1, r2):
            api = httpx.Client(base_url=fm.url, timeout=10)
            assert _present(api) == made
            assert _applied(api)["revision"] > highest
        assert r2.logged("restored from snapshot")
    finally:
        r1.kill()
        r2.kill()


def test_the_data_directory_lock(tmp_path: Path) -> None:
    first = datadir.DataDirLock(tmp_path)
    first.acquire("a test")
    try:
        assert datadir.holder(tmp_path) == f"pid {os.getpid()}, a test"
        with pytest.raises(datadir.DataDirInUse, match=f"pid {os.getpid()}, a test"):
            datadir.DataDirLock(tmp_path).acquire()
    finally:
        first.release()
    assert datadir.holder(tmp_path) is None
    again = datadir.DataDirLock(tmp_path)
    again.acquire()
    again.release()


def test_a_second_replica_on_one_data_directory_is_refused(tmp_path: Path) -> None:
    first = Fleetmate(tmp_path / "r1", env={"FLEETMATE_NODE_ID": "r1"}).start()
    try:
        second = Fleetmate(tmp_path / "r1", env={"FLEETMATE_NODE_ID": "r2"}).start(wait_ready=False)
        assert second.proc is not None
        assert second.proc.wait(30) == 1
        second.stop()
        (failed,) = second.logged("start-up failed")
        assert "is in use by another fleetmate process" in failed["error"]
        assert first.get("/api/v1/ready").status_code == 200
    finally:
        first.kill()
