"""Jepsen-style history check: writers and watchers on 3 replicas while replicas and NATS servers are killed."""

from __future__ import annotations

import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ReplicaSet, natscluster
from tests.harness.history import Workload
from tests.harness.natscluster import REGISTRY_STREAM, NatsCluster, replica_env

ROUNDS = 6  # 3 stream-leader and 3 other NATS kills (both others), a leader replica kill in each
DOWN_S = 1.0  # how long a killed process stays dead

pytestmark = pytest.mark.slow


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    with natscluster.nats_cluster(tmp_path / "nats") as cluster:
        yield cluster


def restart_replica(rs: ReplicaSet, name: str) -> None:
    """Restart a killed replica; a failed start-up fails the test."""
    rs[name].restart(timeout=30)


def test_history_under_replica_and_nats_kills(tmp_path: Path, nats_cluster: NatsCluster) -> None:
    rs = ReplicaSet(tmp_path, nats_cluster.urls, env=replica_env())
    work: Workload | None = None
    try:
        rs.start()
        work = Workload(rs.urls).start()
        history = work.history
        work.wait_acked(50, 20)

        started = time.monotonic()
        for r in range(ROUNDS):
            leader = rs.leader(timeout=30)
            rs[leader].kill()
            time.sleep(DOWN_S)
            restart_replica(rs, leader)
            stream_leader = nats_cluster.wait_stream_leader(REGISTRY_STREAM)
            victim = stream_leader if r % 2 == 0 else (stream_leader + 1 + r // 2 % 2) % 3
            nats_cluster.kill(victim)
            time.sleep(DOWN_S)
            nats_cluster.restart(victim)
            nats_cluster.wait_healthy()
            print(
                f"round {r + 1}: killed replica {leader}, nats {nats_cluster.members[victim].name}"
                f"{' (stream leader)' if victim == stream_leader else ''}; "
                f"{sum(a.outcome == 'ok' for a in history)} acked so far"
            )
        faults_s = time.monotonic() - started
        work.wait_acked(20, 30, since=time.monotonic())  # writes go on after the last fault
        ok_before_stop = [a for a in history if a.outcome == "ok"]
        problems = work.finish()
        gaps = sorted(a.acked_at for a in ok_before_stop)
        worst = max((b - a for a, b in itertools.pairwise(gaps)), default=0.0)
        print(
            f"\nhistory: {work.summary()}; {ROUNDS} rounds in {faults_s:.0f} s; "
            f"longest time without an acknowledged write {worst:.2f} s"
        )
        assert not problems, "\n".join(problems[:30])
    finally:
        if work is not None:
            work.stop()
        rs.close()
