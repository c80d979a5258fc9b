"""Failure analysis and candidate choice over hand-built probes (pure: no servers)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from app.adaptors.types import Address, InstanceStatus, ReplicationLink
from app.services.ha.analysis import Candidate, NoCandidate, analyse, choose_candidate

P, R1, R2 = Address("10.0.0.1", 3306), Address("10.0.0.2", 3306), Address("10.0.0.3", 3306)
MARIADB = "10.11.6-MariaDB-0+deb12u1-log"
U_P = "3e11fa47-71ca-11e1-9e33-c80aa9429562"
U_R = "4a6f1c2e-0000-11e1-9e33-c80aa9429562"


def primary(
    position: str = "0-1-10", *, read_only: bool = False, version: str = MARIADB, sid: str = "1"
) -> InstanceStatus:
    return InstanceStatus(
        P, "mysql", True, 0.0, role="primary", read_only=read_only, position=position, version=version,
        server_id=sid, replicas=(R1, R2),
    )  # fmt: skip


def replica(
    address: Address,
    *,
    receiving: bool = True,
    applying: bool = True,
    position: str = "0-1-10",
    lag: float | None = 0.0,
    error: str = "",
    version: str = MARIADB,
    source: Address = P,
) -> InstanceStatus:
    link = ReplicationLink(source, receiving, applying, error, lag, position, position)
    return InstanceStatus(
        address, "mysql", True, 0.0, role="replica", read_only=True, position=position, version=version,
        replication=link,
    )  # fmt: skip


def down(address: Address) -> InstanceStatus:
    return InstanceStatus(address, "mysql", False, 0.0, error="connection refused")


def kinds(found: list) -> list[tuple[str, Address]]:  # type: ignore[type-arg]
    return [(a.kind, a.instance) for a in found]


def test_a_healthy_cluster_has_no_findings() -> None:
    assert analyse(P, {P: primary(), R1: replica(R1), R2: replica(R2)}, 10.0) == []


def test_dead_only_when_the_replicas_agree() -> None:
    lost = {P: down(P), R1: replica(R1, receiving=False), R2: replica(R2, receiving=False)}
    assert kinds(analyse(P, lost, 10.0)) == [("DeadPrimary", P)]
    one_still_receives = {P: down(P), R1: replica(R1, receiving=False), R2: replica(R2)}
    found = analyse(P, one_still_receives, 10.0)
    assert kinds(found) == [("UnreachablePrimary", P)]
    assert str(R2) in found[0].detail
    # A replica fleetmate cannot reach has no say; the reachable one decides.
    assert kinds(analyse(P, {P: down(P), R1: down(R1), R2: replica(R2, receiving=False)}, 10.0, {R1, R2})) == [
        ("DeadPrimary", P),
        ("DeadReplica", R1),
    ]


def test_no_failover_without_a_reachable_replica() -> None:
    assert kinds(analyse(P, {P: down(P), R1: down(R1), R2: down(R2)}, 10.0, {R1, R2})) == [
        ("DeadPrimaryAndReplicas", P),
        ("DeadReplica", R1),
        ("DeadReplica", R2),
    ]
    assert kinds(analyse(P, {P: down(P)}, 10.0)) == [("DeadPrimaryWithoutReplicas", P)]


def test_replica_findings() -> None:
    probes = {
        P: primary(),
        R1: replica(R1, receiving=False, error="error reconnecting to master"),
        R2: replica(R2, lag=42.0),
    }
    found = analyse(P, probes, 10.0)
    assert kinds(found) == [("ReplicationStopped", R1), ("LaggingReplica", R2)]
    assert "error reconnecting" in found[0].detail
    assert kinds(analyse(P, {P: primary(), R1: replica(R1, applying=False)}, 10.0)) == [("ReplicationStopped", R1)]


def test_split_brain_and_a_read_only_primary() -> None:
    rogue = InstanceStatus(R2, "mysql", True, 0.0, role="primary", read_only=False, position="0-3-1", version=MARIADB)
    assert kinds(analyse(P, {P: primary(read_only=True), R1: replica(R1), R2: rogue}, 10.0)) == [
        ("PrimaryReadOnly", P),
        ("SplitBrain", R2),
    ]


def test_errant_gtids_mariadb() -> None:
    # R1 wrote in domain 0 with its own server id 2: errant. R2 is ahead only with the primary's
    # own transactions (probed a moment later): not errant.
    probes = {P: primary("0-1-10"), R1: replica(R1, position="0-2-11"), R2: replica(R2, position="0-1-12")}
    found = analyse(P, probes, 10.0)
    assert kinds(found) == [("ErrantGtid", R1)]
    assert found[0].detail == "0-2-11"


def test_errant_gtids_mysql() -> None:
    mysql = "8.0.36"
    probes = {
        P: primary(f"{U_P}:1-10", version=mysql, sid=U_P),
        R1: replica(R1, position=f"{U_P}:1-10,{U_R}:1-2", version=mysql),
        R2: replica(R2, position=f"{U_P}:1-12", version=mysql),
    }
    found = analyse(P, probes, 10.0)
    assert kinds(found) == [("ErrantGtid", R1)]
    assert found[0].detail == f"{U_R}:1-2"


def test_the_most_advanced_replica_is_chosen() -> None:
    survivors = [replica(R1, position="0-1-10"), replica(R2, position="0-1-12")]
    assert choose_candidate(survivors, {}) == Candidate(R2, True, "holds every transaction any reachable replica holds")
    even = [replica(R1, position="0-1-12"), replica(R2, position="0-1-12")]
    chosen = choose_candidate(even, {R2: "prefer"})
    assert isinstance(chosen, Candidate)
    assert chosen.address == R2


def test_must_not_downtime_and_completeness() -> None:
    survivors = [replica(R1, position="0-1-10"), replica(R2, position="0-1-12")]
    refused = choose_candidate(survivors, {R2: "must_not"})
    assert isinstance(refused, NoCandidate)
    assert str(R2) in refused.reason
    assert isinstance(choose_candidate(survivors, {}, excluded={R2}), NoCandidate)
    lossy = choose_candidate(survivors, {R2: "must_not"}, require_complete=False)
    assert lossy == Candidate(R1, False, "most advanced allowed replica; others hold transactions it lacks")
    assert isinstance(choose_candidate([down(R1), down(R2)], {}), NoCandidate)
    unreadable = choose_candidate([replica(R1, position="garbage")], {})
    assert isinstance(unreadable, NoCandidate)
    assert "position" in unreadable.reason


lsns = st.integers(0, 1 << 40)


@given(st.lists(lsns, min_size=1, max_size=6), st.lists(st.sampled_from(["prefer", "neutral", "must_not"]), min_size=6))
def test_a_complete_candidate_holds_everything_any_survivor_holds(values: list[int], rules: list[str]) -> None:
    survivors = []
    for i, v in enumerate(values):
        text = f"{v >> 32:X}/{v & 0xFFFFFFFF:X}"
        link = ReplicationLink(P, False, True, "", None, text, text)
        survivors.append(
            InstanceStatus(
                Address("h", 5000 + i), "postgresql", True, 0.0, role="replica", position=text, replication=link
            )
        )
    rule_of = {s.address: rules[i] for i, s in enumerate(survivors)}
    chosen = choose_candidate(survivors, rule_of)  # type: ignore[arg-type]
    best = max(values)
    allowed_best = [
        s.address for s, v in zip(survivors, values, strict=True) if v == best and rule_of[s.address] != "must_not"
    ]
    if allowed_best:
        assert isinstance(chosen, Candidate)
        assert chosen.complete
        assert chosen.address in allowed_best
        if any(rule_of[a] == "prefer" for a in allowed_best):
            assert rule_of[chosen.address] == "prefer"
    else:
        assert isinstance(chosen, NoCandidate)
