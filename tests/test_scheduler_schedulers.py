"""The schedulers (app/services/scheduler/schedulers.py) run by the simulation of acknowledging nodes.

From random placements: the replica and leader counts converge within one of the mean and then stay
(no operator in hundreds of further rounds); the schedule limits and the nodes' store limits hold in
every round; a node down past max_down_time has its replicas re-created elsewhere, adding before
removing; a drained node empties; leaders leave draining nodes; a hot shard is moved or split within
three rounds; a static topology never moves a replica.
"""

from __future__ import annotations

import os
from collections import Counter
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.services.scheduler.messages import (
    ClusterSpec,
    CreateCluster,
    Limits,
    NodeSpec,
    Operator,
    Place,
    Propose,
    RecordLoad,
    RegisterNode,
    SetNodeState,
)
from app.services.scheduler.model import Cluster
from app.services.scheduler.procedures import MINUTE_MS, limit_class, limit_of
from app.services.scheduler.simulate import Simulation
from app.services.scheduler.state import SchedulerState

SETTINGS = settings(
    max_examples=int(os.environ.get("SCHED_EXAMPLES", "25")),
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
NO_COOLDOWN = Limits(cooldown_s=0)


@st.composite
def clusters(draw: Any, topology: str = "dynamic", min_nodes: int = 2, max_nodes: int = 8) -> Simulation:
    """A cluster of 2-8 online nodes and 1-40 shards placed at random (1..max_replicas nodes each)."""
    n = draw(st.integers(min_nodes, max_nodes))
    shards = draw(st.integers(1, 40))
    replicas = draw(st.integers(1, min(3, n)))
    state = SchedulerState()
    spec = ClusterSpec("c", topology, shards, n, replicas, max_down_time_s=60, limits=NO_COOLDOWN)  # type: ignore[arg-type]
    assert state.apply(CreateCluster(spec))[0] == "c"
    nodes = [f"n{i}" for i in range(n)]
    for node in nodes:
        state.apply(RegisterNode("c", NodeSpec(node)))
    sim = Simulation(state, now_ms=draw(st.sampled_from((0, 5_000))))
    low = replicas if topology == "static" else 1
    placed = tuple(tuple(draw(st.permutations(nodes))[: draw(st.integers(low, replicas))]) for _ in range(shards))
    result, _ = state.apply(Place("c", placed, sim.term, sim.now_ms))
    assert result == shards, result
    return sim


def counts(c: Cluster) -> tuple[Counter[str], Counter[str]]:
    """Replicas and leaders per online node."""
    online = [n for n, r in c.nodes.items() if r.state == "online"]
    reps: Counter[str] = Counter({n: 0 for n in online})
    leaders: Counter[str] = Counter({n: 0 for n in online})
    for s in c.shards.values():
        for r in s.replicas:
            if r.node in reps:
                reps[r.node] += 1
        if s.leader in leaders:
            leaders[s.leader] += 1
    return reps, leaders


def within_one_of_mean(counter: Counter[str]) -> bool:
    mean = sum(counter.values()) / max(1, len(counter))
    return all(abs(v - mean) <= 1 for v in counter.values())


def check_limits(sim: Simulation) -> None:
    """The schedule limits and the nodes' store limits, as they stand now."""
    c = sim.state.clusters["c"]
    running = Counter(limit_class(p.op) for p in sim.state.running("c") if p.op.source != "failover")
    for klass, n in running.items():
        assert n <= limit_of(c, klass), f"{n} {klass} procedures running, limit {limit_of(c, klass)}"
    for node, entries in c.spend.items():
        for kind, per_min in (("add", c.limits.node_adds_per_min), ("remove", c.limits.node_removes_per_min)):
            for e in entries:
                window = sum(x.cost for x in entries if x.kind == kind and 0 <= e.time_ms - x.time_ms < MINUTE_MS)
                assert window <= per_min + 1e-9, f"{node} spent {window} {kind}s within a minute"


def run(sim: Simulation, max_rounds: int = 3000, each: Any = None) -> int:
    def on_round(_: int, __: list[Operator]) -> None:
        check_limits(sim)
        if each is not None:
            each()

    rounds = sim.run("c", max_rounds=max_rounds, on_round=on_round)
    assert rounds < max_rounds, "the simulation did not settle"
    assert not sim.state.running("c")
    return rounds


def quiet_for(sim: Simulation, rounds: int) -> None:
    """Further rounds emit no operator: no oscillation."""
    for _ in range(rounds):
        ops = sim.propose("c")
        assert ops == [], f"round after convergence proposed {ops}"
        sim.now_ms += 1000


@SETTINGS
@given(sim=clusters())
def test_balance_converges_and_stays(sim: Simulation) -> None:
    run(sim)
    c = sim.state.clusters["c"]
    want = min(c.spec.max_replicas, len(c.nodes))
    assert all(len(s.replicas) == want for s in c.shards.values())
    assert all(r.role != "learner" for s in c.shards.values() for r in s.replicas)
    reps, leaders = counts(c)
    assert within_one_of_mean(reps), reps
    assert within_one_of_mean(leaders), leaders
    quiet_for(sim, 600)  # 10 simulated minutes (a round a second) with nothing proposed


@SETTINGS
@given(sim=clusters(min_nodes=3), data=st.data())
def test_repair_after_down_adds_before_removing(sim: Simulation, data: st.DataObject) -> None:
    run(sim)
    c = sim.state.clusters["c"]
    victim = data.draw(st.sampled_from(sorted(c.nodes)))
    assert sim.state.apply(SetNodeState("c", victim, "down", "lease", sim.term, sim.now_ms))[0] == "down"

    def live() -> dict[int, int]:
        return {sid: sum(c.live(r.node) for r in s.replicas) for sid, s in c.shards.items()}

    before = live()
    want = c.spec.max_replicas

    def no_drop() -> None:
        for sid, n in live().items():
            assert n >= min(want, before.get(sid, n)), f"shard {sid} down to {n} live replicas"

    run(sim, each=no_drop)
    assert sim.now_ms >= 60_000  # the replicas waited for max_down_time
    online = [n for n, r in c.nodes.items() if r.state == "online"]
    if len(online) >= want:
        for s in c.shards.values():
            assert len(s.replicas) == want, s
            assert all(c.live(r.node) for r in s.replicas)
            assert s.leader
            assert s.leader != victim
    quiet_for(sim, 100)


@SETTINGS
@given(sim=clusters(min_nodes=2), data=st.data())
def test_drain_empties_the_node(sim: Simulation, data: st.DataObject) -> None:
    c = sim.state.clusters["c"]
    victim = data.draw(st.sampled_from(sorted(c.nodes)))
    assert sim.state.apply(SetNodeState("c", victim, "draining", "", 0, sim.now_ms))[0] == "draining"
    run(sim)
    if len(c.nodes) - 1 >= c.spec.max_replicas:
        assert all(s.replica(victim) is None for s in c.shards.values()), "the drained node still holds replicas"
    assert all(s.leader != victim for s in c.shards.values() if len(s.replicas) > 1)
    quiet_for(sim, 100)


@SETTINGS
@given(sim=clusters(topology="static", min_nodes=2), data=st.data())
def test_static_topology_never_moves_a_replica(sim: Simulation, data: st.DataObject) -> None:
    c = sim.state.clusters["c"]
    where = {sid: {r.node for r in s.replicas} for sid, s in c.shards.items()}

    def same() -> None:
        assert {sid: {r.node for r in s.replicas} for sid, s in c.shards.items()} == where

    for _ in range(data.draw(st.integers(1, 4))):
        node = data.draw(st.sampled_from(sorted(c.nodes)))
        state = data.draw(st.sampled_from(("down", "draining", "online")))
        if state == "online":
            sim.state.apply(RegisterNode("c", NodeSpec(node), sim.now_ms))
        else:
            sim.state.apply(SetNodeState("c", node, state, "", sim.term if state == "down" else 0, sim.now_ms))
        sim.now_ms += 120_000
        run(sim, each=same)
    for s in c.shards.values():  # evict-leader and failover: leaders on online nodes where a follower is
        if any(c.nodes[r.node].state == "online" for r in s.replicas):
            assert c.nodes[s.leader].state == "online", (s, {n: r.state for n, r in c.nodes.items()})


@SETTINGS
@given(sim=clusters(min_nodes=3), data=st.data())
def test_failover_moves_leaders_in_one_round(sim: Simulation, data: st.DataObject) -> None:
    run(sim)
    c = sim.state.clusters["c"]
    victim = data.draw(st.sampled_from(sorted(c.nodes)))
    sim.state.apply(SetNodeState("c", victim, "down", "lease", sim.term, sim.now_ms))
    led = [s.id for s in c.shards.values() if s.leader == victim and len(s.replicas) > 1]
    for _ in range(-(-len(led) // c.limits.leader)):  # the leader limit's worth a round
        sim.propose("c")
        sim.settle("c")
        sim.now_ms += 1000
    assert [sid for sid in led if c.shards[sid].leader == victim] == []


@SETTINGS
@given(sim=clusters(min_nodes=3), data=st.data())
def test_hot_shard_moved_or_split_within_three_rounds(sim: Simulation, data: st.DataObject) -> None:
    run(sim)
    c = sim.state.clusters["c"]
    ids = sorted(c.shards)
    if len(ids) < 3:
        return  # hot is twice the mean: fewer than half the shards can be
    hot = data.draw(st.lists(st.sampled_from(ids), min_size=1, max_size=min(4, (len(ids) - 1) // 2), unique=True))
    before = {sid: (c.shards[sid].leader, c.shards[sid].end) for sid in hot}
    acted: set[int] = set()
    for _ in range(3):
        load = {sid: (100.0 * len(ids) if sid in hot else 1.0) for sid in c.shards}
        assert isinstance(sim.state.apply(RecordLoad("c", {}, load, sim.term, sim.now_ms))[0], int)
        sim.propose("c")
        sim.settle("c")
        check_limits(sim)
        sim.now_ms += 1000
        acted |= {sid for sid in hot if (c.shards[sid].leader, c.shards[sid].end) != before[sid]}
    assert acted == set(hot), f"hot shards {sorted(set(hot) - acted)} neither moved nor split"


def _placed(nodes: int = 4, replicas: int = 3, shards: int = 2) -> Simulation:
    state = SchedulerState()
    state.apply(CreateCluster(ClusterSpec("c", "dynamic", shards, nodes, replicas, limits=NO_COOLDOWN)))
    for i in range(nodes):
        state.apply(RegisterNode("c", NodeSpec(f"n{i}")))
    sim = Simulation(state)
    placed = tuple(tuple(f"n{i}" for i in range(replicas)) for _ in range(shards))
    assert state.apply(Place("c", placed, sim.term))[0] == shards
    return sim


def test_drain_removes_a_surplus_replica() -> None:
    """A shard with max_replicas good replicas and one more on a draining node (a move canceled after its
    promote leaves that) loses the draining one: the drain finishes."""
    sim = _placed()
    c = sim.state.clusters["c"]
    proc, _ = sim.state.apply(Propose("c", Operator("add_replica", (0,), node_to="n3"), sim.term))
    assert isinstance(proc, int)
    sim.settle("c")
    assert len(c.shards[0].replicas) == 4
    sim.state.apply(SetNodeState("c", "n3", "draining"))
    run(sim)
    assert c.shards[0].replica("n3") is None
    assert len(c.shards[0].replicas) == 3


def test_surplus_replica_off_a_down_node_first() -> None:
    """Of a shard's surplus replicas the one on a down node goes, not a live one."""
    sim = _placed()
    c = sim.state.clusters["c"]
    _proc, _ = sim.state.apply(Propose("c", Operator("add_replica", (0,), node_to="n3"), sim.term))
    sim.settle("c")
    sim.state.apply(SetNodeState("c", "n1", "down", "lease", sim.term))
    run(sim)
    assert {r.node for r in c.shards[0].replicas} == {"n0", "n2", "n3"}
