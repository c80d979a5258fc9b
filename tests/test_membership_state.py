"""The pure membership state machine, alone: worked examples and random event sequences against a small model."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from app.services.membership.state import (
    Heartbeat,
    Membership,
    NodeRecord,
    Remove,
    SetMaintenance,
    Tick,
    Timings,
    Transition,
    UnknownNode,
)

T = Timings(heartbeat_interval=1.0, suspect_after=3, down_after=10.0)  # suspect after 3 s, down after 10 s


def states(m: Membership) -> dict[str, str]:
    return {k: r.state for k, r in m.nodes.items()}


def test_a_node_goes_online_suspect_down_and_back() -> None:
    m = Membership(T)
    [reg] = m.apply(Heartbeat("db1", 100.0))
    assert (reg.old, reg.new, reg.reason) == (None, "online", "registered")
    assert m.apply(Tick(102.9)) == []
    [sus] = m.apply(Tick(103.0))
    assert (sus.old, sus.new) == ("online", "suspect")
    assert sus.reason == "no heartbeat for 3.0s"
    assert m.apply(Tick(109.0)) == []
    [down] = m.apply(Tick(110.0))
    assert (down.old, down.new, down.at) == ("suspect", "down", 110.0)
    assert m.apply(Tick(500.0)) == []  # down stays down, silently
    [back] = m.apply(Heartbeat("db1", 501.0))
    assert (back.old, back.new, back.reason) == ("down", "online", "heartbeats resumed")
    assert m.nodes["db1"].since == 501.0
    assert m.nodes["db1"].last_seen == 501.0


def test_heartbeats_keep_a_node_online_without_transitions() -> None:
    m = Membership(T)
    m.apply(Heartbeat("db1", 0.0))
    for t in range(1, 50):
        assert m.apply(Heartbeat("db1", float(t))) == []
        assert m.apply(Tick(t + 0.5)) == []
    assert m.nodes["db1"].state == "online"
    assert m.nodes["db1"].since == 0.0


def test_a_late_tick_goes_straight_to_down() -> None:
    m = Membership(T)
    m.apply(Heartbeat("db1", 0.0))
    [change] = m.apply(Tick(60.0))
    assert (change.old, change.new) == ("online", "down")


def test_maintenance_suppresses_alarms_but_records_last_seen() -> None:
    m = Membership(T)
    m.apply(Heartbeat("db1", 0.0))
    [on] = m.apply(SetMaintenance("db1", True, 1.0, "kernel upgrade"))
    assert (on.old, on.new, on.reason) == ("online", "maintenance", "kernel upgrade")
    assert m.apply(Tick(100.0)) == []
    assert m.apply(Heartbeat("db1", 101.0)) == []
    assert m.nodes["db1"].state == "maintenance"
    assert m.nodes["db1"].last_seen == 101.0
    assert m.apply(SetMaintenance("db1", True, 102.0)) == []  # already in maintenance
    [off] = m.apply(SetMaintenance("db1", False, 102.0))
    assert (off.old, off.new) == ("maintenance", "online")  # heard 1 s ago
    m.apply(SetMaintenance("db1", True, 103.0))
    [off] = m.apply(SetMaintenance("db1", False, 200.0))
    assert off.new == "down"  # silent for 99 s: judged at once
    assert m.apply(SetMaintenance("db1", False, 201.0)) == []  # not in maintenance: nothing to do


def test_removed_nodes_are_forgotten_and_a_heartbeat_registers_them_again() -> None:
    m = Membership(T)
    m.apply(Heartbeat("db1", 0.0))
    [gone] = m.apply(Remove("db1", 1.0, "decommissioned"))
    assert (gone.old, gone.new, gone.record) == ("online", "removed", None)
    assert "db1" not in m.nodes
    assert m.apply(Tick(100.0)) == []
    [again] = m.apply(Heartbeat("db1", 101.0))
    assert (again.old, again.new, again.reason) == (None, "online", "registered")


def test_operator_events_on_an_unknown_node_raise() -> None:
    m = Membership(T)
    with pytest.raises(UnknownNode):
        m.apply(SetMaintenance("nope", True, 0.0))
    with pytest.raises(UnknownNode):
        m.apply(Remove("nope", 0.0))
    assert m.nodes == {}


def test_a_new_leader_gives_every_node_a_grace_period() -> None:
    m = Membership(T)
    records = [
        NodeRecord("a", "online", 0.0, 5.0),  # last heard long before the take-over
        NodeRecord("b", "suspect", 0.0, 5.0),
        NodeRecord("c", "down", 0.0, 5.0),
        NodeRecord("d", "maintenance", 0.0, 5.0),
    ]
    m.restore(records, at=1000.0)
    assert m.apply(Tick(1002.9)) == []
    changes = m.apply(Tick(1003.0))
    assert [(c.node_id, c.new) for c in changes] == [("a", "suspect")]
    changes = m.apply(Tick(1010.0))
    assert sorted((c.node_id, c.new) for c in changes) == [("a", "down"), ("b", "down")]
    assert states(m) == {"a": "down", "b": "down", "c": "down", "d": "maintenance"}


def test_adopt_keeps_the_newest_last_seen_and_the_grace() -> None:
    m = Membership(T)
    m.restore([NodeRecord("a", "online", 0.0, 5.0)], at=1000.0)
    m.apply(Heartbeat("a", 1001.0))
    m.adopt(NodeRecord("a", "maintenance", 1001.5, 900.0, "by hand"))
    rec = m.nodes["a"]
    assert (rec.state, rec.last_seen, rec.watch_from, rec.reason) == ("maintenance", 1001.0, 1000.0, "by hand")
    m.forget("a")
    assert m.nodes == {}


def test_suspect_window_longer_than_down_goes_straight_to_down() -> None:
    m = Membership(Timings(heartbeat_interval=5.0, suspect_after=10, down_after=20.0))
    m.apply(Heartbeat("x", 0.0))
    assert m.apply(Tick(19.0)) == []
    [c] = m.apply(Tick(20.0))
    assert (c.old, c.new) == ("online", "down")


# ---- random sequences against a model --------------------------------------------------------------

NODES = st.sampled_from(["n1", "n2", "n3"])


class MembershipVsModel(RuleBasedStateMachine):
    """The model is what the rules say, computed from scratch: for a node not in maintenance,
    after a tick at t its state is judge(t - max(last heartbeat, grace start)); after a heartbeat
    it is online; maintenance holds until cleared; removed nodes are gone."""

    def __init__(self) -> None:
        super().__init__()
        self.timings = Timings(heartbeat_interval=1.0, suspect_after=2, down_after=5.0)
        self.m = Membership(self.timings)
        self.now = 0.0
        self.last: dict[str, float] = {}  # model: newest heartbeat per known node
        self.grace: dict[str, float] = {}
        self.maint: set[str] = set()
        self.expected: dict[str, str] = {}
        self.before: dict[str, str] = {}

    def _check(self, changes: list[Transition]) -> None:
        after = states(self.m)
        seen = set()
        for c in changes:
            assert c.node_id not in seen, "one transition per node per event"
            seen.add(c.node_id)
            assert c.old == self.before.get(c.node_id)
            assert c.new == (after.get(c.node_id, "removed"))
            assert c.old != c.new
            assert c.at == self.now
        for node_id in set(self.before) | set(after):
            if node_id not in seen:
                assert self.before.get(node_id) == after.get(node_id), f"{node_id} changed without a transition"
        assert after == self.expected

    def _apply(self, event: Heartbeat | Tick | SetMaintenance | Remove) -> None:
        self.before = states(self.m)
        self._check(self.m.apply(event))

    @rule(dt=st.sampled_from([0.0, 0.5, 1.0, 2.0, 3.0]) | st.floats(min_value=0, max_value=4, allow_nan=False))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(node=NODES)
    def heartbeat(self, node: str) -> None:
        self.last[node] = self.now
        self.grace.setdefault(node, 0.0)
        if node not in self.maint:
            self.expected[node] = "online"
        self._apply(Heartbeat(node, self.now))

    def _judged(self, node: str) -> str:
        silence = self.now - max(self.last[node], self.grace[node])
        # The model's own reading of the rules (2 missed 1 s heartbeats: suspect; 5 s: down).
        return "down" if silence >= 5.0 else "suspect" if silence >= 2.0 else "online"

    @rule()
    def tick(self) -> None:
        for node in self.expected:
            if node not in self.maint and self.expected[node] != "down":
                judged = self._judged(node)
                if judged != "online":
                    self.expected[node] = judged
        self._apply(Tick(self.now))

    @precondition(lambda self: bool(self.expected))
    @rule(data=st.data(), on=st.booleans())
    def maintenance(self, data: st.DataObject, on: bool) -> None:
        node = data.draw(st.sampled_from(sorted(self.expected)))
        if on:
            self.maint.add(node)
            self.expected[node] = "maintenance"
        elif node in self.maint:
            self.maint.discard(node)
            self.expected[node] = self._judged(node)
        self._apply(SetMaintenance(node, on, self.now))

    @precondition(lambda self: bool(self.expected))
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        node = data.draw(st.sampled_from(sorted(self.expected)))
        for table in (self.last, self.grace, self.expected):
            table.pop(node, None)
        self.maint.discard(node)
        self._apply(Remove(node, self.now))

    @rule()
    def take_over(self) -> None:
        """A new leader restores the same records: every node gets a grace period from now."""
        self.m.restore(list(self.m.nodes.values()), self.now)
        for node in self.grace:
            self.grace[node] = self.now
        assert states(self.m) == self.expected

    @rule(node=NODES)
    def unknown_operator_event_changes_nothing(self, node: str) -> None:
        if node in self.expected:
            return
        before = dict(self.m.nodes)
        with pytest.raises(UnknownNode):
            self.m.apply(SetMaintenance(node, True, self.now))
        assert self.m.nodes == before

    @invariant()
    def last_seen_is_the_newest_heartbeat(self) -> None:
        for node, record in self.m.nodes.items():
            assert record.last_seen == self.last[node]
            assert record.since <= self.now


TestMembershipVsModel = MembershipVsModel.TestCase
TestMembershipVsModel.settings = settings(
    max_examples=300, stateful_step_count=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


def test_forgettable_nodes_are_silent_and_unrecorded() -> None:
    from app.services.membership.heard import Heard, forgettable

    heard = {
        "gone": Heard(10.0, "agent", {}, 1),  # silent, record removed: forgotten
        "down": Heard(10.0, "agent", {}, 1),  # silent but still recorded (down): kept
        "fresh": Heard(500.0, "agent", {}, 1),  # heard after the cutoff: kept
    }
    assert forgettable(heard, 100.0, lambda n: n == "down") == ["gone"]
