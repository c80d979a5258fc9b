"""Recovery planning (pure): the steps for a dead primary, and every rule that blocks a recovery."""

from __future__ import annotations

from app.adaptors.types import Address, InstanceStatus, ReplicationLink
from app.services.ha.analysis import Analysis
from app.services.ha.recovery import Blocked, ClusterPolicy, RecoveryPlan, Step, plan_recovery

P, R1, R2 = Address("10.0.0.1", 5432), Address("10.0.0.2", 5432), Address("10.0.0.3", 5432)
DEAD = Analysis("DeadPrimary", P, "unreachable and all 2 reachable replicas lost it")


def standby(address: Address, lsn: str, reachable: bool = True) -> InstanceStatus:
    if not reachable:
        return InstanceStatus(address, "postgresql", False, 0.0, error="connection refused")
    link = ReplicationLink(P, False, True, "", None, lsn, lsn)
    return InstanceStatus(
        address, "postgresql", True, 0.0, role="replica", read_only=True, position=lsn, replication=link
    )


PROBES = {
    P: InstanceStatus(P, "postgresql", False, 0.0, error="connection refused"),
    R1: standby(R1, "0/3000100"),
    R2: standby(R2, "0/3000200"),
}


def test_the_plan_waits_promotes_the_most_advanced_repoints_publishes_and_fences() -> None:
    plan = plan_recovery("pg", DEAD, PROBES, ClusterPolicy(), now=100.0, last_recovery_at=None)
    assert isinstance(plan, RecoveryPlan)
    assert plan.candidate == R2
    assert plan.complete
    assert plan.steps == (
        Step("wait_applied", R1),
        Step("wait_applied", R2),
        Step("promote", R2),
        Step("repoint", R1, R2),
        Step("publish_primary", R2),
        Step("fence_old_primary", P, R2),
    )
    again = plan_recovery("pg", DEAD, PROBES, ClusterPolicy(), 100.0, None, applied={R1, R2})
    assert isinstance(again, RecoveryPlan)
    assert [s.kind for s in again.steps] == ["promote", "repoint", "publish_primary", "fence_old_primary"]


def test_anti_flapping_downtime_and_auto_recover_block() -> None:
    policy = ClusterPolicy(block_seconds=3600.0)
    blocked = plan_recovery("pg", DEAD, PROBES, policy, now=1000.0, last_recovery_at=100.0)
    assert isinstance(blocked, Blocked)
    assert "anti-flapping" in blocked.reason
    assert isinstance(plan_recovery("pg", DEAD, PROBES, policy, now=3701.0, last_recovery_at=100.0), RecoveryPlan)
    down = plan_recovery("pg", DEAD, PROBES, ClusterPolicy(downtime=frozenset({P})), 100.0, None)
    assert isinstance(down, Blocked)
    assert "downtime" in down.reason
    manual = plan_recovery("pg", DEAD, PROBES, ClusterPolicy(auto_recover=False), 100.0, None)
    assert isinstance(manual, Blocked)


def test_only_a_dead_primary_is_recovered() -> None:
    unreachable = Analysis("UnreachablePrimary", P, "one replica still receives")
    blocked = plan_recovery("pg", unreachable, PROBES, ClusterPolicy(), 100.0, None)
    assert isinstance(blocked, Blocked)
    assert "UnreachablePrimary" in blocked.reason


def test_no_promotion_of_a_replica_missing_an_acknowledged_transaction() -> None:
    must_not = ClusterPolicy(rules={R2: "must_not"})
    blocked = plan_recovery("pg", DEAD, PROBES, must_not, 100.0, None)
    assert isinstance(blocked, Blocked)
    assert str(R2) in blocked.reason
    lossy = plan_recovery(
        "pg", DEAD, PROBES, ClusterPolicy(rules={R2: "must_not"}, require_complete=False), 100.0, None
    )
    assert isinstance(lossy, RecoveryPlan)
    assert lossy.candidate == R1
    assert not lossy.complete


def test_unreachable_survivors_are_left_out() -> None:
    probes = {**PROBES, R2: standby(R2, "", reachable=False)}
    plan = plan_recovery("pg", DEAD, probes, ClusterPolicy(), 100.0, None, applied={R1})
    assert isinstance(plan, RecoveryPlan)
    assert plan.candidate == R1
    assert [s.instance for s in plan.steps if s.kind == "repoint"] == []
