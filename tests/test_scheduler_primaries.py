"""HA primaries as a scheduling domain: the planner property-tested, then balancing on real MariaDB clusters.

The planner (plan_primaries) is pure: from any placement it converges to primaries within one of
each other per host (and per zone) when the clusters allow it, never moves a blocked cluster
(anti-flapping block, findings, cooldown, busy), and once balanced emits nothing.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.services.scheduler.primaries import PrimaryCluster, PrimaryPlan, host_of, plan_primaries

NOW = 1_000_000.0
COOLDOWN = 600.0
BLOCK = 3600.0


def _cluster(name: str, primary_host: str, hosts: list[str], port: int = 3306, **kw: object) -> PrimaryCluster:
    instances = tuple(f"{h}:{port}" for h in hosts)
    primary = f"{primary_host}:{port}"
    replicas = tuple(a for a in instances if a != primary)
    return PrimaryCluster(name, primary, instances, replicas, **kw)  # type: ignore[arg-type]


def _apply(clusters: list[PrimaryCluster], plan: PrimaryPlan) -> list[PrimaryCluster]:
    """The switchover done: the target is the primary, every other instance a healthy replica."""
    move = plan.move
    assert move is not None
    out = []
    for c in clusters:
        if c.name == move.cluster:
            assert move.source == c.primary
            assert move.target in c.replicas
            replicas = tuple(a for a in c.instances if a != move.target)
            out.append(msgspec.structs.replace(c, primary=move.target, replicas=replicas))
        else:
            out.append(c)
    return out


def _potential(clusters: list[PrimaryCluster], zones: Mapping[str, str]) -> tuple[int, int]:
    hosts: dict[str, int] = {}
    for c in clusters:
        for a in (*c.instances, c.primary):
            hosts.setdefault(host_of(a), 0)
    for c in clusters:
        hosts[host_of(c.primary)] += 1
    per_zone: dict[str, int] = {}
    for h, n in hosts.items():
        per_zone[zones.get(h, h)] = per_zone.get(zones.get(h, h), 0) + n
    return sum(n * n for n in per_zone.values()), sum(n * n for n in hosts.values())


def _settle(
    clusters: list[PrimaryCluster], zones: Mapping[str, str] | None = None, limit: int = 200
) -> tuple[list[PrimaryCluster], int, PrimaryPlan]:
    """Plan and apply until no move (cooldown 0 so a cluster may move again); (clusters, moves, last plan)."""
    moves = 0
    potential = _potential(clusters, zones or {})
    while True:
        plan = plan_primaries(clusters, NOW, 0.0, BLOCK, zones)
        if plan.move is None:
            return clusters, moves, plan
        blocked = {c.name for c in clusters if c.busy or c.findings or c.last_recovery_at is not None}
        assert plan.move.cluster not in blocked, plan
        clusters = _apply(clusters, plan)
        moves += 1
        after = _potential(clusters, zones or {})
        assert after < potential, "every move lowers the potential: no oscillation"
        potential = after
        assert moves <= limit


HOSTS = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]


def test_all_primaries_on_one_host_end_one_per_host_in_two_moves() -> None:
    clusters = [_cluster(f"c{i}", HOSTS[0], HOSTS, 3306 + i) for i in range(3)]
    first = plan_primaries(clusters, NOW, COOLDOWN, BLOCK)
    assert first.hosts == {HOSTS[0]: 3, HOSTS[1]: 0, HOSTS[2]: 0}
    assert first.host_spread == 3
    assert first.move is not None
    assert host_of(first.move.source) == HOSTS[0]
    assert "127.0.0.11 3 primaries" in first.move.reason
    done, moves, last = _settle(clusters)
    assert moves == 2
    assert sorted(host_of(c.primary) for c in done) == HOSTS
    assert last.move is None
    assert last.why.startswith("balanced")


def test_a_balanced_fleet_gets_no_move() -> None:
    clusters = [_cluster(f"c{i}", HOSTS[i], HOSTS, 3306 + i) for i in range(3)]
    plan = plan_primaries(clusters, NOW, COOLDOWN, BLOCK)
    assert plan.move is None
    assert plan.host_spread == 0
    # Within one of each other is balanced too: 4 clusters on 3 hosts.
    clusters.append(_cluster("c3", HOSTS[0], HOSTS, 3310))
    plan = plan_primaries(clusters, NOW, COOLDOWN, BLOCK)
    assert plan.move is None
    assert plan.host_spread == 1


def test_a_cluster_inside_its_anti_flapping_block_is_never_moved() -> None:
    recent = NOW - BLOCK + 60  # a recovery 59 minutes ago: one minute of the block left
    clusters = [
        _cluster("a", HOSTS[0], HOSTS, 3306, last_recovery_at=recent),
        _cluster("b", HOSTS[0], HOSTS, 3307),
        _cluster("c", HOSTS[0], HOSTS, 3308),
    ]
    plan = plan_primaries(clusters, NOW, COOLDOWN, BLOCK)
    assert plan.move is not None
    assert plan.move.cluster != "a"
    assert plan.blocked["a"].startswith("anti-flapping")
    done, moves, _ = _settle(clusters)
    assert moves == 2
    assert done[0].primary == clusters[0].primary, "the blocked cluster kept its primary"
    # Only the blocked clusters could improve it (c would only swap counts): nothing happens until
    # the block is over; b's cooldown outlasts it.
    b = _cluster("b", HOSTS[0], HOSTS, 3307, last_change_at=NOW - 10)
    alone = [clusters[0], b, _cluster("c", HOSTS[1], HOSTS, 3308)]
    assert plan_primaries(alone, NOW, COOLDOWN, BLOCK).move is None
    later = plan_primaries(alone, NOW + 61, COOLDOWN, BLOCK)
    assert later.move is not None
    assert later.move.cluster == "a"
    assert host_of(later.move.target) == HOSTS[2]


def test_findings_cooldown_busy_and_no_primary_block_a_cluster() -> None:
    cases: dict[str, dict[str, object]] = {
        "findings: LaggingReplica": {"findings": ("LaggingReplica 127.0.0.12:3306",)},
        "cooldown: primary changed 599 s ago": {"last_change_at": NOW - COOLDOWN + 1},
        "not analysed": {"busy": "not analysed by this leader yet"},
    }
    for why, kw in cases.items():
        clusters = [_cluster("x", HOSTS[0], HOSTS, 3306, **kw), _cluster("y", HOSTS[0], HOSTS, 3307)]
        plan = plan_primaries(clusters, NOW, COOLDOWN, BLOCK)
        assert plan.move is not None
        assert plan.move.cluster == "y", why
        assert why in plan.blocked["x"], plan.blocked
    past = [_cluster("x", HOSTS[0], HOSTS, 3306, last_change_at=NOW - COOLDOWN - 1)]
    past.append(_cluster("y", HOSTS[0], HOSTS, 3307, last_recovery_at=NOW - BLOCK - 1))
    assert plan_primaries(past, NOW, COOLDOWN, BLOCK).move is not None
    none = [msgspec.structs.replace(_cluster("x", HOSTS[0], HOSTS), primary="")]
    plan = plan_primaries(none, NOW, COOLDOWN, BLOCK)
    assert plan.move is None
    assert plan.blocked == {"x": "no recorded primary"}


def test_only_healthy_replicas_are_targets_and_prefer_wins_ties() -> None:
    # Two clusters on host .11; c0's only replica elsewhere is unhealthy (left out of replicas).
    c0 = msgspec.structs.replace(_cluster("c0", HOSTS[0], HOSTS[:2], 3306), replicas=())
    c1 = _cluster("c1", HOSTS[0], HOSTS, 3307, prefer=("127.0.0.13:3307",))
    plan = plan_primaries([c0, c1], NOW, COOLDOWN, BLOCK)
    assert plan.move is not None
    assert plan.move.cluster == "c1"
    assert plan.move.target == "127.0.0.13:3307", "both hosts have 0: the prefer rule decides"


def test_zones_before_hosts() -> None:
    zones = {"10.0.0.1": "z1", "10.0.0.2": "z1", "10.0.0.3": "z2"}
    hosts = list(zones)
    clusters = [_cluster(f"c{i}", "10.0.0.1", hosts, 3306 + i) for i in range(2)]
    plan = plan_primaries(clusters, NOW, COOLDOWN, BLOCK, zones)
    assert plan.move is not None
    assert host_of(plan.move.target) == "10.0.0.3", "another zone first, though 10.0.0.2 has none either"
    _, moves, last = _settle(clusters, zones)
    assert moves == 1
    assert last.zones == {"z1": 1, "z2": 1}


@st.composite
def fleets(draw: st.DrawFn) -> tuple[list[PrimaryCluster], dict[str, str]]:
    n_hosts = draw(st.integers(1, 6))
    hosts = [f"10.0.0.{i + 1}" for i in range(n_hosts)]
    zones = {h: f"z{draw(st.integers(0, 2))}" for h in hosts} if draw(st.booleans()) else {}
    clusters = []
    for i in range(draw(st.integers(1, 12))):
        spans = draw(st.lists(st.sampled_from(hosts), min_size=1, max_size=n_hosts, unique=True))
        primary = draw(st.sampled_from(spans))
        kw: dict[str, object] = {}
        blocked = draw(st.sampled_from(["", "", "", "flap", "finding", "busy"]))
        if blocked == "flap":
            kw["last_recovery_at"] = NOW - draw(st.floats(0, BLOCK - 1))
        elif blocked == "finding":
            kw["findings"] = ("ReplicationStopped x",)
        elif blocked == "busy":
            kw["busy"] = "an old primary is still to be fenced"
        c = _cluster(f"c{i:02d}", primary, spans, 3306 + i, **kw)
        # Some replicas unhealthy: left out of the targets for good.
        healthy = tuple(a for a in c.replicas if draw(st.integers(0, 4)) > 0)
        clusters.append(msgspec.structs.replace(c, replicas=healthy))
    return clusters, zones


Fleet = tuple[list[PrimaryCluster], dict[str, str]]


@given(fleets())
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_from_any_placement_balancing_converges_and_then_stops(fleet: Fleet) -> None:
    clusters, zones = fleet
    blocked_before = {c.name: c.primary for c in clusters if c.busy or c.findings or c.last_recovery_at is not None}
    done, _, last = _settle(clusters, zones)
    assert {c.name: c.primary for c in done if c.name in blocked_before} == blocked_before
    assert last.move is None
    # Twice more: still nothing (a balanced fleet stays put).
    assert plan_primaries(done, NOW + 1, 0.0, BLOCK, zones).move is None
    free = [c for c in clusters if c.name not in blocked_before]
    every_host = {host_of(a) for c in clusters for a in c.instances}
    if not blocked_before and all({host_of(a) for a in (*c.replicas, c.primary)} == every_host for c in free):
        # Every cluster could go anywhere and stays healthy there: within one per host, and per zone.
        # (After a move the planner's model makes every instance a healthy replica again.)
        assert last.zone_spread <= 1, last
        if not zones:
            assert last.host_spread <= 1, last
