"""Procedures, pure: the steps of each kind, starting a step (its change to the shard table), completion, roll-back."""

from __future__ import annotations

from app.services.scheduler.errors import (
    BadSchedulerRequest,
    LimitReached,
    NoSuchDataNode,
    NoSuchShard,
    Refused,
    StepNotReady,
)
from app.services.scheduler.messages import Operator
from app.services.scheduler.model import Cluster, Procedure, Replica, Shard, Spend, Step

MINUTE_MS = 60_000
# The schedule-limit class of a procedure (PD's leader/region/replica/merge/hot limits).
PRIORITY = {
    "placement": 6,  # holds no shard: never replaced
    "failover": 5,
    "repair": 4,
    "evict-leader": 3,
    "manual": 3,
    "spread": 1,
    "balance-leader": 1,
    "balance-shard": 1,
    "hot": 1,
    "merge": 1,
    "split": 2,  # a store's shard past its capacity (the KV asks)
}
BALANCING = frozenset({"balance-leader", "balance-shard", "hot", "spread", "merge"})


def limit_class(op: Operator) -> str:
    """Which concurrency limit a procedure counts against (a cluster's placement: none)."""
    if op.kind == "create_cluster":
        return "placement"
    if op.source == "hot":
        return "hot"
    if op.source in ("repair", "failover"):
        return "replica" if op.kind != "transfer_leader" else "leader"
    if op.kind == "transfer_leader":
        return "leader"
    if op.kind == "merge":
        return "merge"
    return "shard"


def limit_of(cluster: Cluster, klass: str) -> int:
    """The cluster's limit for a class."""
    lim = cluster.limits
    limits = {"leader": lim.leader, "shard": lim.shard, "replica": lim.replica, "merge": lim.merge, "hot": lim.hot}
    return limits.get(klass, 1 << 30)


def shard_of(cluster: Cluster, shard_id: int) -> Shard:
    """A shard of the cluster, or NoSuchShard naming it."""
    shard = cluster.shards.get(shard_id)
    if shard is None:
        raise NoSuchShard(f"cluster {cluster.spec.name} has no shard {shard_id}")
    return shard


def _target(cluster: Cluster, node: str, shard: Shard) -> None:
    rec = cluster.nodes.get(node)
    if rec is None:
        raise NoSuchDataNode(f"cluster {cluster.spec.name} has no node {node!r}")
    if rec.state != "online":
        raise Refused(f"node {node} is {rec.state}: it cannot take a replica")
    if shard.replica(node) is not None:
        raise Refused(f"node {node} already holds shard {shard.id}")


def _holder(cluster: Cluster, node: str, shard: Shard) -> Replica:
    if node not in cluster.nodes:
        raise NoSuchDataNode(f"cluster {cluster.spec.name} has no node {node!r}")
    rep = shard.replica(node)
    if rep is None:
        raise Refused(f"node {node} holds no replica of shard {shard.id}")
    return rep


def _dynamic(cluster: Cluster, what: str) -> None:
    if cluster.spec.topology == "static":
        raise Refused(f"cluster {cluster.spec.name} has a static topology: {what} is not allowed")


def mid_key(start: str, end: str) -> str:
    """The middle of a key range whose bounds are hexadecimal of one length ("" is the bottom or top)."""
    width = max(len(start), len(end), 8)
    try:
        lo = int(start, 16) if start else 0
        hi = int(end, 16) if end else 16**width
    except ValueError:
        raise BadSchedulerRequest(f"give split_key: the range [{start!r}, {end!r}) is not hexadecimal") from None
    if hi - lo < 2:
        raise Refused(f"the range [{start!r}, {end!r}) is too small to split")
    return f"{(lo + hi) // 2:0{width}x}"


def plan(cluster: Cluster, op: Operator) -> list[Step]:
    """The steps of an operator on the cluster as it is now; Refused/BadSchedulerRequest if it cannot run."""
    if op.kind == "create_cluster":
        raise BadSchedulerRequest("create_cluster runs once, started by the leader when node_count nodes are online")
    if not op.shards:
        raise BadSchedulerRequest("a procedure needs a shard")
    if op.kind not in ("merge",) and len(op.shards) != 1:
        raise BadSchedulerRequest(f"{op.kind} takes exactly one shard")
    shard = shard_of(cluster, op.shards[0])
    sid = shard.id
    match op.kind:
        case "transfer_leader":
            rep = _holder(cluster, op.node_to, shard)
            if rep.role == "leader":
                raise Refused(f"node {op.node_to} already leads shard {sid}")
            if not cluster.live(op.node_to) or cluster.nodes[op.node_to].state != "online":
                raise Refused(f"node {op.node_to} is {cluster.nodes[op.node_to].state}: it cannot lead")
            return [Step("transfer_leader", sid, node=op.node_to)]
        case "add_replica":
            _dynamic(cluster, "adding a replica")
            _target(cluster, op.node_to, shard)
            return [Step("add_learner", sid, node=op.node_to), Step("promote", sid, node=op.node_to)]
        case "remove_replica":
            _dynamic(cluster, "removing a replica")
            _holder(cluster, op.node_from, shard)
            if len(shard.replicas) < 2:
                raise Refused(f"shard {sid} has one replica: removing it would lose the shard")
            return [Step("remove", sid, node=op.node_from)]
        case "move":
            _dynamic(cluster, "moving a replica")
            _holder(cluster, op.node_from, shard)
            _target(cluster, op.node_to, shard)
            return [
                Step("add_learner", sid, node=op.node_to),
                Step("promote", sid, node=op.node_to),
                Step("remove", sid, node=op.node_from),
            ]
        case "scatter":
            _dynamic(cluster, "scattering a shard")
            if not op.targets or len(set(op.targets)) != len(op.targets):
                raise BadSchedulerRequest("scatter needs its target nodes, distinct, the leader's first")
            steps: list[Step] = []
            for node in op.targets:
                if shard.replica(node) is None:
                    _target(cluster, node, shard)
                    steps += [Step("add_learner", sid, node=node), Step("promote", sid, node=node)]
            if shard.leader != op.targets[0]:
                steps.append(Step("transfer_leader", sid, node=op.targets[0]))
            steps += [Step("remove", sid, node=r.node) for r in shard.replicas if r.node not in op.targets]
            if not steps:
                raise Refused(f"shard {sid} is already on {', '.join(op.targets)}")
            return steps
        case "split":
            _dynamic(cluster, "splitting a shard")
            key = op.split_key or mid_key(shard.start, shard.end)
            if key <= shard.start or (shard.end and key >= shard.end):
                raise BadSchedulerRequest(f"split_key {key!r} is not inside shard {sid}'s range")
            return [Step("split", sid, key=key)]
        case "merge":
            _dynamic(cluster, "merging shards")
            if len(op.shards) != 2:
                raise BadSchedulerRequest("merge takes two adjacent shards")
            other = shard_of(cluster, op.shards[1])
            if shard.end != other.start or not shard.end:
                raise Refused(f"shard {sid} ends at {shard.end!r}, shard {other.id} starts at {other.start!r}")
            if {r.node for r in shard.replicas} != {r.node for r in other.replicas}:
                raise Refused(f"shards {sid} and {other.id} are not on the same nodes: move one first")
            if shard.group != other.group:
                raise Refused(f"shards {sid} and {other.id} are in log partitions {shard.group} and {other.group}")
            return [Step("merge", sid, other=other.id)]
    raise BadSchedulerRequest(f"unknown procedure kind {op.kind!r}")


def step_cost(cluster: Cluster, shard: Shard) -> float:
    """A store-limit unit, less for a small shard (PD's store limit counts small regions cheaper)."""
    lim = cluster.limits
    size = cluster_size(cluster, shard.id)
    return lim.small_shard_cost if size < lim.small_shard_bytes else 1.0


def cluster_size(cluster: Cluster, shard_id: int) -> int:
    """A shard's size as last reported (kept in the cluster's sizes)."""
    return cluster.sizes.get(shard_id, 0)


def spent(cluster: Cluster, node: str, kind: str, now_ms: int) -> float:
    """The store-limit units the node spent on `kind` in the minute before now_ms."""
    return sum(s.cost for s in cluster.spend.get(node, ()) if s.kind == kind and now_ms - s.time_ms < MINUTE_MS)


def _spend(cluster: Cluster, node: str, kind: str, cost: float, now_ms: int) -> None:
    per_min = cluster.limits.node_adds_per_min if kind == "add" else cluster.limits.node_removes_per_min
    if spent(cluster, node, kind, now_ms) + cost > per_min:
        raise StepNotReady(f"node {node} spent its {per_min:g} {kind}s a minute")
    kept = [s for s in cluster.spend.get(node, ()) if now_ms - s.time_ms < MINUTE_MS]
    kept.append(Spend(now_ms, "add" if kind == "add" else "remove", cost))
    cluster.spend[node] = kept


def _deadline(cluster: Cluster, shard: Shard, now_ms: int) -> int:
    lim = cluster.limits
    seconds = lim.step_timeout_s + cluster_size(cluster, shard.id) / max(1, lim.step_bytes_per_s)
    return now_ms + int(seconds * 1000)


def _new_leader(cluster: Cluster, shard: Shard, leaving: str) -> str:
    live = [r for r in shard.replicas if r.node != leaving and r.role == "follower" and cluster.live(r.node)]
    if not live:
        raise Refused(f"shard {shard.id} has no live follower to lead once {leaving} leaves")
    return max(live, key=lambda r: (cluster.nodes[r.node].state == "online", r.acked, r.node)).node


def start_step(cluster: Cluster, proc: Procedure, now_ms: int) -> set[str]:
    """Apply the current step's change; the nodes whose assignment changed.

    StepNotReady (nothing changed) when a node's store limit is spent; Refused when the step can no
    longer run (the caller ends the procedure). Everything is checked before anything changes.
    """
    step = proc.steps[proc.at]
    shard = shard_of(cluster, step.shard)
    changed = {r.node for r in shard.replicas}
    match step.action:
        case "add_learner":
            _target(cluster, step.node, shard)
            _spend(cluster, step.node, "add", step_cost(cluster, shard), now_ms)
            shard.replicas.append(Replica(step.node, "learner"))
            changed.add(step.node)
        case "promote":
            rep = _holder(cluster, step.node, shard)
            if rep.role != "learner":
                raise Refused(f"the replica of shard {shard.id} on {step.node} is a {rep.role}, not a learner")
            rep.role = "follower"
        case "transfer_leader":
            rep = _holder(cluster, step.node, shard)
            if not cluster.live(step.node) or cluster.nodes[step.node].state != "online":
                raise Refused(f"node {step.node} is {cluster.nodes[step.node].state}: it cannot lead")
            if rep.role == "learner":
                raise Refused(f"the replica of shard {shard.id} on {step.node} is a learner")
            for r in shard.replicas:
                if r.role == "leader":
                    r.role = "follower"
            rep.role = "leader"
        case "remove":
            rep = _holder(cluster, step.node, shard)
            if len(shard.replicas) < 2:
                raise Refused(f"shard {shard.id} has one replica left: it is not removed")
            leader = _new_leader(cluster, shard, step.node) if rep.role == "leader" else ""
            if cluster.live(step.node):
                _spend(cluster, step.node, "remove", step_cost(cluster, shard), now_ms)
            shard.replicas.remove(rep)
            if leader:
                step.leader = leader
                heir = shard.replica(leader)
                assert heir is not None
                heir.role = "leader"
            if cluster.nodes[step.node].state != "removed":
                cluster.stale.setdefault(step.node, []).append(shard.id)
        case "split":
            if step.key <= shard.start or (shard.end and step.key >= shard.end):
                raise Refused(f"split key {step.key!r} is no longer inside shard {shard.id}'s range")
            new_id = cluster.next_shard
            cluster.next_shard += 1
            child = Shard(
                new_id,
                step.key,
                shard.end,
                replicas=[Replica(r.node, r.role) for r in shard.replicas],
                group=shard.group,
            )
            shard.end = step.key
            cluster.shards[new_id] = child
            step.other = new_id
            proc.epochs[new_id] = 0
        case "merge":
            other = shard_of(cluster, step.other)
            if shard.end != other.start or {r.node for r in shard.replicas} != {r.node for r in other.replicas}:
                raise Refused(f"shards {shard.id} and {other.id} are no longer adjacent on the same nodes")
            shard.end = other.end
            shard.tables = sorted({*shard.tables, *other.tables})
            for t in other.tables:
                cluster.tables[t] = shard.id
            shard.epoch = max(shard.epoch, other.epoch)
            del cluster.shards[other.id]
            cluster.sizes[shard.id] = cluster.sizes.get(shard.id, 0) + cluster.sizes.pop(other.id, 0)
            for r in other.replicas:
                cluster.stale.setdefault(r.node, []).append(other.id)
                changed.add(r.node)
            proc.epochs.pop(other.id, None)
    shard.epoch += 1
    shard.moved_ms = now_ms
    step.epoch = shard.epoch
    step.started_ms = now_ms
    step.deadline_ms = _deadline(cluster, shard, now_ms)
    proc.epochs[shard.id] = shard.epoch
    if step.action == "split":
        child = cluster.shards[step.other]
        child.epoch = shard.epoch
        child.moved_ms = now_ms
        proc.epochs[child.id] = child.epoch
    return changed | {r.node for r in shard.replicas}


def _acked(shard: Shard | None, node: str, epoch: int) -> bool:
    rep = shard.replica(node) if shard is not None else None
    return rep is not None and rep.acked >= epoch


def step_complete(cluster: Cluster, step: Step) -> bool:
    """Whether the nodes acknowledged the step's change (a removed replica on a dead node counts as closed)."""
    if step.action == "place":  # every replica on a live node opened its shard
        return all(r.acked >= 1 for s in cluster.shards.values() for r in s.replicas if cluster.live(r.node))
    shard = cluster.shards.get(step.shard)
    match step.action:
        case "add_learner" | "promote" | "transfer_leader":
            return _acked(shard, step.node, step.epoch)
        case "remove":
            closed = step.shard not in cluster.stale.get(step.node, ()) or not cluster.live(step.node)
            return closed and (not step.leader or _acked(shard, step.leader, step.epoch))
        case "split":
            child = cluster.shards.get(step.other)
            return (
                shard is not None
                and child is not None
                and _acked(shard, shard.leader, step.epoch)
                and _acked(child, child.leader, step.epoch)
            )
        case "merge":
            return shard is not None and _acked(shard, shard.leader, step.epoch)
    return False


def roll_back(cluster: Cluster, proc: Procedure, now_ms: int) -> set[str]:
    """Undo what a procedure ended early left half-done: learners it added go (their nodes drop them)."""
    changed: set[str] = set()
    for step in proc.steps:
        if step.action != "add_learner" or not step.started:
            continue
        shard = cluster.shards.get(step.shard)
        rep = shard.replica(step.node) if shard is not None else None
        if shard is None or rep is None or rep.role != "learner":
            continue
        shard.replicas.remove(rep)
        shard.epoch += 1
        shard.moved_ms = now_ms
        cluster.stale.setdefault(step.node, []).append(shard.id)
        changed |= {r.node for r in shard.replicas} | {step.node}
    return changed


def check_limits(cluster: Cluster, running: list[Procedure], op: Operator, now_ms: int) -> None:
    """LimitReached when a scheduler's procedure would pass a schedule limit or the balancing cool-down.

    A manual operator and a failover (a leader on a dead node: TiKV's own election has no PD limit
    either) are not limited; they still take their shard alone."""
    if op.source in ("manual", "failover"):
        return
    klass = limit_class(op)
    n = sum(1 for p in running if p.cluster == cluster.spec.name and limit_class(p.op) == klass)
    if n >= limit_of(cluster, klass):
        raise LimitReached(f"{n} {klass} procedures run in cluster {cluster.spec.name}: its limit is reached")
    if op.source in BALANCING:
        for sid in op.shards:
            moved = cluster.shards[sid].moved_ms if sid in cluster.shards else 0
            if moved and now_ms - moved < cluster.limits.cooldown_s * 1000:
                raise LimitReached(f"shard {sid} changed {(now_ms - moved) / 1000:.0f}s ago: it is cooling down")
