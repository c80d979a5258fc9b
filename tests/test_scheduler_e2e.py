"""The scheduler end to end: 3 replicas on a 3-server NATS cluster and real data-node processes that open shards."""

from __future__ import annotations

import statistics
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import ReplicaSet, wait_for
from tests.harness.datanode import DataNode, DataNodes
from tests.harness.natscluster import NatsCluster, replica_env

pytestmark = pytest.mark.slow

BASE = "/api/v1/scheduler"
CLUSTER = "orders"
SHARDS = 12
REPLICAS = 3
LEASE_S = 1.0
MAX_DOWN_S = 5.0
INTERVAL_S = 1.0  # scheduler.interval, the default
NODES = {"a1": "a", "b1": "b", "c1": "c", "a2": "a", "b2": "b", "c2": "c"}
# A generous bound on what should take a few seconds (timings are measured in bench/, not asserted here).
SLOW_S = 15.0
SETTLE_S = 30.0


class Env:
    """The module's world: NATS cluster, fleetmate replicas, data nodes, and a REST client to a live replica."""

    def __init__(self, nats: NatsCluster, replicas: ReplicaSet, nodes: DataNodes) -> None:
        self.nats = nats
        self.replicas = replicas
        self.nodes = nodes

    def url(self) -> str:
        live = self.replicas.live()
        assert live, "no fleetmate replica is alive"
        return self.replicas.urls[live[0]]

    def get(self, path: str, **params: Any) -> Any:
        resp = httpx.get(self.url() + BASE + path, params=params, timeout=10)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp.json()

    def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        resp = httpx.post(self.url() + BASE + path, json=body, timeout=15)
        assert resp.status_code == status, (path, resp.status_code, resp.text)
        return resp.json()

    def patch(self, path: str, body: Any) -> Any:
        resp = httpx.patch(self.url() + BASE + path, json=body, timeout=15)
        assert resp.status_code == 200, (path, resp.status_code, resp.text)
        return resp.json()

    # ---- views ----

    def shards(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.get(f"/clusters/{CLUSTER}/shards")
        return got

    def node_views(self) -> dict[str, dict[str, Any]]:
        return {n["name"]: n for n in self.get(f"/clusters/{CLUSTER}/nodes")}

    def procedures(self, status: str | None = None) -> list[dict[str, Any]]:
        params = {"status": status} if status else {}
        got: list[dict[str, Any]] = self.get(f"/clusters/{CLUSTER}/procedures", **params)
        return got

    def running(self) -> list[dict[str, Any]]:
        return [p for p in self.procedures() if p["status"] in ("created", "started")]

    def leaders(self) -> dict[int, str]:
        return {s["id"]: s["leader"] for s in self.shards()}

    def expected_files(self, shards: list[dict[str, Any]] | None = None) -> dict[str, dict[int, tuple[str, int]]]:
        """node -> shard -> (role, epoch), as the shard table says each node must hold."""
        out: dict[str, dict[int, tuple[str, int]]] = {n.name: {} for n in self.nodes}
        for s in shards if shards is not None else self.shards():
            for r in s["replicas"]:
                out.setdefault(r["node"], {})[s["id"]] = (r["role"], s["epoch"])
        return out

    def files(self, node: DataNode) -> dict[int, tuple[str, int]]:
        return {sid: (f["role"], f["epoch"]) for sid, f in node.files().items()}

    def diagnose(self) -> list[dict[str, Any]]:
        got: list[dict[str, Any]] = self.get(f"/clusters/{CLUSTER}/diagnose")
        return got

    def idle(self) -> bool:
        """No procedure runs and no scheduler would start one now."""
        if self.running():
            return False
        return all(not v["operators"] for v in self.diagnose())

    def settled(self) -> bool:
        """Idle, every replica acknowledged at its shard's epoch, every live node's files as the table says."""
        if not self.get(f"/clusters/{CLUSTER}")["placed"] or not self.idle():
            return False
        shards = self.shards()
        if not all(r["acked"] == s["epoch"] for s in shards for r in s["replicas"]):
            return False
        want = self.expected_files(shards)
        return all(self.files(n) == want.get(n.name, {}) for n in self.nodes.alive())

    def wait_settled(self, timeout: float = SETTLE_S) -> None:
        wait_for(self.settled, timeout, "no procedure running, every replica acknowledged, files matching", 0.2)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root: Path = tmp_path_factory.mktemp("sched-e2e")
    nats = NatsCluster(root / "nats")
    replicas: ReplicaSet | None = None
    nodes: DataNodes | None = None
    try:
        nats.start()
        replicas = ReplicaSet(root, nats.urls, env=replica_env(FLEETMATE_SCHEDULER_INTERVAL=str(INTERVAL_S)))
        replicas.start()
        replicas.leader()
        nodes = DataNodes(root / "nodes", nats.urls, CLUSTER, lease=LEASE_S)
        for name, zone in NODES.items():
            nodes.add(name, {"zone": zone})
        world = Env(nats, replicas, nodes)
        spec = {
            "name": CLUSTER,
            "topology": "dynamic",
            "shard_count": SHARDS,
            "node_count": len(NODES),
            "max_replicas": REPLICAS,
            "enable_schedule": True,
            "local_data": False,
            "max_down_time_s": MAX_DOWN_S,
            "lease_s": LEASE_S,
            "limits": {"cooldown_s": 0},  # the first placement balanced at once; the default again after
        }
        for node in nodes:  # they retry registering until the cluster exists: they join in a burst
            node.start(wait_registered=False)
        created = world.post("/clusters", spec, status=201)
        assert created["name"] == CLUSTER
        for node in nodes:
            node.wait_registered()
        yield world
    finally:
        if nodes is not None:
            nodes.close()
        if replicas is not None:
            replicas.close()
        nats.close()


def test_placement_every_shard_on_three_zones_every_replica_acknowledged_files_match(env: Env) -> None:
    started = time.monotonic()
    env.wait_settled()
    print(f"\nplaced and acknowledged {time.monotonic() - started:.1f}s after the 6 nodes registered")
    view = env.get(f"/clusters/{CLUSTER}")
    assert view["placed"]
    assert view["nodes"] == {"online": len(NODES)}
    shards = env.shards()
    assert len(shards) == SHARDS
    zone = {n.name: n.labels["zone"] for n in env.nodes}
    for s in shards:
        nodes = [r["node"] for r in s["replicas"]]
        assert len(nodes) == REPLICAS, s
        assert len({zone[n] for n in nodes}) == REPLICAS, s  # one replica per zone
        assert [r["role"] for r in s["replicas"]].count("leader") == 1, s
        assert all(r["acked"] == s["epoch"] for r in s["replicas"]), s
    want = env.expected_files(shards)
    for node in env.nodes:
        assert env.files(node) == want[node.name], node.name
        assert {sid: (v["role"], v["epoch"]) for sid, v in node.shards().items()} == want[node.name]
        # An ack may race a newer change (a moved replica acknowledging after its removal): only that is refused.
        refused = [e for e in node.logged("ack") if not e["ok"]]
        assert all(e["error"] == "refused" and e["shard"] not in want[node.name] for e in refused), refused
    counts = Counter(r["node"] for s in shards for r in s["replicas"])
    assert set(counts.values()) == {SHARDS * REPLICAS // len(NODES)}, counts  # 2 nodes a zone: 6 each
    # A route from any replica's applied state names the leader the table names.
    for name, url in env.replicas.urls.items():
        route = httpx.get(f"{url}{BASE}/clusters/{CLUSTER}/route", params={"key": "80000000"}, timeout=5).json()
        shard = next(s for s in shards if s["id"] == route["shard"])
        assert shard["start"] <= "80000000", (name, route)
        assert not shard["end"] or shard["end"] > "80000000", (name, route)
        assert route["leader"] == shard["leader"], (name, route)
        assert route["leader_address"] == env.nodes[shard["leader"]].address
    env.patch(f"/clusters/{CLUSTER}", {"limits": {}})  # the default cool-down (10 min) from here on


def test_the_first_placement_waits_for_node_count_nodes_and_needs_no_move(env: Env) -> None:
    env.wait_settled()
    moves = [p for p in env.procedures() if p["op"]["source"] == "balance-shard"]
    assert moves == [], f"{len(moves)} balance-shard moves after the first placement"


def _ack_time(node: DataNode, shard: int, after: float) -> float | None:
    """When the node acknowledged (ok) opening the shard as its leader, after `after` (wall time)."""
    opened = [e for e in node.logged("opened", shard=shard, role="leader") if e["t"] >= after]
    if not opened:
        return None
    epoch = opened[0]["epoch"]
    acks = [e for e in node.logged("ack", shard=shard, epoch=epoch, status="opened", ok=True) if e["t"] >= after]
    return float(acks[0]["t"]) if acks else None


def test_kill_a_data_node_leaders_move_replicas_repaired_add_before_remove_stale_copies_dropped(env: Env) -> None:
    env.wait_settled()
    before = env.shards()
    victim = env.nodes[max(NODES, key=lambda n: (sum(s["leader"] == n for s in before), n))]
    led = [s["id"] for s in before if s["leader"] == victim.name]
    held = sorted(s["id"] for s in before if any(r["node"] == victim.name for r in s["replicas"]))
    assert led
    killed_at = victim.kill()

    # Leaders move to a live follower; the time from the kill to the new leader's acknowledgement.
    def moved() -> dict[int, str] | None:
        leaders = env.leaders()
        return {sid: leaders[sid] for sid in led} if all(leaders[sid] != victim.name for sid in led) else None

    new_leaders = wait_for(moved, SLOW_S, f"the leaders of shards {led} off {victim.name}", 0.1)
    took = {
        sid: wait_for(lambda sid=sid: _ack_time(env.nodes[new_leaders[sid]], sid, killed_at), SLOW_S, "ack")
        for sid in led
    }
    seconds = sorted(t - killed_at for t in took.values())
    print(
        f"\nkill -9 {victim.name} (lease {LEASE_S:g}s, round {INTERVAL_S:g}s): {len(led)} leaders moved, "
        f"kill -> new leader's ack median {statistics.median(seconds):.2f}s, max {max(seconds):.2f}s "
        f"({', '.join(f'{s:.2f}' for s in seconds)})"
    )
    assert max(seconds) <= SLOW_S
    down = wait_for(lambda: env.node_views()[victim.name]["state"] == "down", SLOW_S, f"{victim.name} down")
    assert down

    # Past max_down_time its replicas are re-created elsewhere, each added before the dead one goes.
    def repaired() -> bool:
        shards = env.shards()
        return (
            all(
                len(s["replicas"]) == REPLICAS
                and all(r["node"] != victim.name and r["acked"] == s["epoch"] for r in s["replicas"])
                for s in shards
            )
            and not env.running()
        )

    wait_for(repaired, MAX_DOWN_S + SETTLE_S, f"every replica off {victim.name}, {REPLICAS} per shard", 0.2)
    repaired_s = time.time() - killed_at
    procs = [p for p in env.procedures() if p["created_ms"] >= killed_at * 1000 - 1000]
    for sid in held:
        mine = sorted((p for p in procs if sid in p["op"]["shards"]), key=lambda p: p["id"])
        adds = [p for p in mine if p["op"]["kind"] == "add_replica" and p["status"] == "success"]
        removes = [p for p in mine if p["op"]["kind"] == "remove_replica" and p["op"]["node_from"] == victim.name]
        assert adds, (sid, mine)
        assert removes, (sid, mine)
        assert removes[0]["status"] == "success", removes[0]
        assert removes[0]["created_ms"] >= adds[0]["updated_ms"], (sid, adds[0], removes[0])
    print(f"{len(held)} replicas re-created elsewhere {repaired_s:.1f}s after the kill (max_down_time {MAX_DOWN_S:g}s)")
    stale = env.node_views()[victim.name]["stale"]
    assert sorted(stale) == held, stale

    # It comes back: told to drop its stale copies, it deletes their files and acknowledges.
    assert sorted(victim.files()) == held  # kill -9 left them on disk
    victim.restart()
    wait_for(lambda: env.node_views()[victim.name]["stale"] == [], SLOW_S, f"{victim.name}'s stale list emptied")
    closed = {e["shard"] for e in victim.logged("closed")}
    assert set(held) <= closed, (held, closed)
    env.wait_settled()
    assert env.files(victim) == env.expected_files()[victim.name]
    for sid in held:  # any copy it holds now is a new one the scheduler placed there since
        if sid in victim.files():
            assert victim.logged("opened", shard=sid, fresh=True), sid


def test_drain_a_node_leaders_leave_first_then_every_replica(env: Env) -> None:
    env.wait_settled()
    before = env.shards()
    target = env.nodes[max(NODES, key=lambda n: (sum(s["leader"] == n for s in before), n))]
    led = {s["id"] for s in before if s["leader"] == target.name}
    assert led
    mark_ms = int(time.time() * 1000)
    view = env.post(f"/clusters/{CLUSTER}/nodes/{target.name}/drain", {"reason": "e2e drain"})
    assert view["state"] == "draining"
    try:
        wait_for(
            lambda: env.node_views()[target.name]["replicas"] == 0 and not env.running(),
            SETTLE_S,
            f"{target.name} drained of every replica",
            0.2,
        )
        env.wait_settled()
        assert target.files() == {}
        assert env.node_views()[target.name]["state"] == "draining"
        procs = [p for p in env.procedures() if p["created_ms"] >= mark_ms]
        assert all(p["status"] == "success" for p in procs), [(p["id"], p["status"], p["reason"]) for p in procs]
    finally:
        env.post(f"/clusters/{CLUSTER}/nodes/{target.name}/undrain", {"reason": "e2e"})
    wait_for(lambda: env.node_views()[target.name]["state"] == "online", SLOW_S, f"{target.name} online again")
    print(f"\ndrained {target.name} ({len(led)} leaders) with {len(procs)} procedures")
    # Each shard it led changed leader (evict-leader) before its replica there was removed.
    late: list[str] = []
    for sid in sorted(led):
        mine = [p for p in procs if sid in p["op"]["shards"]]
        removed_ms = min(
            st["started_ms"]
            for p in mine
            for st in p["steps"]
            if st["action"] == "remove" and st["node"] == target.name
        )
        transfers = [p["updated_ms"] for p in mine if p["op"]["kind"] == "transfer_leader" and p["status"] == "success"]
        if not transfers or min(transfers) > removed_ms:
            how = [(p["op"]["source"], p["op"]["kind"]) for p in mine]
            late.append(f"shard {sid}: leadership left {target.name} only with its replica ({how})")
    assert not late, late


def test_two_nodes_added_replicas_balance_then_nothing_moves_for_30s(env: Env) -> None:
    env.wait_settled()
    # Without the cool-down, a balanced cluster that still moved something would be oscillating.
    env.patch(f"/clusters/{CLUSTER}", {"limits": {"cooldown_s": 0}})
    added = ["d1", "d2"]  # a fourth zone: the 3 zones of 2 nodes each keep one replica per shard
    for name in added:
        env.nodes.add(name, {"zone": "d"})
    started = time.monotonic()
    env.nodes.start(added)
    online = [n for n, v in env.node_views().items() if v["state"] == "online"]
    assert sorted(online) == sorted([*NODES, *added]), env.node_views()
    mean = SHARDS * REPLICAS / len(online)

    def balanced() -> Counter[str]:
        shards = env.shards()
        counts = Counter({n: 0 for n in online})
        counts.update(r["node"] for s in shards for r in s["replicas"])
        if not all(abs(c - mean) <= 1 for c in counts.values()) or not env.settled():
            verdicts = [(v["scheduler"], len(v["operators"]), v["reason"]) for v in env.diagnose()]
            raise AssertionError(f"counts {dict(sorted(counts.items()))}, running {len(env.running())}, {verdicts}")
        return counts

    counts = wait_for(balanced, SETTLE_S + 15, f"replica counts within 1 of {mean:.2f}", 0.25)
    print(f"\n+2 nodes: balanced in {time.monotonic() - started:.1f}s: {dict(sorted(counts.items()))}")
    last = max((p["id"] for p in env.procedures()), default=0)
    files = {n.name: env.files(n) for n in env.nodes}
    time.sleep(30)  # the scenario: 30 s of steady heartbeats in which nothing may move
    later = [p for p in env.procedures() if p["id"] > last]
    assert later == [], [(p["id"], p["op"], p["status"]) for p in later]
    assert {n.name: env.files(n) for n in env.nodes} == files
    env.patch(f"/clusters/{CLUSTER}", {"limits": {}})  # the default cool-down again


def test_scheduling_leader_killed_mid_procedure_every_procedure_resumes_none_lost(env: Env) -> None:
    env.wait_settled()
    slow, source = env.nodes["a1"], env.nodes["a2"]
    slow.extra = ["--ack-delay", "2"]  # new replicas take 2 s to catch up: the procedures are caught mid-way
    slow.restart()
    env.wait_settled()
    shards = env.shards()
    movable = [
        s["id"]
        for s in shards
        if any(r["node"] == source.name and r["role"] == "follower" for r in s["replicas"])
        and not any(r["node"] == slow.name for r in s["replicas"])
    ][:3]
    assert movable, "no shard a2 follows that a1 lacks"
    ids = [
        env.post(
            f"/clusters/{CLUSTER}/procedures",
            {"kind": "move", "shards": [sid], "node_from": source.name, "node_to": slow.name},
            status=201,
        )["id"]
        for sid in movable
    ]

    def started() -> list[dict[str, Any]] | None:
        procs = {p["id"]: p for p in env.procedures()}
        mine = [procs[i] for i in ids]
        return mine if all(p["status"] == "started" for p in mine) else None

    before = wait_for(started, SLOW_S, "the moves started", 0.05)
    all_before = {p["id"]: p for p in env.procedures()}
    leader = env.replicas.leader()
    killed_at = time.monotonic()
    env.replicas[leader].kill()
    new_leader = env.replicas.leader()
    elected_s = time.monotonic() - killed_at

    def finished() -> list[dict[str, Any]] | None:
        procs = {p["id"]: p for p in env.procedures()}
        mine = [procs[i] for i in ids]
        return mine if all(p["status"] == "success" for p in mine) else None

    after = wait_for(finished, SETTLE_S, "the moves finished under the new leader", 0.1)
    done_s = time.monotonic() - killed_at
    print(
        f"\nkilled scheduling leader {leader} with {len(ids)} moves at steps {[p['at'] for p in before]}: "
        f"{new_leader} leads after {elected_s:.1f}s, every move succeeded {done_s:.1f}s after the kill"
    )
    for p in after:
        starts = [h[1] for h in p["history"] if h[1].startswith("step ") and not h[1].endswith(" done")]
        assert len(starts) == len(p["steps"]) == 3, p["history"]  # each step started once: nothing ran twice
        assert len({s.split()[1] for s in starts}) == 3, p["history"]
    # None lost: every procedure known before the kill is still there, none went back, none is stuck.
    env.wait_settled()
    now = {p["id"]: p for p in env.procedures()}
    assert set(all_before) <= set(now)
    for pid, p in all_before.items():
        if p["status"] not in ("created", "started"):
            assert now[pid]["status"] == p["status"], (pid, p["status"], now[pid]["status"])
        assert now[pid]["status"] not in ("created", "started"), now[pid]
