"""KV repair: copies of a replica down past max_peer_down_time are re-created elsewhere; on its return it drops them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import wait_for
from tests.harness.kvcluster import NAMES, Env, kv_cluster

pytestmark = pytest.mark.slow

MAX_DOWN_S = 3.0
SLOW_S = 40.0


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root: Path = tmp_path_factory.mktemp("kv-repair")
    with kv_cluster(root, FLEETMATE_KV_MAX_PEER_DOWN_TIME=str(MAX_DOWN_S), FLEETMATE_KV_PARTITIONS="4") as e:
        yield e


def holders(env: Env, at: str = "r1") -> dict[int, set[str]]:
    return {s["id"]: {h["node"] for h in s["holders"]} for s in env.table(at)}


def test_copies_of_a_dead_replica_are_made_again_elsewhere_and_dropped_on_its_return(env: Env) -> None:
    keys = {f"{c}{i}": f"{c}-value-{i}" for c in "AMacz" for i in range(20)}
    for i, (k, v) in enumerate(keys.items()):
        assert env.set(NAMES[i % 4], k, v)["error"] == ""
    on_r4 = [sid for sid, nodes in holders(env).items() if "r4" in nodes]
    assert on_r4, "r4 holds no shard: nothing to repair"
    local_before = {s["id"] for s in env.table("r4", local=True)}
    assert set(on_r4) <= local_before

    env.replicas["r4"].kill()

    def repaired() -> bool:
        table = holders(env)
        return all("r4" not in nodes and len(nodes) == 3 for nodes in table.values()) and env.settled("r1", 3)

    wait_for(repaired, SLOW_S, f"r4's copies re-created after {MAX_DOWN_S} s down, 3 each on r1-r3", 0.2)
    for k, v in keys.items():  # every copy made again holds every key
        for name in ("r1", "r2", "r3"):
            r = env.get(name, k)
            assert r == {"key": k, "value": v, "error": ""}, (name, r)

    env.replicas["r4"].restart()

    def dropped() -> bool:
        local = {s["id"] for s in env.table("r4", local=True)}
        table = holders(env, "r4")
        return all(sid in {x for x, nodes in table.items() if "r4" in nodes} for sid in local)

    wait_for(dropped, SLOW_S, "r4 holds only the copies the table gives it (its stale copies dropped)", 0.2)
    logged = [line for line in env.replicas["r4"].raw if '"shard copy dropped"' in line]
    assert logged, "r4 dropped no stale copy"
    for k, v in keys.items():
        assert env.get("r4", k) == {"key": k, "value": v, "error": ""}
