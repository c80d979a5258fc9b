"""The schedulers, each a pure function of a cluster's applied state: the operators it would start now, and why.

In priority order: failover (leaders off down nodes), repair (replicas back to max_replicas, add
before remove; drained nodes emptied), evict-leader (leaders off draining nodes), affinity and
balance-leader, balance-shard, hot, spread. Each stays inside the schedule limits left, skips busy
and cooling shards and a node whose store limit is spent, and balances only while the spread is
more than one (so a balanced cluster gets no operator: no oscillation).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterable

import msgspec

from app.services.scheduler.messages import Operator
from app.services.scheduler.model import Cluster, Procedure, Shard
from app.services.scheduler.procedures import BALANCING, PRIORITY, limit_class, limit_of, spent, step_cost

SCHEDULERS = ("failover", "repair", "evict-leader", "balance-leader", "balance-shard", "hot", "spread")


class Verdict(msgspec.Struct):
    """What one scheduler would do now and why (GET .../diagnose)."""

    scheduler: str
    operators: list[Operator]
    reason: str


class Round:
    """One round's bookkeeping: limits left per class, shards taken, store-limit units left per node."""

    def __init__(self, cluster: Cluster, running: list[Procedure], now_ms: int) -> None:
        self.c = cluster
        self.now_ms = now_ms
        self.holders = {sid: p for p in running for sid in (*p.epochs, *p.op.shards)}
        self.busy: set[int] = set()  # taken this round
        used = Counter(limit_class(p.op) for p in running)
        self.left = {k: limit_of(cluster, k) - used[k] for k in ("leader", "shard", "replica", "merge", "hot")}
        self.adds: Counter[str] = Counter()
        self.removes: Counter[str] = Counter()
        self.out: list[Operator] = []

    def free(self, shard: Shard, source: str) -> bool:
        """Not taken this round nor held by a procedure a `source` one cannot replace, and (for a
        balancing scheduler) not cooling down."""
        holder = self.holders.get(shard.id)
        if shard.id in self.busy or (holder is not None and PRIORITY[holder.op.source] >= PRIORITY[source]):
            return False
        cool = self.c.limits.cooldown_s * 1000
        return not (source in BALANCING and shard.moved_ms and self.now_ms - shard.moved_ms < cool)

    def room(self, node: str, kind: str, shard: Shard) -> bool:
        """Whether the node's store limit has room for one more add or remove of this shard."""
        lim = self.c.limits
        per_min = lim.node_adds_per_min if kind == "add" else lim.node_removes_per_min
        planned = self.adds if kind == "add" else self.removes
        return spent(self.c, node, kind, self.now_ms) + planned[node] + step_cost(self.c, shard) <= per_min

    def take(self, op: Operator, shard: Shard) -> bool:
        """Record an operator if its limit class has room; whether it was taken."""
        klass = limit_class(op)
        if self.left[klass] <= 0:
            return False
        cost = step_cost(self.c, shard)
        if op.node_to and op.kind in ("add_replica", "move"):
            if not self.room(op.node_to, "add", shard):
                return False
            self.adds[op.node_to] += cost  # type: ignore[assignment]  # Counter of floats
        if op.node_from and op.kind in ("remove_replica", "move") and self.c.live(op.node_from):
            if not self.room(op.node_from, "remove", shard):
                return False
            self.removes[op.node_from] += cost  # type: ignore[assignment]
        self.left[klass] -= 1
        self.busy.add(shard.id)
        self.out.append(op)
        return True


def _online(c: Cluster) -> list[str]:
    return sorted(n for n, r in c.nodes.items() if r.state == "online")


def _dead(c: Cluster, node: str, now_ms: int) -> bool:
    """A replica on this node is to be replaced: removed, or down longer than max_down_time."""
    rec = c.nodes.get(node)
    if rec is None or rec.state == "removed":
        return True
    return rec.state == "down" and now_ms - rec.down_ms >= c.max_down_time_s * 1000


def _counts(c: Cluster, nodes: Iterable[str], pick: Callable[[Shard], Iterable[str]]) -> Counter[str]:
    counts: Counter[str] = Counter({n: 0 for n in nodes})
    for s in c.shards.values():
        for n in pick(s):
            if n in counts:
                counts[n] += 1
    return counts


def _zone(c: Cluster, node: str) -> str:
    labels = c.nodes[node].spec.labels
    return labels.get("zone") or labels.get("host") or node


def _best_target(c: Cluster, shard: Shard, counts: Counter[str], r: Round) -> str:
    """The online node to take a new replica: not holding it, a zone the shard lacks, fewest replicas."""
    zones = {_zone(c, x.node) for x in shard.replicas if c.live(x.node)}
    options = [n for n in counts if shard.replica(n) is None and r.room(n, "add", shard)]
    if not options:
        return ""
    return min(options, key=lambda n: (_zone(c, n) in zones, counts[n], n))


def failover(c: Cluster, r: Round) -> str:
    """Leaders on down nodes go to the best online follower (HoraeMeta/PD move them at once)."""
    n = 0
    for s in c.shards.values():
        leader = s.leader
        if leader and c.nodes.get(leader) and c.nodes[leader].state in ("online", "suspect", "draining"):
            continue
        if not s.replicas or not r.free(s, "failover"):
            continue
        options = [x for x in s.replicas if x.role == "follower" and c.nodes[x.node].state == "online"]
        if not options:
            continue
        to = max(options, key=lambda x: (x.acked, x.node)).node
        n += r.take(Operator("transfer_leader", (s.id,), "failover", node_to=to), s)
    return f"{n} leaders moved off down nodes" if n else "every leader is on a live node"


def repair(c: Cluster, r: Round) -> str:
    """Replicas back to max_replicas: add a new one first, remove the dead one once it is in; drain nodes."""
    if c.spec.topology == "static":
        return "static topology: replicas are not re-created elsewhere"
    counts = _counts(c, _online(c), lambda s: (x.node for x in s.replicas))
    want = c.spec.max_replicas
    acts = 0
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        if not r.free(s, "repair"):
            continue
        dead = [x.node for x in s.replicas if _dead(c, x.node, r.now_ms)]
        draining = [x.node for x in s.replicas if c.nodes.get(x.node) and c.nodes[x.node].state == "draining"]
        good = len(s.replicas) - len(dead) - len(draining)
        if good < want:
            to = _best_target(c, s, counts, r)
            if to:
                if draining and not dead and good + len(draining) >= want:
                    op = Operator("move", (s.id,), "repair", node_from=draining[0], node_to=to)
                else:
                    op = Operator("add_replica", (s.id,), "repair", node_to=to)
                if r.take(op, s):
                    counts[to] += 1
                    acts += 1
                continue
        if dead and len(s.replicas) > 1 and good >= min(want, 1):
            acts += r.take(Operator("remove_replica", (s.id,), "repair", node_from=dead[0]), s)
        elif (good > want or (draining and good >= want)) and len(s.replicas) > 1:
            # A surplus replica: a draining node's first, then one on a node not online (down, suspect:
            # removing a live one would lower the live count), then the fullest node's.
            extra = max(
                (x.node for x in s.replicas if x.role != "leader"),
                key=lambda n: (n in draining, c.nodes[n].state != "online", counts.get(n, 0), n),
                default="",
            )
            if extra:
                acts += r.take(Operator("remove_replica", (s.id,), "repair", node_from=extra), s)
    return f"{acts} repairs" if acts else f"every shard has {want} good replicas (or no node can take one)"


def evict_leader(c: Cluster, r: Round) -> str:
    """Leaders off draining nodes, to an online follower."""
    n = 0
    for s in c.shards.values():
        leader = s.leader
        rec = c.nodes.get(leader) if leader else None
        if rec is None or rec.state != "draining" or not r.free(s, "evict-leader"):
            continue
        options = sorted(x.node for x in s.replicas if x.role == "follower" and c.nodes[x.node].state == "online")
        if options:
            n += r.take(Operator("transfer_leader", (s.id,), "evict-leader", node_to=options[0]), s)
    return f"{n} leaders evicted from draining nodes" if n else "no leader on a draining node"


def _matches(c: Cluster, node: str, labels: dict[str, str]) -> bool:
    have = c.nodes[node].spec.labels
    return all(have.get(k) == v for k, v in labels.items())


def balance_leader(c: Cluster, r: Round) -> str:
    """Leaders where affinity asks, then leader counts within one of each other across online nodes."""
    online = _online(c)
    counts = _counts(c, online, lambda s: (s.leader,) if s.leader else ())
    moved = 0
    for sid_text, labels in sorted(c.affinity.items()):
        s = c.shards.get(int(sid_text))
        if s is None or not s.leader or _matches(c, s.leader, labels) or not r.free(s, "balance-leader"):
            continue
        fits = [x.node for x in s.replicas if x.role == "follower" and x.node in counts and _matches(c, x.node, labels)]
        if fits:
            to = min(fits, key=lambda n: (counts[n], n))
            if r.take(Operator("transfer_leader", (s.id,), "balance-leader", node_to=to), s):
                counts[s.leader] -= 1
                counts[to] += 1
                moved += 1
    pinned = {int(k) for k in c.affinity} | set(c.hot_rounds)  # affinity and the hot scheduler place these
    led: dict[str, list[Shard]] = {n: [] for n in counts}
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        if s.leader in led and s.id not in pinned:
            led[s.leader].append(s)
    progress = True
    while progress and len(counts) > 1:
        progress = False
        for most in sorted(counts, key=lambda n: (-counts[n], n)):
            for s in led[most]:
                if s.leader != most or not r.free(s, "balance-leader"):
                    continue
                options = [x.node for x in s.replicas if x.role == "follower" and x.node in counts]
                to = min(options, key=lambda n: (counts[n], n), default="")
                if not to or counts[most] - counts[to] <= 1:
                    continue
                if not r.take(Operator("transfer_leader", (s.id,), "balance-leader", node_to=to), s):
                    return f"{moved} leader transfers (limit reached)"
                counts[most] -= 1
                counts[to] += 1
                moved += 1
                progress = True
                break
            if progress:
                break
    spread = max(counts.values()) - min(counts.values()) if counts else 0
    return f"{moved} leader transfers" if moved else f"leader counts are within {spread} of each other"


def _keeps_spread(c: Cluster, s: Shard, leaving: str, to: str) -> bool:
    """Whether moving the shard's replica from `leaving` to `to` keeps (or widens) the zones it is in."""
    others = {_zone(c, x.node) for x in s.replicas if x.node != leaving and c.live(x.node)}
    return _zone(c, to) not in others or _zone(c, leaving) in others


def balance_shard(c: Cluster, r: Round) -> str:
    """Replica counts within one of each other across online nodes, never narrowing a shard's zones:
    move from the fullest node that can give one to the emptiest that can take it."""
    if c.spec.topology == "static":
        return "static topology: replicas stay where they were placed"
    online = _online(c)
    counts = _counts(c, online, lambda s: (x.node for x in s.replicas))
    by_node: dict[str, list[Shard]] = {n: [] for n in online}
    for s in sorted(c.shards.values(), key=lambda s: (-c.sizes.get(s.id, 0), s.id)):
        for x in s.replicas:
            if x.node in by_node:
                by_node[x.node].append(s)
    moved = 0
    progress = True
    while progress and len(counts) > 1:
        progress = False
        for most in sorted(counts, key=lambda n: (-counts[n], n)):
            takers = sorted((n for n in counts if counts[most] - counts[n] > 1), key=lambda n: (counts[n], n))
            if not takers:
                break
            for s in by_node[most]:
                if s.replica(most) is None or not r.free(s, "balance-shard"):
                    continue
                to = next((n for n in takers if s.replica(n) is None and _keeps_spread(c, s, most, n)), "")
                if not to:
                    continue
                if not r.take(Operator("move", (s.id,), "balance-shard", node_from=most, node_to=to), s):
                    continue
                counts[most] -= 1
                counts[to] += 1
                moved += 1
                progress = True
                break
            if progress:
                break
    spread = max(counts.values()) - min(counts.values()) if counts else 0
    if moved:
        return f"{moved} replica moves"
    return f"replica counts are within {spread} of each other (or zones hold them)"


def hot(c: Cluster, r: Round) -> str:
    """A hot shard's leader goes to the follower whose node leads the fewest hot shards, or the shard splits."""
    if not c.hot_rounds:
        return "no hot shard"
    hot_leaders = Counter(c.shards[s].leader for s in c.hot_rounds if s in c.shards)
    acts = 0
    for sid in sorted(c.hot_rounds, key=lambda s: (-c.load.get(s, 0.0), s)):
        s = c.shards.get(sid)
        if s is None or not r.free(s, "hot"):
            continue
        options = [x.node for x in s.replicas if x.role == "follower" and c.nodes[x.node].state == "online"]
        cooler = [n for n in options if hot_leaders[n] + 1 < hot_leaders[s.leader]]
        if cooler:
            to = min(cooler, key=lambda n: (hot_leaders[n], n))
            if r.take(Operator("transfer_leader", (sid,), "hot", node_to=to), s):
                hot_leaders[s.leader] -= 1
                hot_leaders[to] += 1
                acts += 1
        elif c.spec.topology == "dynamic" and c.hot_rounds[sid] >= 2:
            acts += r.take(Operator("split", (sid,), "hot"), s)
    return f"{acts} hot-shard operators" if acts else "hot shards are spread as far as they go"


def spread(c: Cluster, r: Round) -> str:
    """A shard's replicas in distinct zones (label zone, else host) when a node in another zone can take one."""
    if c.spec.topology == "static":
        return "static topology"
    online = _online(c)
    zones = {_zone(c, n) for n in online}
    if len(zones) < 2:
        return "one zone: nothing to spread"
    counts = _counts(c, online, lambda s: (x.node for x in s.replicas))
    acts = 0
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        live = [x.node for x in s.replicas if x.node in counts]
        seen = Counter(_zone(c, n) for n in live)
        twice = [n for n in live if seen[_zone(c, n)] > 1 and s.leader != n]
        if not twice or len(seen) >= len(zones) or not r.free(s, "spread"):
            continue
        options = [n for n in online if _zone(c, n) not in seen and r.room(n, "add", s)]
        if options:
            to = min(options, key=lambda n: (counts[n], n))
            if r.take(Operator("move", (s.id,), "spread", node_from=twice[0], node_to=to), s):
                counts[to] += 1
                counts[twice[0]] -= 1
                acts += 1
    return f"{acts} moves to spread zones" if acts else "replicas are spread across zones"


PASSES: tuple[tuple[str, Callable[[Cluster, Round], str]], ...] = (
    ("failover", failover),
    ("repair", repair),
    ("evict-leader", evict_leader),
    ("balance-leader", balance_leader),
    ("balance-shard", balance_shard),
    ("hot", hot),
    ("spread", spread),
)


def diagnose(c: Cluster, running: list[Procedure], now_ms: int) -> list[Verdict]:
    """Every scheduler's operators for this round and why it did or did not act, in priority order."""
    if not c.placed:
        return [Verdict(name, [], "the cluster is not placed yet") for name, _ in PASSES]
    r = Round(c, running, now_ms)
    out: list[Verdict] = []
    for name, run in PASSES:
        before = len(r.out)
        if not c.enable_schedule:
            reason = "enable_schedule is off"
        elif c.frozen and name != "failover":
            reason = "the cluster is frozen (deploy mode)"
        elif c.paused and name not in ("failover", "repair"):
            reason = "scheduling is paused"
        else:
            reason = run(c, r)
        out.append(Verdict(name, r.out[before:], reason))
    return out


def operators(c: Cluster, running: list[Procedure], now_ms: int) -> list[Operator]:
    """The operators every scheduler would start this round, in priority order."""
    return [op for v in diagnose(c, running, now_ms) for op in v.operators]


def placement(c: Cluster) -> tuple[tuple[str, ...], ...]:
    """The first placement of a cluster's shards on its online nodes: replicas and leaders round-robin, zones spread."""
    nodes = sorted(_online(c), key=lambda n: (_zone(c, n), n))
    if not nodes:
        return ()
    # Interleave zones so consecutive picks land in different zones.
    by_zone: dict[str, list[str]] = {}
    for n in nodes:
        by_zone.setdefault(_zone(c, n), []).append(n)
    ring: list[str] = []
    while any(by_zone.values()):
        for z in sorted(by_zone):
            if by_zone[z]:
                ring.append(by_zone[z].pop(0))
    k = min(c.spec.max_replicas, len(ring))
    return tuple(tuple(ring[(i + j) % len(ring)] for j in range(k)) for i in range(len(c.shards)))
