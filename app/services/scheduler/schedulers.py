"""The schedulers, each a pure function of a cluster's applied state: the operators it would start now, and why.

In priority order: failover (leaders off down nodes), repair (replicas back to max_replicas, add
before remove; drained nodes emptied), evict-leader (leaders off draining nodes), affinity and
balance-leader, balance-shard, hot, spread. Each stays inside the schedule limits left, skips busy
and cooling shards and a node whose store limit is spent, and balances only while the spread is
more than one (so a balanced cluster gets no operator: no oscillation).
"""

from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable

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
        self._spent: dict[tuple[str, str], float] = {}  # the store-limit units spent before this round
        self.zone = {n: _zone(cluster, n) for n in cluster.nodes}
        self.online = sorted(n for n, rec in cluster.nodes.items() if rec.state == "online")
        # Replicas and leaders per online node as applied (each pass copies and updates its own).
        self.replicas: Counter[str] = Counter({n: 0 for n in self.online})
        self.leaders: Counter[str] = Counter({n: 0 for n in self.online})
        for s in cluster.shards.values():
            for x in s.replicas:
                if x.node in self.replicas:
                    self.replicas[x.node] += 1
                    if x.role == "leader":
                        self.leaders[x.node] += 1

    def free(self, shard: Shard, source: str) -> bool:
        """Not taken this round nor held by a procedure a `source` one cannot replace, and (for a
        balancing scheduler) not cooling down."""
        holder = self.holders.get(shard.id)
        # Only failover preempts (a leader on a dead node cannot wait); a held shard is otherwise
        # left to its procedure, whose half-done state (a learner, an extra replica) is no repair's business.
        if shard.id in self.busy or (
            holder is not None and (source != "failover" or PRIORITY[holder.op.source] >= PRIORITY[source])
        ):
            return False
        cool = self.c.limits.cooldown_s * 1000
        return not (source in BALANCING and shard.moved_ms and self.now_ms - shard.moved_ms < cool)

    def room(self, node: str, kind: str, shard: Shard) -> bool:
        """Whether the node's store limit has room for one more add or remove of this shard."""
        lim = self.c.limits
        per_min = lim.node_adds_per_min if kind == "add" else lim.node_removes_per_min
        planned = self.adds if kind == "add" else self.removes
        return self.spent(node, kind) + planned[node] + step_cost(self.c, shard) <= per_min

    def has_room(self, node: str, kind: str) -> bool:
        """Whether the node's store limit has room for the cheapest add or remove (a small shard's)."""
        lim = self.c.limits
        per_min = lim.node_adds_per_min if kind == "add" else lim.node_removes_per_min
        planned = self.adds if kind == "add" else self.removes
        return self.spent(node, kind) + planned[node] + min(lim.small_shard_cost, 1.0) <= per_min

    def spent(self, node: str, kind: str) -> float:
        """The units the node spent on `kind` in the minute before now (once a round: the list is long)."""
        got = self._spent.get((node, kind))
        if got is None:
            got = self._spent[(node, kind)] = spent(self.c, node, kind, self.now_ms)
        return got

    def take(self, op: Operator, shard: Shard) -> bool:
        """Record an operator if its limit class and the nodes' store limits have room; whether it was taken."""
        klass = limit_class(op)
        limited = op.source != "failover"  # as in apply (procedures.check_limits)
        if limited and self.left[klass] <= 0:
            return False
        cost = step_cost(self.c, shard)
        adds = op.node_to if op.node_to and op.kind in ("add_replica", "move") else ""
        removes = op.node_from if op.node_from and op.kind in ("remove_replica", "move") else ""
        if removes and not self.c.live(removes):
            removes = ""  # a dead node's replica is dropped without spending its limit
        if (adds and not self.room(adds, "add", shard)) or (removes and not self.room(removes, "remove", shard)):
            return False
        if adds:
            self.adds[adds] += cost  # type: ignore[assignment]  # Counter of floats
        if removes:
            self.removes[removes] += cost  # type: ignore[assignment]
        if limited:
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


def _zone(c: Cluster, node: str) -> str:
    labels = c.nodes[node].spec.labels
    return labels.get("zone") or labels.get("host") or node


def _best_target(c: Cluster, shard: Shard, counts: Counter[str], r: Round) -> str:
    """The online node to take a new replica: not holding it, a zone the shard lacks, fewest replicas."""
    zones = {r.zone[x.node] for x in shard.replicas if c.live(x.node)}
    options = [n for n in counts if shard.replica(n) is None and r.room(n, "add", shard)]
    if not options:
        return ""
    return min(options, key=lambda n: (r.zone[n] in zones, counts[n], n))


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
    counts = r.replicas.copy()
    want = c.spec.max_replicas
    dead_nodes = {n for n in c.nodes if _dead(c, n, r.now_ms)}
    draining_nodes = {n for n, rec in c.nodes.items() if rec.state == "draining"}
    acts = 0
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        dead = [x.node for x in s.replicas if x.node in dead_nodes]
        draining = [x.node for x in s.replicas if x.node in draining_nodes]
        good = len(s.replicas) - len(dead) - len(draining)
        if (good == want and not dead and not draining) or not r.free(s, "repair"):
            continue
        if (
            not dead
            and s.leader in draining_nodes
            and any(x.role == "follower" and c.nodes[x.node].state == "online" for x in s.replicas)
        ):
            continue  # leaders leave a draining node first (evict-leader), then its replicas
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
    if not any(rec.state == "draining" for rec in c.nodes.values()):
        return "no node is draining"
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
    counts = r.leaders.copy()
    moved = 0
    for sid_text, labels in sorted(c.affinity.items()):
        s = c.shards.get(int(sid_text))
        if s is None or not s.leader or _matches(c, s.leader, labels) or not r.free(s, "balance-leader"):
            continue
        fits = [x.node for x in s.replicas if x.role == "follower" and x.node in counts and _matches(c, x.node, labels)]
        if fits:
            to = min(fits, key=lambda n: (counts[n], n))
            if r.take(Operator("transfer_leader", (s.id,), "balance-leader", node_to=to), s):
                if s.leader in counts:
                    counts[s.leader] -= 1
                counts[to] += 1
                moved += 1
    if len(counts) < 2 or max(counts.values()) - min(counts.values()) <= 1:
        return f"{moved} leader transfers (affinity)" if moved else "leader counts are within 1 of each other"
    pinned = {int(k) for k in c.affinity} | set(c.hot_rounds)  # affinity and the hot scheduler place these
    led: dict[str, list[Shard]] = {n: [] for n in counts}
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        if s.leader in led and s.id not in pinned:
            led[s.leader].append(s)
    cursor = dict.fromkeys(counts, 0)
    givers = set(counts)
    while len(counts) > 1 and givers and r.left["leader"] > 0:
        most = min(givers, key=lambda n: (-counts[n], n))
        found = False
        while cursor[most] < len(led[most]):
            s = led[most][cursor[most]]
            cursor[most] += 1
            if s.leader != most or not r.free(s, "balance-leader"):
                continue
            options = [x.node for x in s.replicas if x.role == "follower" and x.node in counts]
            to = min(options, key=lambda n: (counts[n], n), default="")
            if not to or counts[most] - counts[to] <= 1:
                continue
            if r.take(Operator("transfer_leader", (s.id,), "balance-leader", node_to=to), s):
                counts[most] -= 1
                counts[to] += 1
                moved += 1
                found = True
                break
        if not found:
            givers.discard(most)
    while not moved and r.left["leader"] > 0 and max(counts.values()) - min(counts.values()) > 1:
        path = _leader_chain(c, r, counts, pinned)
        if not path or len(path) > r.left["leader"]:
            break
        for s, to in path:  # each hop a different shard: only the ends' counts change
            r.take(Operator("transfer_leader", (s.id,), "balance-leader", node_to=to), s)
        counts[path[0][0].leader] -= 1
        counts[path[-1][1]] += 1
        moved += len(path)
    spread = max(counts.values()) - min(counts.values()) if counts else 0
    return f"{moved} leader transfers" if moved else f"leader counts are within {spread} of each other"


def _leader_chain(c: Cluster, r: Round, counts: Counter[str], pinned: set[int]) -> list[tuple[Shard, str]]:
    """Transfers that carry one leader from the node leading most to one leading at least two fewer
    when no single transfer can: the shortest chain of hops, each a free shard led by one node with
    the next as a follower (the nodes in between give one and take one)."""
    most = max(counts, key=lambda n: (counts[n], n))
    edges: dict[str, list[tuple[Shard, str]]] = {}
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        if s.id in pinned or s.leader not in counts or not r.free(s, "balance-leader"):
            continue
        for x in s.replicas:
            if x.role == "follower" and x.node in counts:
                edges.setdefault(s.leader, []).append((s, x.node))
    came: dict[str, tuple[str, Shard]] = {}
    queue = deque([most])
    while queue:
        u = queue.popleft()
        if counts[most] - counts[u] > 1:
            path: list[tuple[Shard, str]] = []
            while u != most:
                u, hop = came[u][0], (came[u][1], u)
                path.append(hop)
            return path[::-1]
        for s, v in edges.get(u, ()):
            if v != most and v not in came:
                came[v] = (u, s)
                queue.append(v)
    return []


def _keeps_spread(c: Cluster, r: Round, s: Shard, leaving: str, to: str) -> bool:
    """Whether moving the shard's replica from `leaving` to `to` keeps (or widens) the zones it is in."""
    others = {r.zone[x.node] for x in s.replicas if x.node != leaving and c.live(x.node)}
    return r.zone[to] not in others or r.zone[leaving] in others


def balance_shard(c: Cluster, r: Round) -> str:
    """Replica counts within one of each other across online nodes, never narrowing a shard's zones:
    move the biggest shard it can from the fullest node (by count, then bytes held) to the emptiest.

    One pass over each node's shards a round (a cursor per node, not a restart per move): a round on
    10,000 shards stays well under a second however many moves the limits leave room for."""
    if c.spec.topology == "static":
        return "static topology: replicas stay where they were placed"
    counts = r.replicas.copy()
    if len(counts) < 2 or max(counts.values()) - min(counts.values()) <= 1:
        return "replica counts are within 1 of each other"
    by_node: dict[str, list[Shard]] = {n: [] for n in counts}
    for s in sorted(c.shards.values(), key=lambda s: (-c.sizes.get(s.id, 0), s.id)):
        if not r.free(s, "balance-shard"):
            continue
        for x in s.replicas:
            if x.node in by_node:
                by_node[x.node].append(s)
    held = Counter({n: 0 for n in counts})  # bytes per node: among equal counts, the heavier gives first
    for sid, size in c.sizes.items():
        shard = c.shards.get(sid)
        for x in shard.replicas if shard is not None else ():
            if x.node in held:
                held[x.node] += size
    cursor = dict.fromkeys(counts, 0)
    givers = set(counts)  # nodes that may still give a replica this round
    moved = 0
    while len(counts) > 1 and givers and r.left["shard"] > 0:
        most = min(givers, key=lambda n: (-counts[n], -held[n], n))
        takers = sorted(
            (n for n in counts if counts[most] - counts[n] > 1 and r.has_room(n, "add")),
            key=lambda n: (counts[n], held[n], n),
        )
        if not takers:
            break  # no node below the fullest giver by two can take one: none below another giver can
        shards = by_node[most]
        found = False
        while cursor[most] < len(shards) and (not c.live(most) or r.has_room(most, "remove")):
            s = shards[cursor[most]]
            cursor[most] += 1
            if s.id in r.busy or s.replica(most) is None:
                continue
            if c.live(most) and not r.room(most, "remove", s):
                break  # its store limit is spent for this round
            to = next(
                (n for n in takers if s.replica(n) is None and _keeps_spread(c, r, s, most, n) and r.room(n, "add", s)),
                "",
            )
            if to and r.take(Operator("move", (s.id,), "balance-shard", node_from=most, node_to=to), s):
                counts[most] -= 1
                counts[to] += 1
                held[most] -= c.sizes.get(s.id, 0)
                held[to] += c.sizes.get(s.id, 0)
                moved += 1
                found = True
                break
        if not found:
            givers.discard(most)
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
    online = r.online
    zones = {r.zone[n] for n in online}
    if len(zones) < 2:
        return "one zone: nothing to spread"
    if len(set(r.zone.values())) == len(r.zone):
        return "every node is its own zone: replicas are spread"
    counts = r.replicas.copy()
    acts = 0
    for s in sorted(c.shards.values(), key=lambda s: s.id):
        live = [x.node for x in s.replicas if x.node in counts]
        seen = Counter(r.zone[n] for n in live)
        twice = [n for n in live if seen[r.zone[n]] > 1 and s.leader != n]
        if not twice or len(seen) >= len(zones) or not r.free(s, "spread"):
            continue
        options = [n for n in online if r.zone[n] not in seen and r.room(n, "add", s)]
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
