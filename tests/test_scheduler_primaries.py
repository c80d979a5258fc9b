"""HA primaries as a scheduling domain: the planner property-tested, then balancing on real MariaDB clusters.

The planner (plan_primaries) is pure: from any placement it converges to primaries within one of
each other per host (and per zone) when the clusters allow it, never moves a blocked cluster
(anti-flapping block, findings, cooldown, busy), and once balanced emits nothing.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import subprocess
import threading
import time
from collections.abc import Iterator, Mapping

import asyncmy  # type: ignore[import-untyped]
import httpx
import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config.schema import HaConfig, SchedulerConfig
from app.services.ha import layout
from app.services.ha.layout import ClusterRecord, HistoryEntry, InstanceRecord
from app.services.scheduler.primaries import (
    PrimaryBalancer,
    PrimaryCluster,
    PrimaryPlan,
    blocked_reason,
    host_of,
    plan_primaries,
)
from tests.harness import Fleetmate, running, wait_for
from tests.harness.mariadb import MariaDBReplicaSet

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
    # Asked again: still nothing (a settled fleet stays put; at the same time, as a later one may end
    # a cluster's anti-flapping block).
    assert plan_primaries(done, NOW, 0.0, BLOCK, zones).move is None
    free = [c for c in clusters if c.name not in blocked_before]
    every_host = {host_of(a) for c in clusters for a in c.instances}
    if not blocked_before and all({host_of(a) for a in (*c.replicas, c.primary)} == every_host for c in free):
        # Every cluster could go anywhere and stays healthy there: within one per host, and per zone.
        # (After a move the planner's model makes every instance a healthy replica again.)
        assert last.zone_spread <= 1, last
        if not zones:
            assert last.host_spread <= 1, last


class _FakeRegistry:
    """The registry reads the balancer makes (the cluster's history)."""

    def __init__(self, history: dict[str, list[HistoryEntry]]) -> None:
        self.nodes = {
            f"{layout.history_path(name)}/h-{i:010d}": layout.encode(e)
            for name, entries in history.items()
            for i, e in enumerate(entries)
        }

    def exists(self, path: str) -> bool:
        return any(k.startswith(path + "/") for k in self.nodes)

    def child_names(self, path: str) -> list[str]:
        return sorted(k.rsplit("/", 1)[1] for k in self.nodes if k.rsplit("/", 1)[0] == path)

    def node(self, path: str) -> _Node | None:
        data = self.nodes.get(path)
        return None if data is None else _Node(data)


class _Node(msgspec.Struct, frozen=True):
    data: bytes


class _FakeHa:
    """What the balancer reads of HaService: one cluster on .11 with replicas on .12, .13 and .14."""

    def __init__(self, now: float, record: ClusterRecord, history: list[HistoryEntry]) -> None:
        self.cfg = HaConfig(lag_threshold=10.0, poll_interval=0.5)
        self.leading = True
        self.analyses: dict[str, list[object]] = {"c": []}
        self.registry = _FakeRegistry({"c": history})
        self._record = record
        seen = {"reachable": True, "probed_at": now, "lag_seconds": 0.0, "receiving": True, "applying": True}
        self._instances = [
            InstanceRecord("10.0.0.1:3306", True, "primary", read_only=False, probed_at=now),
            InstanceRecord("10.0.0.2:3306", role="replica", source="10.0.0.1:3306", **seen),  # type: ignore[arg-type]
            InstanceRecord("10.0.0.3:3306", role="replica", source="10.0.0.1:3306", **seen),  # type: ignore[arg-type]
            InstanceRecord("10.0.0.4:3306", role="replica", source="10.0.0.1:3306", **seen),  # type: ignore[arg-type]
            InstanceRecord("10.0.0.5:3306", role="replica", source="10.0.0.1:3306", **seen | {"lag_seconds": 60.0}),  # type: ignore[arg-type]
            InstanceRecord("10.0.0.6:3306", role="replica", source="10.0.0.9:3306", **seen),  # type: ignore[arg-type]
            InstanceRecord("10.0.0.7:3306", role="replica", source="10.0.0.1:3306", **seen | {"probed_at": now - 60}),  # type: ignore[arg-type]
        ]

    def names(self) -> list[str]:
        return ["c"]

    def record(self, name: str) -> ClusterRecord:
        return self._record

    def primary(self, name: str) -> str:
        return "10.0.0.1:3306"

    def instances(self, name: str) -> list[InstanceRecord]:
        return self._instances


def test_the_balancer_sees_healthy_replicas_rules_downtime_and_the_last_change_in_the_history() -> None:
    now = NOW
    record = ClusterRecord(
        "c",
        "mysql",
        "10.0.0.1:3306",
        rules={"10.0.0.2:3306": "must_not", "10.0.0.4:3306": "prefer"},
        downtime={"10.0.0.3:3306": now + 60, "10.0.0.4:3306": now - 60},  # .4's downtime is over
    )
    history = [
        HistoryEntry(now - 500, "step", "primary is now 10.0.0.1:3306 (was 10.0.0.2:3306)"),
        HistoryEntry(now - 100, "analysis", "LaggingReplica cleared"),
    ]
    ha = _FakeHa(now, record, history)
    balancer = PrimaryBalancer(ha, SchedulerConfig(primary_cooldown=COOLDOWN), clock=lambda: now)  # type: ignore[arg-type]
    (c,) = balancer.clusters()
    # must_not, in downtime, lagging, following another source, not probed lately: not targets.
    assert c.replicas == ("10.0.0.4:3306",)
    assert c.prefer == ("10.0.0.4:3306",)
    assert c.last_change_at == now - 500
    assert c.busy == ""
    assert blocked_reason(c, now, COOLDOWN, BLOCK).startswith("cooldown")
    assert blocked_reason(c, now, 400.0, BLOCK) == ""
    ha.analyses = {}
    assert balancer.clusters()[0].busy == "not analysed by this leader yet"


# ---- on real MariaDB: 3 semi-sync clusters of 3 instances on 127.0.0.11, .12 and .13 ---------------

CLUSTERS = "/api/v1/ha/clusters"
LOOPBACK = ["127.0.0.11", "127.0.0.12", "127.0.0.13"]
NAMES = ["p0", "p1", "p2"]
COOLDOWN_S = 4.0
DECIDED = "balance-primaries: switchover "


@pytest.fixture(scope="module")
def sets() -> Iterator[dict[str, MariaDBReplicaSet]]:
    """Every set's primary (instance 0) on 127.0.0.11, its replicas on .12 and .13; table app.w."""
    made: dict[str, MariaDBReplicaSet] = {}

    def start(name: str) -> None:
        # mariadb-install-db's bootstrap now and then dies of a segfault (seen about once in ten
        # runs with three at once): a fresh set is tried again.
        for attempt in range(3):
            made[name] = MariaDBReplicaSet(3, semi_sync=True, hosts=LOOPBACK)
            try:
                made[name].start()
                return
            except subprocess.CalledProcessError:
                made[name].stop()
                if attempt == 2:
                    raise

    try:
        with concurrent.futures.ThreadPoolExecutor(len(NAMES)) as pool:
            list(pool.map(start, NAMES))
        for r in made.values():
            r.sql(0, "CREATE TABLE app.w (id BIGINT PRIMARY KEY)")
        yield made
    finally:
        for r in made.values():
            r.stop()


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory, sets: dict[str, MariaDBReplicaSet]) -> Iterator[Fleetmate]:
    admin, repl = MariaDBReplicaSet.admin, MariaDBReplicaSet.replication
    env = {
        "FLEETMATE_HA_USER": admin.user,
        "FLEETMATE_HA_PASSWORD": admin.password,
        "FLEETMATE_HA_REPLICATION_USER": repl.user,
        "FLEETMATE_HA_REPLICATION_PASSWORD": repl.password,
        "FLEETMATE_HA_POLL_INTERVAL": "0.5",
        "FLEETMATE_SCHEDULER_BALANCE_PRIMARIES": "true",
        "FLEETMATE_SCHEDULER_PRIMARY_COOLDOWN": str(COOLDOWN_S),
    }
    with running(Fleetmate(tmp_path_factory.mktemp("primaries"), env=env)) as server:
        yield server


class Writer:
    """Inserts rows one by one into a cluster's primary (as fleetmate records it), following switchovers;
    `acked` holds every id whose COMMIT returned (semi-sync acknowledged)."""

    def __init__(self, fm: Fleetmate, name: str) -> None:
        self.fm, self.name = fm, name
        self.acked: list[int] = []
        self.errors = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)
        self.thread.start()

    def _primary(self) -> str:
        return _primaries(self.fm)[self.name]

    async def _run(self) -> None:
        app = MariaDBReplicaSet.app
        i = 0
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    host, port = self._primary().rsplit(":", 1)
                    conn = await asyncmy.connect(
                        host=host,
                        port=int(port),
                        user=app.user,
                        password=app.password,
                        db=app.database,
                        autocommit=True,
                        connect_timeout=2,
                    )
                i += 1
                async with conn.cursor() as cur:
                    await cur.execute("INSERT INTO w VALUES (%s)", (i,))
                self.acked.append(i)
            except Exception:  # read-only during a switchover, or the primary moved: find it again
                self.errors += 1
                if conn is not None:
                    conn.close()
                conn = None
                await asyncio.sleep(0.05)
        if conn is not None:
            conn.close()

    def finish(self) -> list[int]:
        self.stop.set()
        self.thread.join(20)
        return self.acked


def _primaries(fm: Fleetmate) -> dict[str, str]:
    return {v["name"]: v["primary"] for v in fm.get(CLUSTERS).json()}


def _hosts(fm: Fleetmate) -> list[str]:
    return sorted(host_of(p) for p in _primaries(fm).values())


def _balancing(fm: Fleetmate, name: str) -> list[dict[str, str]]:
    """The balancer's entries in a cluster's history."""
    history = fm.get(f"{CLUSTERS}/{name}/history").json()
    return [e for e in history if e["message"].startswith("balance-primaries")]


def _index(r: MariaDBReplicaSet, address: str) -> int:
    return next(i for i, a in enumerate(r.addresses) if str(a) == address)


def test_primaries_end_one_per_host_and_nothing_acknowledged_is_lost(
    fm: Fleetmate, sets: dict[str, MariaDBReplicaSet]
) -> None:
    for name, r in sets.items():
        reply = fm.post(CLUSTERS, json={"name": name, "dsn": f"mysql://fleetmate@{r.addresses[1]}"})
        assert reply.status_code == 201, reply.text
        assert reply.json()["primary"] == str(r.addresses[0])
    assert _hosts(fm) == [LOOPBACK[0]] * 3
    writers = {name: Writer(fm, name) for name in NAMES}
    started = time.monotonic()
    wait_for(lambda: all(len(w.acked) >= 20 for w in writers.values()), 20, "every writer's first commits")
    wait_for(lambda: _hosts(fm) == LOOPBACK, 60, "primaries one per host")
    balanced_in = time.monotonic() - started
    # Everyone keeps writing on the new primaries a moment before stopping.
    counts = {n: len(w.acked) for n, w in writers.items()}
    wait_for(lambda: all(len(w.acked) >= counts[n] + 20 for n, w in writers.items()), 30, "writes after balancing")
    primaries = _primaries(fm)
    checked = 0
    for name, w in writers.items():
        acked = w.finish()
        r = sets[name]
        i = _index(r, primaries[name])
        assert r.value(i, "SELECT @@read_only") == "0"
        have = {int(x) for x in r.sql(i, "SELECT id FROM app.w").split()}
        assert set(acked) <= have, f"{name} lost acknowledged rows: {sorted(set(acked) - have)[:10]}"
        checked += len(acked)
    moved = {n: _balancing(fm, n) for n in NAMES}
    decisions = [e for entries in moved.values() for e in entries if e["message"].startswith(DECIDED)]
    assert len(decisions) == 2, moved  # from 3/0/0 to 1/1/1: two moves, the third stays
    # Each move is one trace: its decision, the switchover's steps and its outcome; the audit shows it.
    for e in decisions:
        name = next(n for n, entries in moved.items() if e in entries)
        audited = fm.get(f"/api/v1/audit?trace_id={e['trace_id']}").json()
        said = [a["message"] for a in audited]
        assert {a["subject"] for a in audited} == {name}, audited
        assert any(m.startswith("primary is now") for m in said), said
        assert any(m.startswith("balance-primaries: done") for m in said), said
    print(
        f"balanced in {balanced_in:.1f} s with {len(decisions)} switchovers; "
        f"{checked} acknowledged rows checked; writer retries {sum(w.errors for w in writers.values())}"
    )
    # No oscillation: past every cooldown, a balanced fleet gets no move.
    time.sleep(20)
    assert _primaries(fm) == primaries
    assert {n: _balancing(fm, n) for n in NAMES} == moved


def test_a_cluster_inside_its_anti_flapping_block_is_left_alone(
    fm: Fleetmate, sets: dict[str, MariaDBReplicaSet]
) -> None:
    primaries = _primaries(fm)
    by_host = {host_of(p): n for n, p in primaries.items()}
    x, y = by_host[LOOPBACK[0]], by_host[LOOPBACK[1]]
    # x just had a recovery (the anti-flapping clock, as a failover sets it).
    path = f"/api/v1/registry/nodes/fleet/clusters/{x}/config"
    node = fm.get(path).json()
    record = json.loads(node["data"]) | {"last_recovery_at": time.time()}
    body = {"data": json.dumps(record), "version": node["stat"]["version"]}
    assert httpx.put(f"{fm.url}{path}", json=body, timeout=10).status_code == 200
    # y moves onto x's host by hand, and may not go back: its instance on .12 is in downtime, and
    # .13 already has one. Only x could restore the balance, and x is blocked.
    ry = sets[y]
    y_on_11 = next(str(a) for a in ry.addresses if a.host == LOOPBACK[0])
    y_on_12 = next(str(a) for a in ry.addresses if a.host == LOOPBACK[1])
    reply = httpx.put(f"{fm.url}{CLUSTERS}/{y}/instances/{y_on_12}/downtime", json={"seconds": 3600}, timeout=10)
    assert reply.status_code == 200, reply.text
    reply = httpx.post(f"{fm.url}{CLUSTERS}/{y}/switchover", json={"to": y_on_11}, timeout=90)
    assert reply.status_code == 200, reply.text
    assert _hosts(fm) == sorted([LOOPBACK[0], LOOPBACK[0], LOOPBACK[2]])
    before = {n: _balancing(fm, n) for n in NAMES}
    time.sleep(COOLDOWN_S + 8)  # y's cooldown over, and a few balancer steps
    assert _primaries(fm)[x] == primaries[x], "x moved inside its anti-flapping block"
    assert {n: _balancing(fm, n) for n in NAMES} == before
    # The block lifted (acknowledged): x is the one that moves, to .12.
    assert fm.post(f"{CLUSTERS}/{x}/acknowledge", json={"reason": "test"}).status_code in (200, 201)
    wait_for(lambda: host_of(_primaries(fm)[x]) == LOOPBACK[1], 30, f"{x} to move once acknowledged")
    assert _hosts(fm) == LOOPBACK
    assert _primaries(fm)[y] == y_on_11
