"""The scheduler's state machine (app/services/scheduler/state.py) under random commands, and each error.

A hypothesis RuleBasedStateMachine feeds two SchedulerStates the same random commands (clusters,
nodes, placement, manual and scheduler procedures, node reports, advances, expiries, cancels, node
state changes, loads, tables, leader elections with stale terms) and checks after every command:
one unfinished procedure per shard (state.busy agrees), scheduler procedures within their limits, the
nodes' store limits over every minute, a refused command changing nothing, both states identical,
epochs only growing, a step's change applied once, no shard left without a replica, stale terms
refused. The example tests below pin each error's class and message and that nothing changed.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, rule

from app.services.scheduler.errors import (
    AlreadyExists,
    BadSchedulerRequest,
    NoSuchCluster,
    NoSuchDataNode,
    NoSuchProcedure,
    NoSuchShard,
    NoSuchTable,
    Refused,
    SchedulerError,
    StaleTerm,
    StepNotReady,
)
from app.services.scheduler.messages import (
    Advance,
    Cancel,
    ClusterSpec,
    ClusterUpdate,
    Command,
    CreateCluster,
    CreateTable,
    DropCluster,
    DropTable,
    Expire,
    LeaderElected,
    Limits,
    NodeSpec,
    Operator,
    Place,
    Propose,
    RecordLoad,
    RegisterNode,
    Report,
    SetNodeState,
    UpdateCluster,
)
from app.services.scheduler.procedures import MINUTE_MS, limit_class, limit_of
from app.services.scheduler.schedulers import operators, placement
from app.services.scheduler.simulate import acks_for
from app.services.scheduler.state import SchedulerState

_enc = msgspec.msgpack.Encoder()
CLUSTERS = ("a", "b")
NODES = tuple(f"n{i}" for i in range(6))
TERMED = (Place, Advance, Expire, RecordLoad)


def snapshot(s: SchedulerState) -> bytes:
    """Every cluster, every procedure and the bookkeeping, as bytes."""
    return _enc.encode(
        [s.clusters, s.procedures, sorted(s.busy.items()), s.finished, s.next_proc, s.term, s.leader, s.revision]
    )


def check_invariants(s: SchedulerState) -> None:
    """What holds after any command."""
    held: dict[tuple[str, int], int] = {}
    for p in s.running():
        for sid in {*p.epochs, *p.op.shards}:
            key = (p.cluster, sid)
            assert key not in held, f"shard {key} held by procedures {held[key]} and {p.id}"
            held[key] = p.id
            assert s.busy.get(key) == p.id, f"busy says {s.busy.get(key)} for {key}, procedure {p.id} holds it"
    assert set(s.busy) == set(held), f"busy has {set(s.busy) - set(held)} no procedure holds"
    for c in s.clusters.values():
        for shard in c.shards.values():
            nodes = [r.node for r in shard.replicas]
            assert len(nodes) == len(set(nodes)), f"shard {shard.id} twice on a node: {nodes}"
            assert sum(r.role == "leader" for r in shard.replicas) <= 1, f"two leaders of {shard.id}"
            assert all(n in c.nodes for n in nodes)
            if c.placed:
                assert any(r.role != "learner" for r in shard.replicas), f"shard {shard.id} lost its replicas"
        if c.spec.topology == "static":
            assert len(c.nodes) <= c.spec.node_count


class SchedulerVsModel(RuleBasedStateMachine):
    """Two states fed the same commands; invariants after each."""

    @initialize(
        topology=st.sampled_from(("dynamic", "dynamic", "static")),
        shards=st.integers(1, 8),
        nodes=st.integers(1, 6),
        replicas=st.integers(1, 3),
        limits=st.builds(
            Limits,
            leader=st.integers(0, 4) | st.just(4),
            shard=st.integers(0, 6) | st.just(6),
            replica=st.integers(0, 6) | st.just(6),
            hot=st.integers(0, 2),
            node_adds_per_min=st.sampled_from((0.0, 1.0, 2.0, 15.0, 15.0)),
            node_removes_per_min=st.sampled_from((0.0, 1.0, 15.0)),
            cooldown_s=st.sampled_from((0.0, 0.0, 30.0)),
            expire_s=st.just(30.0),
        ),
        start=st.sampled_from((0, 1_000)),
    )
    def start(self, topology: Any, shards: int, nodes: int, replicas: int, limits: Limits, start: int) -> None:
        """Cluster a, placed on its nodes (time 0 included: a step started at 0 is still started)."""
        self.a = SchedulerState()
        self.b = SchedulerState()
        self.now = start
        self.epochs: dict[tuple[str, int], int] = {}
        self.steps: dict[tuple[int, int], tuple[int, int]] = {}  # (proc, step) -> (started_ms, epoch) once set
        self.do(LeaderElected(1, "r1", self.now))
        replicas = min(replicas, nodes)
        spec = ClusterSpec("a", topology, shards, nodes, replicas, max_down_time_s=60, limits=limits)
        assert self.do(CreateCluster(spec, self.now)) == "a"
        for node in NODES[:nodes]:
            self.do(RegisterNode("a", NodeSpec(node), self.now))
        assert self.do(Place("a", placement(self.a.clusters["a"]), 1, self.now)) == shards

    # ---- applying -------------------------------------------------------------------------------

    def do(self, cmd: Command) -> Any:
        before = snapshot(self.a)
        spends = {(c.spec.name, n): list(v) for c in self.a.clusters.values() for n, v in c.spend.items()}
        term = self.a.term
        ra, _ = self.a.apply(cmd)
        rb, _ = self.b.apply(cmd)
        event(f"{type(cmd).__name__} {type(ra).__name__ if isinstance(ra, Exception) else 'applied'}")
        assert type(ra) is type(rb), f"{cmd}: {ra!r} vs {rb!r}"
        assert str(ra) == str(rb), f"{cmd}: {ra!r} vs {rb!r}"
        after = snapshot(self.a)
        assert after == snapshot(self.b), f"the two states differ after {cmd}"
        if isinstance(ra, Exception):
            assert isinstance(ra, SchedulerError), f"{cmd}: {ra!r}"
            assert "could not be applied" not in str(ra), f"{cmd}: an unexpected exception {ra}"
            assert after == before, f"refused {cmd} ({ra}) changed the state"
        cmd_term = getattr(cmd, "term", 0)
        if cmd_term and not isinstance(cmd, LeaderElected) and cmd_term != term:
            assert isinstance(ra, Exception), f"{cmd} of a past term was applied"
            if isinstance(cmd, (*TERMED, Propose)):
                assert isinstance(ra, StaleTerm), f"{cmd}: {ra!r}"
        if isinstance(cmd, LeaderElected) and cmd.term <= term:
            assert isinstance(ra, StaleTerm)
        check_invariants(self.a)
        self.check_growth(cmd, ra)
        self.check_limits(cmd, ra, spends)
        return ra

    def check_growth(self, cmd: Command, result: Any) -> None:
        if isinstance(cmd, CreateCluster) and not isinstance(result, Exception):
            self.epochs = {k: v for k, v in self.epochs.items() if k[0] != cmd.spec.name}
        for c in self.a.clusters.values():
            for shard in c.shards.values():
                key = (c.spec.name, shard.id)
                assert shard.epoch >= self.epochs.get(key, 0), f"epoch of {key} went back after {cmd}"
                self.epochs[key] = shard.epoch
        for p in self.a.procedures.values():
            for i, step in enumerate(p.steps):
                if step.started:
                    seen = self.steps.setdefault((p.id, i), (step.started_ms, step.epoch))
                    assert seen == (step.started_ms, step.epoch), f"step {i} of {p.id} started twice"

    def check_limits(self, cmd: Command, result: Any, spends: dict[tuple[str, str], list[Any]]) -> None:
        # Manual operators and failovers are not limited (procedures.check_limits); the rest are.
        if (
            isinstance(cmd, Propose)
            and cmd.op.source not in ("manual", "failover")
            and not isinstance(result, Exception)
        ):
            c = self.a.clusters[cmd.cluster]
            klass = limit_class(cmd.op)
            n = sum(
                1
                for p in self.a.running(cmd.cluster)
                if limit_class(p.op) == klass and p.op.source not in ("manual", "failover")
            )
            assert n <= limit_of(c, klass), f"{n} {klass} procedures running, limit {limit_of(c, klass)}"
        for c in self.a.clusters.values():
            for node, entries in c.spend.items():
                if spends.get((c.spec.name, node)) == entries:
                    continue
                for kind, per_min in (("add", c.limits.node_adds_per_min), ("remove", c.limits.node_removes_per_min)):
                    for e in entries:
                        window = sum(
                            x.cost for x in entries if x.kind == kind and 0 <= e.time_ms - x.time_ms < MINUTE_MS
                        )
                        assert window <= per_min + 1e-9, f"{node} spent {window} {kind}s in a minute, limit {per_min}"

    # ---- helpers --------------------------------------------------------------------------------

    def a_term(self, data: st.DataObject) -> int:
        return data.draw(st.sampled_from((self.a.term, self.a.term, self.a.term, max(1, self.a.term - 1), 0)))

    def shard_of(self, data: st.DataObject, cluster: str) -> int:
        c = self.a.clusters.get(cluster)
        ids = sorted(c.shards) if c else [0]
        return data.draw(st.sampled_from([*ids, 99]) if data.draw(st.integers(0, 9)) == 0 else st.sampled_from(ids))

    def node_of(self, data: st.DataObject, cluster: str, shard: int, held: bool) -> str:
        """Mostly a node that holds (or does not hold) the shard; sometimes any."""
        c = self.a.clusters.get(cluster)
        s = c.shards.get(shard) if c else None
        if s is None or data.draw(st.integers(0, 5)) == 0:
            return data.draw(st.sampled_from(("", *NODES)))
        options = [n for n in (c.nodes if c else ()) if (s.replica(n) is not None) == held]
        return data.draw(st.sampled_from(options)) if options else ""

    # ---- rules ----------------------------------------------------------------------------------

    @rule(
        name=st.sampled_from(CLUSTERS),
        topology=st.sampled_from(("dynamic", "dynamic", "static")),
        shards=st.integers(1, 6),
        nodes=st.integers(1, 5),
        replicas=st.integers(1, 3),
        local=st.booleans(),
        leader=st.integers(0, 4),
        shard_lim=st.integers(0, 6),
        replica_lim=st.integers(0, 6),
        adds=st.sampled_from((0.0, 1.0, 2.0, 15.0)),
        removes=st.sampled_from((0.0, 1.0, 15.0)),
        cooldown=st.sampled_from((0.0, 30.0)),
    )
    def create(self, name: str, topology: Any, shards: int, nodes: int, replicas: int, local: bool, **lim: Any) -> None:
        limits = Limits(
            leader=lim["leader"],
            shard=lim["shard_lim"],
            replica=lim["replica_lim"],
            node_adds_per_min=lim["adds"],
            node_removes_per_min=lim["removes"],
            cooldown_s=lim["cooldown"],
            hot=2,
            merge=2,
            expire_s=30.0,
        )
        spec = ClusterSpec(name, topology, shards, nodes, replicas, local_data=local, max_down_time_s=60, limits=limits)
        self.do(CreateCluster(spec, self.now))

    @rule(name=st.sampled_from(("b",)))
    def drop(self, name: str) -> None:
        self.do(DropCluster(name, self.now))

    @rule(state=st.sampled_from(("down", "down", "draining", "online")), data=st.data())
    def disturb(self, state: Any, data: st.DataObject) -> None:
        """A node of cluster a goes down (lease), is drained or comes back, then the schedulers run."""
        node = data.draw(st.sampled_from(sorted(self.a.clusters["a"].nodes) or NODES))
        if state == "online":
            self.do(RegisterNode("a", NodeSpec(node), self.now))
        else:
            self.do(SetNodeState("a", node, state, "test", self.a.term if state == "down" else 0, self.now))
        self.now += data.draw(st.sampled_from((0, 1_000, 61_000)))
        self.schedule("a", data)

    @rule(cluster=st.sampled_from(CLUSTERS), node=st.sampled_from(NODES), zone=st.sampled_from(("", "z1", "z2")))
    def register(self, cluster: str, node: str, zone: str) -> None:
        self.do(RegisterNode(cluster, NodeSpec(node, labels={"zone": zone} if zone else {}), self.now))

    @rule(cluster=st.sampled_from(CLUSTERS), data=st.data())
    def place(self, cluster: str, data: st.DataObject) -> None:
        c = self.a.clusters.get(cluster)
        nodes: tuple[tuple[str, ...], ...] = placement(c) if c else ()
        if c and data.draw(st.booleans()):
            online = sorted(n for n, r in c.nodes.items() if r.state == "online")
            if online:
                k = st.integers(1, min(len(online), c.spec.max_replicas))
                nodes = tuple(tuple(data.draw(st.permutations(online))[: data.draw(k)]) for _ in range(len(c.shards)))
        self.do(Place(cluster, nodes, self.a_term(data), self.now))

    @rule(delta=st.integers(-1, 1))
    def elect(self, delta: int) -> None:
        self.do(LeaderElected(self.a.term + delta, f"r{delta}", self.now))

    @rule(
        cluster=st.sampled_from(("a", "a", "a", "b")),
        kind=st.sampled_from(("transfer_leader", "add_replica", "remove_replica", "move", "split", "merge", "scatter")),
        source=st.sampled_from(("manual", "manual", "repair", "balance-shard", "failover", "hot")),
        data=st.data(),
    )
    def propose(self, cluster: str, kind: Any, source: Any, data: st.DataObject) -> None:
        shards = (self.shard_of(data, cluster),)
        node_from = self.node_of(data, cluster, shards[0], True)
        node_to = self.node_of(data, cluster, shards[0], kind not in {"add_replica", "move"})
        if kind == "merge":
            shards = (shards[0], shards[0] + data.draw(st.sampled_from((1, 2))))
        targets = tuple(data.draw(st.permutations(NODES))[: data.draw(st.integers(0, 3))]) if kind == "scatter" else ()
        op = Operator(kind, shards, source, node_from, node_to, targets=targets)
        term = self.a_term(data) if source != "manual" or data.draw(st.booleans()) else 0
        self.do(Propose(cluster, op, term, self.now))

    @rule(cluster=st.sampled_from(("a", "a", "a", "b")), data=st.data())
    def schedule(self, cluster: str, data: st.DataObject) -> None:
        c = self.a.clusters.get(cluster)
        if c is None:
            return
        for op in operators(c, self.a.running(cluster), self.now):
            self.do(Propose(cluster, op, self.a_term(data), self.now))

    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        running = self.a.running()
        if not running:
            return
        proc = data.draw(st.sampled_from(running))
        for report in acks_for(self.a, proc, self.now):
            if data.draw(st.integers(0, 4)):
                self.do(report)

    @rule(cluster=st.sampled_from(CLUSTERS), node=st.sampled_from(NODES), data=st.data())
    def report(self, cluster: str, node: str, data: st.DataObject) -> None:
        shard = self.shard_of(data, cluster)
        epoch = data.draw(st.integers(0, 6))
        self.do(Report(cluster, node, shard, epoch, data.draw(st.sampled_from(("opened", "closed"))), self.now))

    @rule(data=st.data())
    def settle(self, data: st.DataObject) -> None:
        """The leader's loop: every running procedure acknowledged (mostly) and advanced."""
        for proc in self.a.running():
            for report in acks_for(self.a, proc, self.now):
                if data.draw(st.integers(0, 9)):
                    self.do(report)
            self.do(Advance(proc.id, proc.at, self.a.term, self.now))

    @rule(data=st.data(), rounds=st.integers(1, 4))
    def rounds(self, data: st.DataObject, rounds: int) -> None:
        """A few leader rounds on cluster a: the schedulers, then acknowledgements and advances."""
        for _ in range(rounds):
            self.schedule("a", data)
            self.settle(data)
            self.now += data.draw(st.sampled_from((0, 1_000, 30_000)))

    @rule(data=st.data())
    def advance(self, data: st.DataObject) -> None:
        procs = sorted(self.a.procedures)
        if not procs:
            self.do(Advance(7, 0, self.a.term, self.now))
            return
        proc = self.a.procedures[data.draw(st.sampled_from(procs))]
        at = data.draw(st.sampled_from((proc.at, proc.at, proc.at - 1, -1)))
        cmd = Advance(proc.id, at, self.a_term(data), self.now)
        done = [s.done_ms for s in proc.steps]
        result = self.do(cmd)
        if not isinstance(result, Exception) and done != [s.done_ms for s in proc.steps]:
            again = self.do(cmd)  # the step's change happens once: the same Advance again is refused
            assert isinstance(again, Exception), f"a duplicate {cmd} was applied: {again}"

    @rule(data=st.data())
    def expire(self, data: st.DataObject) -> None:
        running = self.a.running()
        if running:
            proc = data.draw(st.sampled_from(running))
            self.do(Expire(proc.id, proc.at, self.a_term(data), self.now))

    @rule(data=st.data())
    def cancel(self, data: st.DataObject) -> None:
        procs = sorted(self.a.procedures) or [3]
        self.do(Cancel(data.draw(st.sampled_from(procs)), "test", self.now))

    @rule(
        cluster=st.sampled_from(CLUSTERS),
        node=st.sampled_from(NODES),
        state=st.sampled_from(("online", "suspect", "down", "down", "draining", "removed")),
        data=st.data(),
    )
    def node_state(self, cluster: str, node: str, state: Any, data: st.DataObject) -> None:
        term = self.a_term(data) if state in ("online", "suspect", "down") and data.draw(st.booleans()) else 0
        self.do(SetNodeState(cluster, node, state, "test", term, self.now))

    @rule(cluster=st.sampled_from(CLUSTERS), data=st.data())
    def load(self, cluster: str, data: st.DataObject) -> None:
        c = self.a.clusters.get(cluster)
        ids = sorted(c.shards) if c else [0]
        sizes = {s: data.draw(st.sampled_from((0, 1 << 20, 1 << 30))) for s in ids}
        load = {s: data.draw(st.sampled_from((0.0, 1.0, 50.0))) for s in ids}
        self.do(RecordLoad(cluster, sizes, load, self.a_term(data), self.now))

    @rule(cluster=st.sampled_from(CLUSTERS), table=st.sampled_from(("t1", "t2", "t3", "bad name")), drop=st.booleans())
    def table(self, cluster: str, table: str, drop: bool) -> None:
        self.do(DropTable(cluster, table, self.now) if drop else CreateTable(cluster, table, self.now))

    @rule(
        cluster=st.sampled_from(CLUSTERS),
        paused=st.sampled_from((None, True, False)),
        frozen=st.sampled_from((None, False, False, True)),
        leader=st.sampled_from((None, 0, 1, 4, -1)),
        affinity=st.sampled_from((None, {}, {"0": {"zone": "z1"}}, {"x": {"a": "b"}})),
    )
    def update(self, cluster: str, paused: Any, frozen: Any, leader: Any, affinity: Any) -> None:
        limits = None if leader is None else Limits(leader=leader, shard=3, replica=3, cooldown_s=0, expire_s=30.0)
        u = ClusterUpdate(paused=paused, frozen=frozen, limits=limits, affinity=affinity)
        self.do(UpdateCluster(cluster, u, self.now))

    @rule(ms=st.sampled_from((0, 500, 5_000, 20_000, 61_000, 400_000)))
    def tick(self, ms: int) -> None:
        self.now += ms


TestSchedulerVsModel = SchedulerVsModel.TestCase
TestSchedulerVsModel.settings = settings(
    max_examples=150, stateful_step_count=80, deadline=None, suppress_health_check=list(HealthCheck)
)


# ---- each error, and that it changed nothing ---------------------------------------------------------------


def _state(topology: str = "dynamic", nodes: int = 3, **spec: Any) -> SchedulerState:
    s = SchedulerState()
    s.apply(LeaderElected(1, "r1"))
    assert s.apply(CreateCluster(ClusterSpec("c", topology, node_count=nodes, shard_count=4, **spec)))[0] == "c"  # type: ignore[arg-type]
    for i in range(nodes):
        s.apply(RegisterNode("c", NodeSpec(f"n{i}")))
    result, _ = s.apply(Place("c", placement(s.clusters["c"]), 1))
    assert result == 4
    return s


def refused(s: SchedulerState, cmd: Command, klass: type[Exception], text: str) -> Exception:
    before = snapshot(s)
    result, events = s.apply(cmd)
    assert isinstance(result, klass), result
    assert text in str(result), str(result)
    assert events == []
    assert snapshot(s) == before
    return result


def test_unknown_cluster_shard_node_procedure() -> None:
    s = _state()
    refused(s, RegisterNode("x", NodeSpec("n9")), NoSuchCluster, "no cluster named 'x'")
    refused(s, Propose("c", Operator("split", (9,))), NoSuchShard, "has no shard 9")
    refused(s, Propose("c", Operator("add_replica", (0,), node_to="n9")), NoSuchDataNode, "no node 'n9'")
    refused(s, SetNodeState("c", "n9", "draining"), NoSuchDataNode, "no node 'n9'")
    refused(s, Advance(42, 0, 1), NoSuchProcedure, "no procedure 42")
    refused(s, Cancel(42), NoSuchProcedure, "no procedure 42")
    refused(s, DropTable("c", "t9"), SchedulerError, "no table 't9'")


def test_move_to_a_down_node_refused() -> None:
    s = _state(nodes=4)
    assert s.apply(SetNodeState("c", "n3", "down", "lease", 1))[0] == "down"
    refused(s, Propose("c", Operator("move", (0,), node_from="n0", node_to="n3")), Refused, "n3 is down")
    refused(s, Propose("c", Operator("add_replica", (0,), node_to="n3"), 1), Refused, "n3 is down")


def test_static_cluster_does_not_grow() -> None:
    s = _state("static")
    refused(s, RegisterNode("c", NodeSpec("n9")), Refused, "static topology of 3 nodes")
    refused(s, Propose("c", Operator("add_replica", (0,), node_to="n1")), Refused, "static topology")
    refused(s, Propose("c", Operator("move", (0,), node_from="n0", node_to="n1")), Refused, "static topology")
    refused(s, Propose("c", Operator("split", (0,))), Refused, "static topology")
    assert s.apply(RegisterNode("c", NodeSpec("n1", address="x")))[0] == "n1"  # an existing node comes back


def test_dynamic_local_data_and_limits_out_of_range() -> None:
    s = _state()
    refused(s, CreateCluster(ClusterSpec("d", local_data=True)), BadSchedulerRequest, "refused for local data")
    assert not isinstance(s.apply(CreateCluster(ClusterSpec("d", "static", local_data=True)))[0], Exception)
    refused(s, CreateCluster(ClusterSpec("e", limits=Limits(leader=-1))), BadSchedulerRequest, "limits.leader")
    refused(s, CreateCluster(ClusterSpec("e", limits=Limits(small_shard_cost=2))), BadSchedulerRequest, "cost")
    refused(s, CreateCluster(ClusterSpec("e", max_replicas=8)), BadSchedulerRequest, "max_replicas must be")
    refused(s, CreateCluster(ClusterSpec("e", "static", node_count=2)), BadSchedulerRequest, "more than node_count")
    refused(s, CreateCluster(ClusterSpec("bad name")), BadSchedulerRequest, "cluster 'bad name'")
    refused(s, CreateCluster(ClusterSpec("c")), AlreadyExists, "exists")
    bad = UpdateCluster("c", ClusterUpdate(limits=Limits(node_adds_per_min=-1)))
    refused(s, bad, BadSchedulerRequest, "node_adds_per_min")
    refused(s, UpdateCluster("c", ClusterUpdate(affinity={"7": {"zone": "z"}})), BadSchedulerRequest, "shard 7")


def test_stale_terms_and_busy_shards() -> None:
    s = _state()
    refused(s, LeaderElected(1, "r2"), StaleTerm, "not newer")
    refused(s, Propose("c", Operator("transfer_leader", (0,), "failover", node_to="n1"), 2), StaleTerm, "term 2")
    refused(s, RecordLoad("c", {}, {}, 0 + 2), StaleTerm, "term 2")
    refused(s, SetNodeState("c", "n1", "down", "", 5), StaleTerm, "term 5")
    refused(s, Propose("c", Operator("move", (0,), "repair", node_from="n0", node_to="n1")), BadSchedulerRequest, "")
    proc, _ = s.apply(Propose("c", Operator("transfer_leader", (0,), node_to="n1")))
    assert isinstance(proc, int)
    refused(s, Propose("c", Operator("transfer_leader", (0,), node_to="n2")), Refused, "held by procedure")
    refused(s, Advance(proc, 3, 1), StepNotReady, "at step -1")
    refused(s, Expire(proc, -1, 1), StepNotReady, "created 0 ms ago")
    assert s.apply(Advance(proc, -1, 1))[0] == "started"
    refused(s, Advance(proc, 0, 1), StepNotReady, "not acknowledged")
    refused(s, Advance(proc, -1, 1), StepNotReady, "")  # a retried start is not a completion
    assert s.apply(Report("c", "n1", 0, s.clusters["c"].shards[0].epoch))[0] >= 1
    assert s.apply(Advance(proc, 0, 1))[0] == "success"
    refused(s, Advance(proc, 0, 1), Refused, "already ended")
    refused(s, Cancel(proc), Refused, "already ended")


def test_remove_last_replica_refused() -> None:
    s = _state(max_replicas=1)
    refused(s, Propose("c", Operator("remove_replica", (0,), node_from="n0")), Refused, "one replica")


def test_limits_counted_per_class() -> None:
    s = _state(nodes=4, limits=Limits(leader=1, cooldown_s=0))
    c = s.clusters["c"]
    ops = [
        Operator("transfer_leader", (sid,), "balance-leader", node_to=c.shards[sid].replicas[1].node) for sid in (0, 1)
    ]
    assert isinstance(s.apply(Propose("c", ops[0], 1))[0], int)
    refused(s, Propose("c", ops[1], 1), SchedulerError, "its limit is reached")
    assert Counter(limit_class(p.op) for p in s.running()) == {"leader": 1, "placement": 1}


@pytest.mark.parametrize("state", ["draining", "removed"])
def test_operator_states(state: str) -> None:
    s = _state()
    assert s.apply(SetNodeState("c", "n0", state))[0] == state  # type: ignore[arg-type]
    refused(s, SetNodeState("c", "n0", "online", "", 1), Refused, "an operator put it there")
    refused(s, SetNodeState("c", "n0", "suspect"), BadSchedulerRequest, "an operator sets")


def test_a_drain_outlives_a_down_spell_and_undrain_ends_it() -> None:
    s = _state(nodes=4)
    assert s.apply(SetNodeState("c", "n0", "draining", time_ms=1))[0] == "draining"
    assert s.apply(SetNodeState("c", "n0", "down", term=1, time_ms=2))[0] == "down"
    assert s.apply(SetNodeState("c", "n0", "online", term=1, time_ms=3))[0] == "draining"
    assert s.apply(SetNodeState("c", "n0", "down", term=1, time_ms=4))[0] == "down"
    assert s.apply(RegisterNode("c", NodeSpec("n0"), 5))[0] == "n0"
    assert s.clusters["c"].nodes["n0"].state == "draining"
    assert s.apply(SetNodeState("c", "n0", "online", time_ms=6))[0] == "online"
    assert not s.clusters["c"].nodes["n0"].draining


def test_dropping_an_unknown_table_names_it() -> None:
    s = _state()
    refused(s, DropTable("c", "ghost"), NoSuchTable, "no table 'ghost'")


def test_every_history_entry_carries_its_trace_id() -> None:
    s = _state(nodes=4, limits=Limits(cooldown_s=0))
    c = s.clusters["c"]
    to = next(n for n in c.nodes if c.shards[0].replica(n) is None)
    proc = s.apply(Propose("c", Operator("add_replica", (0,), node_to=to), 0, 1, "a" * 32))[0]
    assert isinstance(proc, int)
    s.apply(Advance(proc, -1, 1, 2, "b" * 32))
    s.apply(Cancel(proc, "enough", 3, "c" * 32))
    assert [h.trace_id for h in s.procedures[proc].history] == ["a" * 32, "b" * 32, "c" * 32]
