"""A simulated cluster, pure: rounds of the schedulers on a state whose data nodes acknowledge every step at once.

The what-if answer runs it on a copy of a cluster; the property tests and bench/scheduler.py run it
to check convergence, limits and the time a repair takes under the store limits.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from app.services.scheduler.messages import Advance, Expire, LeaderElected, Operator, Propose, Report
from app.services.scheduler.model import Cluster, Procedure
from app.services.scheduler.procedures import MINUTE_MS
from app.services.scheduler.schedulers import operators
from app.services.scheduler.state import SchedulerState

_enc = msgspec.msgpack.Encoder()


def copy_cluster(c: Cluster) -> Cluster:
    """A deep copy of a cluster (what-if works on one)."""
    return msgspec.msgpack.decode(_enc.encode(c), type=Cluster)


def acks_for(state: SchedulerState, proc: Procedure, now_ms: int) -> list[Report]:
    """The reports live data nodes would send for the procedure's current step (opened, or closed)."""
    c = state.clusters.get(proc.cluster)
    if c is None or proc.at < 0 or proc.finished:
        return []
    step = proc.steps[proc.at]
    if not step.started:
        return []
    out: list[Report] = []
    for sid in c.shards if step.action == "place" else (step.shard, step.other):
        shard = c.shards.get(sid)
        if shard is None:
            continue
        for r in shard.replicas:
            if c.live(r.node) and r.acked < shard.epoch:
                out.append(Report(proc.cluster, r.node, sid, shard.epoch, "opened", now_ms))
    for node, held in c.stale.items():
        if c.live(node):
            out.extend(Report(proc.cluster, node, sid, 0, "closed", now_ms) for sid in held)
    return out


class Simulation:
    """A scheduler state driven round by round at a simulated clock, as a leader with acknowledging nodes would."""

    def __init__(self, state: SchedulerState, term: int = 0, now_ms: int = 0) -> None:
        self.state = state
        self.now_ms = now_ms
        if term <= state.term:
            term = state.term + 1
        self.state.apply(LeaderElected(term, "simulation", now_ms))
        self.term = term
        self.started: list[Operator] = []
        self.refused: list[tuple[Operator, str]] = []

    def propose(self, cluster: str) -> list[Operator]:
        """One scheduling round on a cluster: every operator the schedulers emit, proposed."""
        c = self.state.clusters[cluster]
        ops = operators(c, self.state.running(cluster), self.now_ms)
        for op in ops:
            result, _ = self.state.apply(Propose(cluster, op, self.term, self.now_ms))
            if isinstance(result, Exception):
                self.refused.append((op, str(result)))
            else:
                self.started.append(op)
        return ops

    def settle(self, cluster: str, ack: bool = True) -> int:
        """Acknowledge and advance every running procedure as far as it goes now; the steps advanced."""
        steps = 0
        for _ in range(64):
            moved = 0
            for proc in self.state.running(cluster):
                if ack:
                    for rep in acks_for(self.state, proc, self.now_ms):
                        self.state.apply(rep)
                where = (proc.at, proc.status, proc.at >= 0 and proc.steps[proc.at].started)
                result, _ = self.state.apply(Advance(proc.id, proc.at, self.term, self.now_ms))
                if not isinstance(result, Exception):
                    # a step waiting for a store limit is applied but did not move: not counted
                    moved += where != (proc.at, proc.status, proc.at >= 0 and proc.steps[proc.at].started)
                else:
                    self.state.apply(Expire(proc.id, proc.at, self.term, self.now_ms))
            steps += moved
            if not moved:
                break
        return steps

    def run(
        self,
        cluster: str,
        tick_ms: int = 1000,
        max_rounds: int = 10_000,
        on_round: Callable[[int, list[Operator]], object] | None = None,
    ) -> int:
        """Rounds (one a tick) until the schedulers emitted nothing and nothing ran for a minute (the store
        limits' window: a node out of units gets more); the rounds taken up to the last operator.

        on_round(round, operators) is called after each round's proposals and advances (checks, progress)."""
        last_busy = 0
        quiet_ms = 0
        for rounds in range(1, max_rounds + 1):
            ops = self.propose(cluster)
            self.settle(cluster)
            if on_round is not None:
                on_round(rounds, ops)
            if ops or self.state.running(cluster):
                last_busy, quiet_ms = rounds, 0
            else:
                quiet_ms += tick_ms
                if quiet_ms > MINUTE_MS:
                    return last_busy
            self.now_ms += tick_ms
        return max_rounds
