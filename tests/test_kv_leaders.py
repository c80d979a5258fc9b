"""The KV partitions' NATS leaders: gathered on one server, the lease holder spreads them one step-down at a time."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest

from app.services.kv.leaders import _Cluster, _Peer, plan_move
from tests.harness import ReplicaSet, wait_for
from tests.harness.natscluster import NatsCluster, replica_env

PARTITIONS = 6


def cluster(leader: str, *others: str, current: bool = True) -> _Cluster:
    return _Cluster(leader, [_Peer(n, current) for n in others])


def test_plan_moves_from_the_most_to_the_least_loaded_only_when_two_apart() -> None:
    even = {f"S{i}": cluster(f"n{i % 3 + 1}", "n1", "n2", "n3") for i in range(6)}
    assert plan_move(even) is None
    piled = {f"S{i}": cluster("n1", "n2", "n3") for i in range(6)}
    assert plan_move(piled) == ("S0", "n2")
    one_off = {"A": cluster("n1", "n2", "n3"), "B": cluster("n1", "n2", "n3"), "C": cluster("n2", "n1", "n3")}
    assert plan_move(one_off) == ("A", "n3")  # n1 2, n2 1, n3 0: n3 gets one
    one_off["A"] = cluster("n3", "n1", "n2")
    assert plan_move(one_off) is None  # 1 each
    lagging = {f"S{i}": cluster("n1", "n2", "n3", current=False) for i in range(3)}
    assert plan_move(lagging) is None  # never onto a replica that is not current
    assert plan_move({"A": cluster("n1")}) is None


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NatsCluster, ReplicaSet]]:
    root: Path = tmp_path_factory.mktemp("kv-leaders")
    nats_cluster = NatsCluster(root / "nats")
    replicas: ReplicaSet | None = None
    try:
        nats_cluster.start()
        replicas = ReplicaSet(
            root, nats_cluster.urls, names=("r1",), env=replica_env(FLEETMATE_KV_PARTITIONS=str(PARTITIONS))
        )
        replicas.start()
        replicas.leader()
        yield nats_cluster, replicas
    finally:
        if replicas is not None:
            replicas.close()
        nats_cluster.close()


def leaders(c: NatsCluster) -> dict[str, str]:
    return {f"FLEETMATE_KV_{p}": c.stream_leader(f"FLEETMATE_KV_{p}", 2.0) or "" for p in range(PARTITIONS)}


@pytest.mark.slow
def test_leaders_gathered_on_one_server_are_spread(world: tuple[NatsCluster, ReplicaSet]) -> None:
    c, replicas = world
    wait_for(lambda: all(leaders(c).values()), 30, "every partition led")

    now = leaders(c)

    async def gather() -> None:  # every partition's leadership onto n1
        nc = await nats.connect(servers=c.live_urls())
        try:
            for stream, leader in now.items():
                if leader != "n1":
                    body = json.dumps({"placement": {"preferred": "n1"}}).encode()
                    await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5)
        finally:
            await nc.close()

    asyncio.run(gather())
    wait_for(lambda: set(leaders(c).values()) == {"n1"}, 20, "every partition led by n1")

    def spread() -> bool:
        counts = Counter(leaders(c).values())
        return "" not in counts and len(counts) == 3 and max(counts.values()) - min(counts.values()) <= 1

    wait_for(spread, 60, "two partitions led by each of the 3 NATS servers", 0.5)
    assert len(replicas["r1"].logged("partition leader moved")) >= 4
