"""Failure analysis and candidate choice over one cluster's probes: pure functions, no I/O.

Holistic detection as Orchestrator does it: the primary is dead only when fleetmate cannot
reach it AND the replicas that replicate from it agree (none still receives from it). A
primary only fleetmate cannot reach is UnreachablePrimary and triggers no failover.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Literal

import msgspec

from app.adaptors.positions import MariaDBGtidPos, MySQLGtidSet, Position, PositionError, parse
from app.adaptors.types import Address, InstanceStatus
from app.services.ha.messages import PromotionRule

AnalysisKind = Literal[
    "DeadPrimary",  # failover: unreachable and every reachable replica lost it
    "UnreachablePrimary",  # no failover: some replica still receives from it
    "DeadPrimaryAndReplicas",  # no failover: nothing reachable to promote
    "DeadPrimaryWithoutReplicas",  # no failover: it had no replica
    "PrimaryReadOnly",
    "SplitBrain",  # another writable primary besides the recorded one
    "DeadReplica",
    "ReplicationStopped",
    "LaggingReplica",
    "ErrantGtid",
]
FAILOVER_KINDS = frozenset({"DeadPrimary"})


class Analysis(msgspec.Struct, frozen=True):
    """One finding about a cluster; `instance` is the one it is about."""

    kind: AnalysisKind
    instance: Address
    detail: str = ""


class Candidate(msgspec.Struct, frozen=True):
    """The replica to promote, and whether it holds every transaction any survivor holds."""

    address: Address
    complete: bool
    reason: str


class NoCandidate(msgspec.Struct, frozen=True):
    """Why no replica can be promoted safely."""

    reason: str


def flavor(status: InstanceStatus) -> str:
    """'mariadb', 'mysql' or 'postgresql'."""
    if status.engine == "postgresql":
        return "postgresql"
    return "mariadb" if "mariadb" in status.version.lower() else "mysql"


def position(status: InstanceStatus, received: bool = False) -> Position | None:
    """The instance's executed position (or, received=True, what its replication link received)."""
    text = status.position
    if received and status.replication is not None and status.replication.received_position:
        text = status.replication.received_position
    try:
        return parse(status.engine, flavor(status), text)
    except PositionError:
        return None


def replicas_of(primary: Address, probes: Mapping[Address, InstanceStatus]) -> list[InstanceStatus]:
    """Instances configured to replicate from primary, reachable or not (as last seen)."""
    return [
        s for a, s in probes.items() if a != primary and s.replication is not None and s.replication.source == primary
    ]


def analyse(
    primary: Address,
    probes: Mapping[Address, InstanceStatus],
    lag_threshold: float,
    known_replicas: Set[Address] = frozenset(),
) -> list[Analysis]:
    """Every finding for a cluster whose recorded primary is `primary`.

    known_replicas: instances the registry lists as replicas of primary, so one whose probe
    fails still counts as a replica (a failed probe carries no replication link).
    """
    out: list[Analysis] = []
    head = probes.get(primary)
    followers = replicas_of(primary, probes)
    listed = {s.address for s in followers} | (set(known_replicas) - {primary})
    if head is None or not head.reachable:
        reachable = [s for s in followers if s.reachable]
        why = head.error if head is not None else "never probed"
        if not listed:
            out.append(Analysis("DeadPrimaryWithoutReplicas", primary, f"unreachable ({why}); no replica"))
        elif not reachable:
            out.append(Analysis("DeadPrimaryAndReplicas", primary, f"unreachable ({why}); no replica reachable"))
        else:
            still = [s for s in reachable if s.replication is not None and s.replication.receiving]
            if still:
                names = ", ".join(str(s.address) for s in still)
                out.append(
                    Analysis(
                        "UnreachablePrimary",
                        primary,
                        f"unreachable from fleetmate ({why}) but {len(still)} of {len(reachable)} reachable "
                        f"replicas still receive from it: {names}",
                    )
                )
            else:
                out.append(
                    Analysis(
                        "DeadPrimary",
                        primary,
                        f"unreachable ({why}) and all {len(reachable)} reachable replicas lost it",
                    )
                )
    else:
        if head.read_only:
            out.append(Analysis("PrimaryReadOnly", primary, "the recorded primary refuses writes"))
        for other in probes.values():
            if other.address != primary and other.reachable and other.role == "primary" and other.read_only is False:
                detail = f"writable and replicating from no one besides {primary}"
                out.append(Analysis("SplitBrain", other.address, detail))
    for address in sorted(listed):
        s = probes.get(address)
        if s is None or not s.reachable:
            out.append(Analysis("DeadReplica", address, s.error if s is not None else "never probed"))
            continue
        link = s.replication
        if link is None:
            continue
        if head is not None and head.reachable and not (link.receiving and link.applying):
            stopped = "receiving" if not link.receiving else "applying"
            detail = f"not {stopped}" + (f": {link.last_error}" if link.last_error else "")
            out.append(Analysis("ReplicationStopped", address, detail))
        elif link.lag_seconds is not None and link.lag_seconds > lag_threshold:
            out.append(Analysis("LaggingReplica", address, f"{link.lag_seconds:.1f} s behind"))
        if head is not None and head.reachable and head.engine == "mysql":
            errant = _errant(head, s)
            if errant:
                out.append(Analysis("ErrantGtid", address, errant))
    return out


def _errant(head: InstanceStatus, replica: InstanceStatus) -> str:
    """Transactions the replica executed that did not come from the primary's side, as text ('' if none).

    Probes are not simultaneous: a replica probed after the primary may hold the primary's newest
    transactions. Those carry the primary's own id and are not errant.
    """
    mine, theirs = position(replica), position(head)
    if isinstance(mine, MySQLGtidSet) and isinstance(theirs, MySQLGtidSet):
        extra = mine.minus(theirs)
        extra = MySQLGtidSet({u: i for u, i in extra.sets.items() if u != head.server_id.lower()})
        return str(extra) if extra.sets else ""
    if isinstance(mine, MariaDBGtidPos) and isinstance(theirs, MariaDBGtidPos):
        ahead = {d: v for d, v in mine.ahead_of(theirs).items() if str(v[0]) != head.server_id}
        return ",".join(f"{d}-{s}-{n}" for d, (s, n) in sorted(ahead.items()))
    return ""


def choose_candidate(
    replicas: list[InstanceStatus],
    rules: Mapping[Address, PromotionRule],
    excluded: Set[Address] = frozenset(),
    require_complete: bool = True,
) -> Candidate | NoCandidate:
    """Pick the replica to promote among a dead primary's replicas.

    The most advanced (received position; call after they applied what they received) wins;
    `prefer` breaks ties, `must_not` and `excluded` (downtime) never win. With require_complete
    (semi-sync / synchronous replication), a candidate missing a transaction that another
    survivor holds is refused: an acknowledged transaction could be among them.
    """
    alive = [s for s in replicas if s.reachable]
    if not alive:
        return NoCandidate("no replica is reachable")
    positions = {s.address: position(s, received=True) for s in alive}
    unknown = [str(a) for a, p in positions.items() if p is None]
    if unknown:
        return NoCandidate(f"cannot read the replication position of {', '.join(unknown)}")
    known = {a: p for a, p in positions.items() if p is not None}
    allowed = [s for s in alive if rules.get(s.address, "neutral") != "must_not" and s.address not in excluded]
    if not allowed:
        return NoCandidate("every reachable replica is must_not or in downtime")

    def complete(a: Address) -> bool:
        return all(known[a].covers(p) for p in known.values())

    whole = [s for s in allowed if complete(s.address)]
    rank = {"prefer": 0, "neutral": 1, "must_not": 2}
    if whole:
        best = min(whole, key=lambda s: (rank[rules.get(s.address, "neutral")], s.address))
        return Candidate(best.address, True, "holds every transaction any reachable replica holds")
    if require_complete:
        holders = [str(s.address) for s in alive if complete(s.address)]
        if holders:
            why = f"only {', '.join(holders)} hold every transaction, and they are must_not or in downtime"
        else:
            why = "no replica holds every transaction the others hold (diverged positions)"
        return NoCandidate(why)
    best = max(allowed, key=lambda s: (known[s.address].size(), -rank[rules.get(s.address, "neutral")]))
    return Candidate(best.address, False, "most advanced allowed replica; others hold transactions it lacks")
