"""The test data node (tests/harness/datanode.py): convergence plans, revision order, loads, the process itself."""

from __future__ import annotations

import signal
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.services.scheduler.messages import (
    ClusterSpec,
    CreateCluster,
    Limits,
    NodeSpec,
    Operator,
    Place,
    Propose,
    RegisterNode,
    Report,
    SetNodeState,
)
from app.services.scheduler.protocol import Assigned, Assignment
from app.services.scheduler.schedulers import placement
from app.services.scheduler.simulate import Simulation
from app.services.scheduler.state import SchedulerState
from tests.harness import NatsServer, wait_for
from tests.harness.datanode import (
    DataNode,
    LocalShard,
    Plan,
    is_newer,
    parse_hot,
    parse_labels,
    plan,
    shard_loads,
)


def local(*shards: tuple[int, str, int]) -> dict[int, LocalShard]:
    return {sid: LocalShard(sid, role, epoch) for sid, role, epoch in shards}


def assignment(revision: int, *shards: tuple[int, str, int], drop: list[int] | None = None) -> Assignment:
    return Assignment("c", "n1", revision, [Assigned(sid, role, epoch) for sid, role, epoch in shards], drop or [])


def ids(items: list[Assigned]) -> list[int]:
    return [a.id for a in items]


# ---- revision order -----------------------------------------------------------------------------------


def test_an_older_revision_is_ignored_the_same_one_applied_again() -> None:
    assert is_newer(5, 0)
    assert is_newer(6, 5)
    assert is_newer(5, 5)  # a re-push of the newest: converging again is idempotent
    assert not is_newer(4, 5)


# ---- plans ---------------------------------------------------------------------------------------------


def test_an_empty_node_opens_every_assigned_shard_in_id_order() -> None:
    p = plan({}, assignment(3, (2, "leader", 1), (0, "follower", 1), (1, "learner", 4)))
    assert ids(p.opens) == [0, 1, 2]
    assert (p.reacks, p.closes, p.close_acks) == ([], [], [])


def test_a_converged_and_acknowledged_node_has_nothing_to_do() -> None:
    a = assignment(3, (0, "leader", 2), (1, "follower", 3))
    p = plan(local((0, "leader", 2), (1, "follower", 3)), a, acked={0: 2, 1: 3})
    assert p.empty


def test_an_unacknowledged_open_is_acknowledged_again_without_reopening() -> None:
    a = assignment(3, (0, "leader", 2), (1, "follower", 3))
    p = plan(local((0, "leader", 2), (1, "follower", 3)), a, acked={0: 2})
    assert (p.opens, ids(p.reacks)) == ([], [1])


def test_role_and_epoch_changes_come_before_new_opens() -> None:
    held = local((5, "follower", 1), (7, "follower", 2))
    a = assignment(9, (1, "learner", 3), (5, "leader", 2), (7, "follower", 3))
    p = plan(held, a, acked={5: 1, 7: 2})
    assert ids(p.opens) == [5, 7, 1]  # a follower made leader is not held up behind a catch-up


def test_an_unassigned_local_shard_is_closed_and_a_dropped_one_not_held_is_acknowledged_closed() -> None:
    held = local((0, "leader", 2), (3, "follower", 1))
    a = assignment(4, (0, "leader", 2), drop=[3, 8])
    p = plan(held, a, acked={0: 2})
    assert p.closes == [3]
    assert p.close_acks == [8]  # 3 is acknowledged once its file is gone, not twice
    assert plan(held, a, acked={0: 2}, closed_acked=[8]).close_acks == []


def test_a_stale_copy_assigned_again_is_reopened_and_its_stale_entry_acknowledged_closed() -> None:
    held = local((2, "follower", 3))
    a = assignment(9, (2, "learner", 6), drop=[2])
    p = plan(held, a)
    assert ids(p.opens) == [2]
    assert p.closes == []
    assert p.close_acks == [2]


def apply(held: dict[int, LocalShard], acked: dict[int, int], p: Plan) -> None:
    """What the program does with a plan when every ack is answered."""
    for sid in p.closes:
        held.pop(sid)
        acked.pop(sid, None)
    for want in [*p.opens, *p.reacks]:
        held[want.id] = LocalShard(want.id, want.role, want.epoch)
        acked[want.id] = want.epoch


roles = st.sampled_from(["leader", "follower", "learner"])
shard_sets = st.dictionaries(st.integers(0, 12), st.tuples(roles, st.integers(0, 6)), max_size=10)


@settings(max_examples=300, deadline=None)
@given(
    held=shard_sets,
    wanted=shard_sets,
    drop=st.lists(st.integers(0, 12), max_size=5),
    acked=st.dictionaries(st.integers(0, 12), st.integers(0, 6)),
)
def test_one_plan_converges_and_a_second_is_empty(
    held: dict[int, tuple[str, int]],
    wanted: dict[int, tuple[str, int]],
    drop: list[int],
    acked: dict[int, int],
) -> None:
    have = {sid: LocalShard(sid, role, epoch) for sid, (role, epoch) in held.items()}
    a = assignment(1, *((sid, role, epoch) for sid, (role, epoch) in wanted.items()), drop=drop)
    p = plan(have, a, dict(acked))
    touched = [*ids(p.opens), *ids(p.reacks), *p.closes]
    assert len(touched) == len(set(touched)), p  # no shard is handled twice in one pass
    assert set(p.close_acks) <= set(drop)
    assert not set(p.closes) & set(wanted)
    apply(have, acked, p)
    assert {sid: (s.role, s.epoch) for sid, s in have.items()} == wanted
    again = plan(have, a, acked, closed_acked=[*p.close_acks, *p.closes])
    assert (again.opens, again.reacks, again.closes, again.close_acks) == ([], [], [], [])


# ---- loads and options ------------------------------------------------------------------------------------


def test_leaders_carry_the_load_hot_shards_their_rate_sizes_from_the_files() -> None:
    held = local((0, "leader", 1), (1, "follower", 1), (2, "leader", 1))
    loads = shard_loads(held, {0: 120, 1: 80}, hot={2: 500.0}, base=1.5)
    assert [(x.id, x.size, x.writes_per_s, x.reads_per_s) for x in loads] == [
        (0, 120, 1.5, 1.5),
        (1, 80, 0.0, 0.0),
        (2, 0, 500.0, 500.0),
    ]


def test_options_parse() -> None:
    assert parse_hot(["3:250", "4"]) == {3: 250.0, 4: 100.0}
    assert parse_labels(["zone=a", "rack=r1"]) == {"zone": "a", "rack": "r1"}
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_labels(["zone"])


# ---- the node logic against the real (pure) scheduler state machine ---------------------------------------


class Nodes:
    """Data nodes made of the program's plan(), driving SchedulerState's reports as the real ones would."""

    def __init__(self, state: SchedulerState, cluster: str, names: list[str]) -> None:
        self.state = state
        self.cluster = cluster
        self.held: dict[str, dict[int, LocalShard]] = {n: {} for n in names}
        self.acked: dict[str, dict[int, int]] = {n: {} for n in names}
        self.up = set(names)

    def assignment(self, node: str) -> Assignment:
        held, drop = self.state.assignment(self.cluster, node)
        shards = [Assigned(s.id, r.role, s.epoch, s.start, s.end, list(s.tables)) for s, r in held]
        rec = self.state.clusters[self.cluster].nodes[node]
        return Assignment(self.cluster, node, self.state.revision, shards, drop, rec.state)

    def converge(self, now_ms: int) -> int:
        """Every live node converges to its assignment once; the reports sent."""
        sent = 0
        for node in sorted(self.up):
            p = plan(self.held[node], self.assignment(node), self.acked[node])
            for sid in p.closes:
                old = self.held[node].pop(sid)
                self.acked[node].pop(sid, None)
                self.state.apply(Report(self.cluster, node, sid, old.epoch, "closed", now_ms))
                sent += 1
            for sid in p.close_acks:
                self.state.apply(Report(self.cluster, node, sid, 0, "closed", now_ms))
                sent += 1
            for want in [*p.opens, *p.reacks]:
                self.held[node][want.id] = LocalShard(want.id, want.role, want.epoch)
                self.state.apply(Report(self.cluster, node, want.id, want.epoch, "opened", now_ms))
                self.acked[node][want.id] = want.epoch
                sent += 1
        return sent


def test_the_node_logic_completes_every_kind_of_step_failover_repair_and_the_stale_drop() -> None:
    state = SchedulerState()
    spec = ClusterSpec("c", shard_count=6, max_replicas=3, max_down_time_s=5, limits=Limits(cooldown_s=0))
    state.apply(CreateCluster(spec))
    names = [f"n{i}" for i in range(5)]
    for i, n in enumerate(names):
        state.apply(RegisterNode("c", NodeSpec(n, labels={"zone": "abc"[i % 3]})))
    sim = Simulation(state)
    result, _ = state.apply(Place("c", placement(state.clusters["c"]), sim.term))
    assert result == 6
    nodes = Nodes(state, "c", names)

    def run(rounds: int) -> None:
        """Rounds of a leader that advances a procedure as soon as its step is acknowledged."""
        for _ in range(rounds):
            settle()
            sim.propose("c")
            settle()
            sim.now_ms += 1000

    def settle() -> None:
        while nodes.converge(sim.now_ms) + sim.settle("c", ack=False):
            pass

    run(3)
    c = state.clusters["c"]
    assert all(r.acked == s.epoch for s in c.shards.values() for r in s.replicas)
    assert nodes.held == {
        n: {s.id: LocalShard(s.id, r.role, s.epoch) for s in c.shards.values() for r in s.replicas if r.node == n}
        for n in names
    }
    # A manual move exercises add_learner, promote and remove (of a leader: its heir acknowledges).
    s0 = c.shards[0]
    to = next(n for n in names if s0.replica(n) is None)
    pid, _ = state.apply(Propose("c", Operator("move", (0,), node_from=s0.leader, node_to=to), sim.term, sim.now_ms))
    assert isinstance(pid, int), pid
    run(4)
    assert state.procedures[pid].status == "success", state.procedures[pid]
    # A node dies: failover moves its leaders; past max_down_time its replicas are re-created elsewhere.
    victim = max(names, key=lambda n: sum(1 for s in c.shards.values() if s.leader == n))
    led = [s.id for s in c.shards.values() if s.leader == victim]
    assert led
    nodes.up.discard(victim)
    state.apply(SetNodeState("c", victim, "down", "lease expired", sim.term, sim.now_ms))
    run(2)
    assert all(c.shards[sid].leader not in ("", victim) for sid in led)
    sim.now_ms += 6000
    run(10)
    assert not [s.id for s in c.shards.values() if s.replica(victim)]
    assert all(len(s.replicas) == 3 for s in c.shards.values())
    assert not state.running("c"), state.running("c")
    # It comes back: told to drop its stale copies, it closes them and the stale list empties.
    assert c.stale.get(victim)
    state.apply(RegisterNode("c", NodeSpec(victim, labels={"zone": "abc"[names.index(victim) % 3]})))
    nodes.up.add(victim)
    nodes.converge(sim.now_ms)
    assert nodes.held[victim] == {}
    assert victim not in c.stale


def test_a_move_in_flight_is_not_replaced_by_repair_before_its_learner_catches_up() -> None:
    """Seen before a5f0d21: repair counted the learner as an extra replica and replaced the move."""
    state = SchedulerState()
    state.apply(CreateCluster(ClusterSpec("c", shard_count=3, max_replicas=3, limits=Limits(cooldown_s=0))))
    names = [f"n{i}" for i in range(4)]
    for n in names:
        state.apply(RegisterNode("c", NodeSpec(n)))
    sim = Simulation(state)
    state.apply(Place("c", placement(state.clusters["c"]), sim.term))
    nodes = Nodes(state, "c", names)
    nodes.converge(0)
    c = state.clusters["c"]
    s0 = c.shards[0]
    to = next(n for n in names if s0.replica(n) is None)
    op = Operator("move", (0,), node_from=s0.replicas[1].node, node_to=to)
    pid, _ = state.apply(Propose("c", op, sim.term, 0))
    assert state.procedures[pid].status == "started"  # its learner is added, catching up (not acknowledged yet)
    sim.now_ms = 1000
    proposed = sim.propose("c")  # the next scheduling round
    assert [o for o in proposed if 0 in o.shards] == []
    assert state.procedures[pid].status == "started"


# ---- the program as a process ---------------------------------------------------------------------------------


def test_the_program_loads_its_shard_files_waits_to_register_and_exits_cleanly_on_sigterm(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    shards = tmp_path / "n1" / "shards"
    shards.mkdir(parents=True)
    (shards / "4.json").write_bytes(msgspec.json.encode(LocalShard(4, "follower", 7)))
    node = DataNode(tmp_path / "n1", nats_server.url, "c", "n1").start(wait_registered=False)
    try:
        started = wait_for(lambda: node.logged("started"), 15, "the started event")
        assert started[0]["shards"] == [4]
        assert node.shards() == {
            4: {
                "id": 4,
                "role": "follower",
                "epoch": 7,
                "start": "",
                "end": "",
                "tables": [],
                "opened_at": 0.0,
                "acked": 0,
            }
        }
        assert node.stop(signal.SIGTERM) == 0
        assert node.logged("stopped")
        assert not node.logged("registered")  # nobody answers registrations on a bare nats-server
        assert node.files().keys() == {4}
    finally:
        node.kill()
