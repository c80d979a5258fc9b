"""What-if, pure: the schedulers run on a copy of a cluster with nodes down, added or draining; nothing real changes."""

from __future__ import annotations

import time
from collections import Counter

from app.services.scheduler.checks import node_spec
from app.services.scheduler.errors import BadSchedulerRequest, NoSuchDataNode
from app.services.scheduler.messages import RegisterNode, SetNodeState
from app.services.scheduler.model import Cluster
from app.services.scheduler.simulate import Simulation, copy_cluster
from app.services.scheduler.state import SchedulerState
from app.services.scheduler.views import WhatIf, WhatIfResult

MAX_ROUNDS = 20_000


def what_if(cluster: Cluster, change: WhatIf, interval_s: float) -> WhatIfResult:
    """The operators the schedulers would emit after `change`, round by round until they settle, and
    the time that takes at one round per `interval_s` within the store limits (acks taken as instant)."""
    c = copy_cluster(cluster)
    name = c.spec.name
    for n in [*change.down, *change.drain]:
        if n not in c.nodes:
            raise NoSuchDataNode(f"cluster {name} has no node {n!r}")
    if len(change.down) + len(change.drain) + len(change.add) > 1000:
        raise BadSchedulerRequest("what-if takes at most 1000 nodes in all")
    for spec in change.add:
        node_spec(spec)
        if spec.name in c.nodes:
            raise BadSchedulerRequest(f"node {spec.name} is in the cluster already")
    c.enable_schedule, c.paused, c.frozen = True, False, False
    state = SchedulerState()
    state.clusters[name] = c
    now = int(time.time() * 1000)
    sim = Simulation(state, now_ms=now)
    tick = max(1, int(interval_s * 1000))
    for n in change.down:  # down past max_down_time: repair starts at once
        state.apply(SetNodeState(name, n, "down", "what-if", sim.term, now - int(c.max_down_time_s * 1000) - 1))
    for n in change.drain:
        state.apply(SetNodeState(name, n, "draining", "what-if", 0, now))
    for spec in change.add:
        state.apply(RegisterNode(name, spec, now))
    rounds = sim.run(name, tick_ms=tick, max_rounds=MAX_ROUNDS)
    ops = sim.started
    live = [n for n, r in c.nodes.items() if r.state == "online"]
    replicas = Counter({n: 0 for n in live})
    leaders = Counter({n: 0 for n in live})
    for s in c.shards.values():
        for r in s.replicas:
            if r.node in replicas:
                replicas[r.node] += 1
        if s.leader in leaders:
            leaders[s.leader] += 1
    return WhatIfResult(
        operators=ops[:1000],
        by_kind=dict(Counter(f"{op.kind}:{op.source}" for op in ops)),
        rounds=rounds,
        eta_s=round(rounds * tick / 1000, 3),
        settled=rounds < MAX_ROUNDS,
        replicas_after=dict(sorted(replicas.items())),
        leaders_after=dict(sorted(leaders.items())),
    )
