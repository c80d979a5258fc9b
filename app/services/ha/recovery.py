"""Recovery planning for a dead primary: a pure decision from an analysis, the probes and the cluster's rules.

The HA service executes the plan's steps through the engine adaptor (and records each one);
this module only decides, so every rule is testable without servers: anti-flapping
(`recovery_block_seconds`), downtime, promotion rules, and "never promote a replica missing
an acknowledged transaction" when semi-sync / synchronous replication is on.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from typing import Literal

import msgspec

from app.adaptors.types import Address, InstanceStatus
from app.services.ha.analysis import FAILOVER_KINDS, Analysis, Candidate, NoCandidate, choose_candidate, replicas_of
from app.services.ha.messages import PromotionRule

StepKind = Literal["wait_applied", "promote", "repoint", "publish_primary", "fence_old_primary"]


class Step(msgspec.Struct, frozen=True):
    """One action on one instance (source: the instance to replicate from, for repoint)."""

    kind: StepKind
    instance: Address
    source: Address | None = None


class RecoveryPlan(msgspec.Struct, frozen=True):
    """What to do, in order, and why this candidate."""

    cluster: str
    failed_primary: Address
    candidate: Address
    complete: bool  # the candidate holds every transaction any survivor holds
    reason: str
    steps: tuple[Step, ...]
    synchronous: bool = False  # the failed primary waited for a replica: the candidate must too


class Blocked(msgspec.Struct, frozen=True):
    """Why no automatic recovery runs (recorded, and shown with the analysis)."""

    cluster: str
    reason: str


class ClusterPolicy(msgspec.Struct, frozen=True):
    """A cluster's recovery rules."""

    rules: dict[Address, PromotionRule] = {}
    downtime: frozenset[Address] = frozenset()  # instances in downtime/maintenance
    require_complete: bool = True  # semi-sync / synchronous replication is on
    block_seconds: float = 3600.0  # no second automatic recovery within this long
    auto_recover: bool = True


def plan_recovery(
    cluster: str,
    analysis: Analysis,
    probes: Mapping[Address, InstanceStatus],
    policy: ClusterPolicy,
    now: float,
    last_recovery_at: float | None,
    applied: Set[Address] = frozenset(),
) -> RecoveryPlan | Blocked:
    """Plan the recovery of `analysis` (a DeadPrimary) or say why none runs.

    `applied`: survivors whose relay log / WAL is known to be applied (their probes' received
    positions are final); until every reachable survivor is in it, the plan starts with the
    wait_applied steps and the candidate is provisional: plan again with the probes taken after.
    """
    if analysis.kind not in FAILOVER_KINDS:
        return Blocked(cluster, f"{analysis.kind} needs no recovery")
    dead = analysis.instance
    if not policy.auto_recover:
        return Blocked(cluster, "automatic recovery is off for this cluster; recover it by hand")
    if dead in policy.downtime:
        return Blocked(cluster, f"the primary {dead} is in downtime")
    if last_recovery_at is not None and now - last_recovery_at < policy.block_seconds:
        left = policy.block_seconds - (now - last_recovery_at)
        return Blocked(
            cluster,
            f"anti-flapping: the last recovery was {now - last_recovery_at:.0f} s ago "
            f"(recovery_block_seconds {policy.block_seconds:.0f}, {left:.0f} s left); acknowledge it to allow another",
        )
    survivors = [s for s in replicas_of(dead, probes) if s.reachable]
    chosen = choose_candidate(survivors, policy.rules, policy.downtime, policy.require_complete)
    if isinstance(chosen, NoCandidate):
        return Blocked(cluster, f"no replica can be promoted: {chosen.reason}")
    assert isinstance(chosen, Candidate)
    steps = [Step("wait_applied", s.address) for s in survivors if s.address not in applied]
    steps.append(Step("promote", chosen.address))
    steps.extend(Step("repoint", s.address, chosen.address) for s in survivors if s.address != chosen.address)
    steps.append(Step("publish_primary", chosen.address))
    steps.append(Step("fence_old_primary", dead, chosen.address))
    return RecoveryPlan(
        cluster, dead, chosen.address, chosen.complete, chosen.reason, tuple(steps), policy.require_complete
    )
