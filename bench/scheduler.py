"""Scheduler core at scale: 10,000 shards on 100 simulated nodes, in process (SchedulerState + Simulation).

    python bench/scheduler.py [--shards N] [--nodes N] [--rounds N] [--quick]

  round       one scheduling round (every scheduler on the applied state) on a balanced cluster and on
              one with 10 new empty nodes: p50/p99 wall time over rounds; tracemalloc peak of a round;
              the state's size (msgpack of the cluster)
  balance     10 nodes added: rounds and simulated minutes until replica and leader counts are within
              one of the mean and the schedulers go quiet (PD's cool-down shortened: see cooldown_s)
  repair      a node holding 500 shards' replicas dies (down past max_down_time): simulated time until
              every shard has max_replicas live replicas again, against the budget the store limits imply
              (500 adds at node_adds_per_min on each of the other nodes); must be within budget + 10%
  failover    a node holding shard leaders goes down: rounds until no leader is on it (failover is
              not held to the leader limit, as TiKV's own election is not)
  routes      route lookups a second from one real replica's applied state: REST (wrk, 64
              connections) and NATS request/reply (32 in flight), p50/p99

PD's published defaults are printed beside the figures. Sections are functions of the same shape
(`def section(args) -> dict`) listed in SECTIONS: another one (say, route lookups a second from a
replica over REST) is a function and a line there.

Prints a table and writes bench/results/scheduler.json.
"""

from __future__ import annotations

import argparse
import sys
import time
import tracemalloc
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.services.scheduler.messages import (
    ClusterSpec,
    CreateCluster,
    Limits,
    NodeSpec,
    Place,
    RecordLoad,
    RegisterNode,
    SetNodeState,
)
from app.services.scheduler.model import Cluster
from app.services.scheduler.schedulers import operators, placement
from app.services.scheduler.simulate import Simulation
from app.services.scheduler.state import SchedulerState
from bench.common import percentile, progress, write_result

# pd/server/config (PD v7/v8 defaults): what the same knobs default to in PD.
PD_DEFAULTS = {
    "leader-schedule-limit": 4,
    "region-schedule-limit": 2048,
    "replica-schedule-limit": 64,
    "merge-schedule-limit": 8,
    "hot-region-schedule-limit": 4,
    "store-limit add-peer /min": 15,
    "store-limit remove-peer /min": 15,
    "max-store-down-time": "30m",
}
TICK_MS = 1000  # one scheduling round a simulated second


def cluster(shards: int, nodes: int, limits: Limits, max_down_time_s: float = 1800.0) -> Simulation:
    """A placed cluster "c": `shards` shards of 3 replicas on `nodes` online nodes, and its simulation."""
    state = SchedulerState()
    spec = ClusterSpec("c", "dynamic", shards, nodes, 3, max_down_time_s=max_down_time_s, limits=limits)
    result, _ = state.apply(CreateCluster(spec))
    assert result == "c", result
    for i in range(nodes):
        state.apply(RegisterNode("c", NodeSpec(f"n{i:03d}")))
    sim = Simulation(state)
    result, _ = state.apply(Place("c", placement(state.clusters["c"]), sim.term, sim.now_ms))
    assert result == shards, result
    return sim


def spread(c: Cluster) -> tuple[int, int]:
    """Max - min of replicas and of leaders per online node."""
    reps: Counter[str] = Counter({n: 0 for n, r in c.nodes.items() if r.state == "online"})
    leads: Counter[str] = Counter({n: 0 for n in reps})
    for s in c.shards.values():
        for x in s.replicas:
            if x.node in reps:
                reps[x.node] += 1
                leads[x.node] += x.role == "leader"
    return max(reps.values()) - min(reps.values()), max(leads.values()) - min(leads.values())


def timed_rounds(sim: Simulation, rounds: int) -> list[float]:
    """Wall ms of `rounds` scheduling rounds (operators only, then the simulated nodes catch up)."""
    out = []
    c = sim.state.clusters["c"]
    for _ in range(rounds):
        t0 = time.perf_counter()
        operators(c, sim.state.running("c"), sim.now_ms)
        out.append((time.perf_counter() - t0) * 1000)
        sim.propose("c")
        sim.settle("c")
        sim.now_ms += TICK_MS
    return out


def section_round(args: argparse.Namespace) -> dict[str, Any]:
    """One round's time and memory, balanced and with 10 empty nodes added."""
    progress(f"round: placing {args.shards} shards on {args.nodes} nodes")
    sim = cluster(args.shards, args.nodes, Limits())
    c = sim.state.clusters["c"]
    state_bytes = len(msgspec.msgpack.encode(c))
    balanced = timed_rounds(sim, args.rounds)
    for i in range(args.nodes, args.nodes + 10):
        sim.state.apply(RegisterNode("c", NodeSpec(f"n{i:03d}"), sim.now_ms))
    progress("round: 10 empty nodes added, timing rounds that move replicas")
    moving = timed_rounds(sim, args.rounds)
    tracemalloc.start()
    operators(c, sim.state.running("c"), sim.now_ms)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return {
        "shards": args.shards,
        "nodes": args.nodes,
        "state_bytes": state_bytes,
        "balanced_ms": {"p50": percentile(balanced, 50), "p99": percentile(balanced, 99), "n": len(balanced)},
        "moving_ms": {"p50": percentile(moving, 50), "p99": percentile(moving, 99), "n": len(moving)},
        "round_peak_bytes": peak,
    }


def section_balance(args: argparse.Namespace) -> dict[str, Any]:
    """Rounds and simulated minutes until 10 added nodes hold their share and the schedulers are quiet."""
    limits = Limits(cooldown_s=args.cooldown_s)
    sim = cluster(args.shards, args.nodes, limits)
    c = sim.state.clusters["c"]
    for i in range(args.nodes, args.nodes + 10):
        sim.state.apply(RegisterNode("c", NodeSpec(f"n{i:03d}"), sim.now_ms))
    t0 = time.perf_counter()

    def show(n: int, ops: list[Any]) -> None:
        if n % 60 == 0:
            reps, leads = spread(c)
            progress(f"balance: round {n}, {len(ops)} operators, spread replicas {reps} leaders {leads}")

    rounds = sim.run("c", tick_ms=TICK_MS, max_rounds=args.max_rounds, on_round=show)
    reps, leads = spread(c)
    return {
        "added_nodes": 10,
        "cooldown_s": args.cooldown_s,
        "rounds": rounds,
        "simulated_min": rounds * TICK_MS / 60_000,
        "wall_s": time.perf_counter() - t0,
        "replica_spread": reps,
        "leader_spread": leads,
        "moves": sum(1 for op in sim.started if op.kind == "move"),
        "leader_transfers": sum(1 for op in sim.started if op.kind == "transfer_leader"),
    }


def section_repair(args: argparse.Namespace) -> dict[str, Any]:
    """500 shards' replicas re-created off a dead node, against the store limits' budget."""
    shards = args.shards
    nodes = max(4, shards * 3 // args.repair_shards)  # the victim holds ~repair_shards replicas
    limits = Limits()
    sim = cluster(shards, nodes, limits, max_down_time_s=60)
    c = sim.state.clusters["c"]
    # Every shard at 64 MiB: one store-limit unit an add (PD counts a region below 20 MiB as less).
    sizes = dict.fromkeys(c.shards, 64 << 20)
    sim.state.apply(RecordLoad("c", sizes, dict.fromkeys(c.shards, 1.0), sim.term, sim.now_ms))
    victim = "n000"
    held = [s.id for s in c.shards.values() if s.replica(victim) is not None]
    sim.state.apply(SetNodeState("c", victim, "down", "bench", sim.term, sim.now_ms))
    down_at = sim.now_ms
    sim.now_ms += 60_000  # past max_down_time: repair starts now
    start = sim.now_ms
    cost = 1.0
    # Each add spends `cost` of the target's node_adds_per_min; the other nodes share the adds.
    budget_min = len(held) * cost / (limits.node_adds_per_min * (nodes - 1))
    finished = {"ms": 0}

    def watch(n: int, ops: list[Any]) -> None:
        if not finished["ms"] and all(len([x for x in c.shards[sid].replicas if c.live(x.node)]) >= 3 for sid in held):
            finished["ms"] = sim.now_ms - start
        if n % 30 == 0:
            progress(f"repair: round {n}, {len(sim.state.running('c'))} running")

    t0 = time.perf_counter()
    sim.run("c", tick_ms=TICK_MS, max_rounds=args.max_rounds, on_round=watch)
    took_min = finished["ms"] / 60_000
    budget_min = max(budget_min, TICK_MS / 60_000)
    return {
        "nodes": nodes,
        "shards": shards,
        "replicas_lost": len(held),
        "down_at_ms": down_at,
        "simulated_min": took_min,
        "budget_min": budget_min,
        "within_budget_10pct": took_min <= budget_min * 1.1 + TICK_MS / 60_000,
        "wall_s": time.perf_counter() - t0,
        "note": f"budget = replicas x {cost:g} unit / ({limits.node_adds_per_min:g} adds/min x {nodes - 1} nodes)",
    }


def section_failover(args: argparse.Namespace) -> dict[str, Any]:
    """Rounds until every leader is off a downed node (leader-schedule-limit bounds a round)."""
    sim = cluster(args.shards, args.nodes, Limits())
    c = sim.state.clusters["c"]
    led = [s.id for s in c.shards.values() if s.leader == "n000"]
    sim.state.apply(SetNodeState("c", "n000", "down", "bench", sim.term, sim.now_ms))
    rounds = 0
    while any(c.shards[sid].leader == "n000" for sid in led) and rounds < args.max_rounds:
        sim.propose("c")
        sim.settle("c")
        sim.now_ms += TICK_MS
        rounds += 1
    return {
        "leaders_on_node": len(led),
        "rounds": rounds,
        "simulated_s": rounds * TICK_MS / 1000,
        "leader_limit": c.limits.leader,
    }


def section_routes(args: argparse.Namespace) -> dict[str, Any]:
    """Route lookups a second from one real replica's applied state: REST (wrk, 64 connections) and
    NATS request/reply (fleetmate.sched.route, 32 in flight), on a cluster of `shards` shards."""
    import asyncio
    import random
    import tempfile

    import httpx
    import nats

    from bench.common import ensure_debian_package, run_wrk, summary
    from bench.registry import lua_script
    from tests.harness import Fleetmate

    wrk = ensure_debian_package("wrk", "wrk")
    with tempfile.TemporaryDirectory(prefix="fleetmate-bench-routes-") as tmp:
        fm = Fleetmate(Path(tmp), env={"FLEETMATE_LOG_LEVEL": "warning"}).start(timeout=60)
        try:
            spec = {"name": "r", "shard_count": args.shards, "max_replicas": 3, "lease_s": 3600}
            assert fm.post("/api/v1/scheduler/clusters", spec).status_code == 201
            with httpx.Client(base_url=fm.url, timeout=30) as http:
                for n in range(args.nodes):
                    http.post(
                        "/api/v1/scheduler/clusters/r/nodes", json={"node": f"n{n}", "address": f"10.0.0.{n}:9000"}
                    )
            deadline = time.monotonic() + 60
            while not fm.get("/api/v1/scheduler/clusters/r").json()["placed"]:
                assert time.monotonic() < deadline, "placement"
                time.sleep(0.2)
            rng = random.Random(7)
            keys = [f"{rng.getrandbits(32):08x}" for _ in range(1000)]
            script = Path(tmp) / "route.lua"
            script.write_text(
                lua_script("GET", [f"/api/v1/scheduler/clusters/r/route?key={k}" for k in keys], None, [""], "")
            )
            duration = 3.0 if args.quick else 10.0
            rest = run_wrk(wrk, fm.url, str(script), 64, duration)
            rest.pop("raw", None)

            async def over_nats() -> dict[str, Any]:
                ready = next(line for line in fm.lines if line.get("msg") == "fleetmate ready")
                nc = await nats.connect(ready["nats"])
                lat: list[float] = []
                stop = time.monotonic() + duration

                async def asker() -> None:
                    while time.monotonic() < stop:
                        body = msgspec.json.encode({"cluster": "r", "key": rng.choice(keys)})
                        t0 = time.perf_counter()
                        await nc.request("fleetmate.sched.route", body, timeout=5)
                        lat.append((time.perf_counter() - t0) * 1000)

                t0 = time.monotonic()
                await asyncio.gather(*(asker() for _ in range(32)))
                took = time.monotonic() - t0
                await nc.close()
                return {"ops_s": round(len(lat) / took, 1), "latency_ms": summary(lat)}

            nats_result = asyncio.run(over_nats())
        finally:
            fm.stop()
    return {"shards": args.shards, "nodes": args.nodes, "rest": rest, "nats": nats_result}


SECTIONS: dict[str, Callable[[argparse.Namespace], dict[str, Any]]] = {
    "round": section_round,
    "balance": section_balance,
    "repair": section_repair,
    "failover": section_failover,
    "routes": section_routes,
}


def table(results: dict[str, Any]) -> str:
    """The figures and PD's defaults beside them."""
    r, b, p, f = (results.get(k, {}) for k in ("round", "balance", "repair", "failover"))
    rows = []
    if r:
        rows += [
            (
                f"round, balanced ({r['shards']} shards, {r['nodes']} nodes)",
                f"p50 {r['balanced_ms']['p50']:.0f} ms, p99 {r['balanced_ms']['p99']:.0f} ms",
                "",
            ),
            (
                "round, moving (10 nodes added)",
                f"p50 {r['moving_ms']['p50']:.0f} ms, p99 {r['moving_ms']['p99']:.0f} ms",
                "",
            ),
            (
                "round peak memory / state size",
                f"{r['round_peak_bytes'] / 2**20:.1f} MiB / {r['state_bytes'] / 2**20:.1f} MiB",
                "",
            ),
        ]
    if b:
        rows.append(
            (
                f"balance after +10 nodes (cooldown {b['cooldown_s']:g}s)",
                f"{b['rounds']} rounds = {b['simulated_min']:.1f} sim min, {b['moves']} moves, "
                f"spread {b['replica_spread']}/{b['leader_spread']}",
                "region-schedule-limit 2048, store limit 15/min",
            )
        )
    if p:
        rows.append(
            (
                f"repair {p['replicas_lost']} replicas off a dead node",
                f"{p['simulated_min']:.2f} sim min (budget {p['budget_min']:.2f}, ok={p['within_budget_10pct']})",
                "replica-schedule-limit 64, max-store-down-time 30m",
            )
        )
    if f:
        rows.append(
            (
                f"failover of {f['leaders_on_node']} leaders",
                f"{f['rounds']} rounds ({f['simulated_s']:.0f} sim s)",
                "(TiKV elects leaders itself)",
            )
        )
    routes = results.get("routes", {})
    if routes:
        rest, nats_ = routes["rest"], routes["nats"]
        rows += [
            (
                f"route lookups, REST ({routes['shards']} shards, 64 conns)",
                f"{rest['ops_s']:,.0f}/s, p50 {rest['p50_ms']:.2f} ms, p99 {rest['p99_ms']:.2f} ms, "
                f"non-2xx {rest['non2xx']}",
                "",
            ),
            (
                "route lookups, NATS request/reply (32 in flight)",
                f"{nats_['ops_s']:,.0f}/s, p50 {nats_['latency_ms']['p50']:.2f} ms, "
                f"p99 {nats_['latency_ms']['p99']:.2f} ms",
                "",
            ),
        ]
    width = max(len(x[0]) for x in rows) if rows else 0
    lines = [f"{'measure':<{width}}  {'fleetmate':<60}  PD default", "-" * (width + 80)]
    lines += [f"{a:<{width}}  {b_:<60}  {c_}" for a, b_, c_ in rows]
    lines.append("PD defaults: " + ", ".join(f"{k} {v}" for k, v in PD_DEFAULTS.items()))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shards", type=int, default=10_000)
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=30, help="timed rounds per case")
    ap.add_argument("--repair-shards", type=int, default=500, help="replicas on the node that dies")
    ap.add_argument("--cooldown-s", type=float, default=0.0, help="the balance case's cool-down (PD: none)")
    ap.add_argument("--max-rounds", type=int, default=20_000)
    ap.add_argument("--only", choices=sorted(SECTIONS), action="append", help="run these sections only")
    ap.add_argument("--quick", action="store_true", help="1,000 shards on 20 nodes, 10 rounds (a smoke run)")
    args = ap.parse_args()
    if args.quick:
        args.shards, args.nodes, args.rounds = 1000, 20, 10
    results: dict[str, Any] = {}
    for name, run in SECTIONS.items():
        if args.only and name not in args.only:
            continue
        progress(f"section {name}")
        results[name] = run(args)
    print(table(results))
    path = write_result("scheduler-quick" if args.quick else "scheduler", {"pd_defaults": PD_DEFAULTS, **results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
