"""The history check with each named failpoint (issue 18): one replica is killed -9 at that very line
under load, restarts, rejoins, and the history shows no acknowledged write lost and gap-free watches.

Lighter than tests/test_history.py: one nats-server, two replicas sharing a snapshot directory,
snapshots every 20 entries (the schedule looks once a second) so that snapshots are written and
the log is trimmed all along. r1 starts first, so it holds the lease: the leader is the one that
trims. Writers send each write to the next replica, so r1 takes writes before and after.

With log.trim, r1 stays down until r2, leading now, has trimmed the log past what r1 applied, so
r1 comes back from a snapshot and the log's tail (r2 waits for that until r1's last announcement
is 15 s old: a replica just killed is likely to come back, and holds the trim that long). With
snapshot.restore, r1 comes back from a snapshot too: it lost its data directory.
"""

from __future__ import annotations

import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from app.failpoints import ENV
from tests.harness import NatsServer, ReplicaSet, wait_for
from tests.harness.history import Workload

# The action of each point: on which hit r1 is killed, so that it dies a second or two into the load.
POINTS = {
    "log.before_append": "40*kill",
    "log.after_append": "40*kill",
    "log.apply": "150*kill",
    "snapshot.write": "2*kill",
    "log.trim": "2*kill",
    "snapshot.restore": "1*kill",  # r1 is wiped first, so that it restores when it starts
}
FROM_SNAPSHOT = {"log.trim", "snapshot.restore"}  # r1 comes back from a snapshot (see above)
WRITERS = 3

pytestmark = pytest.mark.slow


def _replicas(tmp_path: Path, nats: NatsServer) -> ReplicaSet:
    return ReplicaSet(
        tmp_path,
        nats.url,
        names=("r1", "r2"),
        env={
            "FLEETMATE_LEASE_TTL": "2",
            "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
            "FLEETMATE_SNAPSHOT_DIR": str(tmp_path / "snapshots"),  # either can restore from the other's
            "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "20",
            "FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0",
            "FLEETMATE_SNAPSHOT_KEEP": "3",
        },
    )


def _killed_at_failpoint(rs: ReplicaSet, name: str, point: str) -> None:
    fm = rs[name]
    wait_for(lambda: not fm.alive, 30, f"{name} killed at {point}")
    assert fm.proc is not None
    assert fm.proc.returncode == -9, f"{name} exited with {fm.proc.returncode}, not killed at {point}: {fm.raw[-5:]}"


def _applied_seq(data_dir: Path) -> int:
    """The sequence a stopped replica's registry file says it applied (0: none)."""
    path = data_dir / "registry.sqlite"
    if not path.exists():
        return 0
    conn = sqlite3.connect(path)
    try:
        row = conn.execute("SELECT seq FROM applied WHERE id = 1").fetchone()
    except sqlite3.OperationalError:  # created, never written: no tables yet
        return 0
    finally:
        conn.close()
    return int(row[0]) if row else 0


def _trimmed_through(rs: ReplicaSet, name: str) -> int:
    return max((line["through_seq"] for line in rs[name].logged("log trimmed")), default=0)


@pytest.mark.parametrize("point", list(POINTS))
def test_history_with_a_replica_killed_at_a_failpoint(tmp_path: Path, nats_server: NatsServer, point: str) -> None:
    rs = _replicas(tmp_path, nats_server)
    r1 = rs["r1"]
    if point != "snapshot.restore":
        r1.env[ENV] = f"{point}={POINTS[point]}"
    work: Workload | None = None
    started = time.monotonic()
    try:
        r1.start(timeout=30)
        assert rs.leader() == "r1"
        rs["r2"].start(timeout=30)
        work = Workload(rs.urls, writers=WRITERS, rotate=True).start()
        if point == "snapshot.restore":
            # A replica that lost its data directory restores the newest snapshot when it starts.
            work.wait_acked(100, 20)
            wait_for(lambda: list((tmp_path / "snapshots" / "registry").glob("*.json")), 20, "a snapshot")
            r1.kill()
            shutil.rmtree(r1.dir / "data")
            r1.env[ENV] = f"{point}={POINTS[point]}"
            r1.restart(wait_ready=False)
        _killed_at_failpoint(rs, "r1", point)
        acked_at_kill = work.acked()
        left_at = _applied_seq(r1.dir / "data")
        if point == "log.trim":
            wait_for(lambda: _trimmed_through(rs, "r2") > left_at, 30, f"r2 to trim the log past {left_at}")
        del r1.env[ENV]
        r1.restart(timeout=30)
        restored = bool(r1.logged("restored from snapshot"))
        back = time.monotonic()
        work.wait_acked(100, 30, since=back, via=rs.urls["r1"])  # r1 takes writes again
        problems = work.finish()
        print(
            f"\n{point}={POINTS[point]}: r1 killed at sequence {left_at} after {acked_at_kill} acknowledged "
            f"writes; r2 trimmed through {_trimmed_through(rs, 'r2')}; r1 back from a snapshot: {restored}; "
            f"{work.summary()}; {time.monotonic() - started:.1f} s"
        )
        assert not problems, "\n".join(problems[:30])
        assert restored == (point in FROM_SNAPSHOT), "r1 came back from a snapshot, or not, unexpectedly"
    finally:
        if work is not None:
            work.stop()
        rs.close()
