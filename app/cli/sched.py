"""`fleetmate sched ...`: scheduling domains, data nodes, shards, routes, procedures, diagnose and what-if."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from app.cli.api import ApiError, call, subcommands

BASE = "/api/v1/scheduler"


def add_parser(sub: Any) -> None:
    """Add the `sched` command and its subcommands to the top-level subparsers."""
    command = subcommands(
        sub,
        "sched",
        "the shard scheduler: clusters, data nodes, shards, procedures",
        "sched_command",
        "cluster",
        "CLUSTER",
        "the scheduling domain's name",
    )

    create = command("create", "create a scheduling domain")
    create.add_argument("--topology", choices=("dynamic", "static"), default="dynamic")
    create.add_argument("--shards", type=int, default=8, help="shard count (default 8)")
    create.add_argument("--nodes", type=int, default=3, help="node_count: a static cluster is fixed at it (default 3)")
    create.add_argument("--replicas", type=int, default=3, help="max_replicas (default 3)")
    create.add_argument("--local-data", action="store_true", help="shards' data is on the nodes' disks (static only)")
    create.add_argument("--max-down-time", type=float, default=1800.0, help="seconds (default 1800)")
    create.add_argument("--lease", type=float, default=10.0, help="data nodes' default lease, seconds (default 10)")
    create.add_argument("--no-schedule", action="store_true", help="enable_schedule off")
    command("list", "every scheduling domain", with_arg=False)
    command("show", "a domain's settings, nodes by state and what runs")
    command("nodes", "a domain's data nodes")
    shards = command("shards", "the shard table")
    shards.add_argument("--node", help="only shards with a replica on this node")
    for verb, text in (("pause", "pause the balancing schedulers"), ("resume", "resume them")):
        command(verb, text)
    for verb, text in (("freeze", "deploy mode: no procedure starts but leader failover"), ("thaw", "end deploy mode")):
        command(verb, text)
    limits = command("limits", "set schedule limits (PD's names in docs/scheduler.md), e.g. leader=8 shard=64")
    limits.add_argument("pairs", nargs="+", metavar="NAME=VALUE")
    for verb, text in (
        ("drain", "move leaders, then replicas, off a node"),
        ("undrain", "a draining node back online"),
    ):
        p = command(verb, text)
        p.add_argument("node", metavar="NODE")
    rm = command("remove", "remove a node: its replicas are re-created elsewhere")
    rm.add_argument("node", metavar="NODE")
    route = command("route", "which shard holds a key (or --table) and its leader")
    route.add_argument("route_key", nargs="?", metavar="KEY")
    route.add_argument("--table")
    ops = command("procedures", "procedures, newest first")
    ops.add_argument(
        "--status", choices=("created", "started", "success", "canceled", "replaced", "timeout", "expired")
    )
    op = command("operator", "a manual operator: transfer_leader, add_replica, remove_replica, move, split, merge")
    op.add_argument(
        "kind", choices=("transfer_leader", "add_replica", "remove_replica", "move", "split", "merge", "scatter")
    )
    op.add_argument("shards", type=int, nargs="+", metavar="SHARD")
    op.add_argument("--from", dest="node_from", default="", metavar="NODE")
    op.add_argument("--to", dest="node_to", default="", metavar="NODE")
    op.add_argument("--split-key", default="")
    op.add_argument("--targets", default="", metavar="NODE,NODE,...", help="scatter: the nodes, the leader's first")
    cancel = command("cancel", "cancel a procedure", with_arg=False)
    cancel.add_argument("proc", type=int, metavar="ID")
    cancel.add_argument("--reason", default="")
    command("diagnose", "why each scheduler did or did not act")
    wi = command("what-if", "the operators a change would cause, and an ETA; nothing changes")
    wi.add_argument("--down", default="", metavar="NODE,...")
    wi.add_argument("--drain", default="", metavar="NODE,...")
    wi.add_argument("--add", default="", metavar="NODE[@ZONE],...")
    command("drop", "drop a scheduling domain")


def run(args: argparse.Namespace) -> int:
    """Run one `fleetmate sched` subcommand; exit 1 with the server's message on an error."""
    try:
        return _run(args)
    except ApiError as exc:
        print(f"fleetmate: {exc}", file=sys.stderr)
        return 1


def _split(text: str) -> list[str]:
    return [t for t in (p.strip() for p in text.split(",")) if t]


def _limits(args: argparse.Namespace, c: str) -> dict[str, Any]:
    current = call(args, "GET", f"{BASE}/clusters/{c}")["limits"]
    for pair in args.pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in current:
            raise ApiError(f"{pair!r}: give NAME=VALUE with NAME one of {', '.join(current)}")
        try:
            current[key] = type(current[key])(value)
        except ValueError:
            raise ApiError(f"{pair!r}: {value!r} is not a number") from None
    return {"limits": current}


def _run(args: argparse.Namespace) -> int:
    cmd = args.sched_command
    c = getattr(args, "cluster", "")
    base = f"{BASE}/clusters/{c}"
    if cmd == "create":
        body = {
            "name": c,
            "topology": args.topology,
            "shard_count": args.shards,
            "node_count": args.nodes,
            "max_replicas": args.replicas,
            "local_data": args.local_data,
            "max_down_time_s": args.max_down_time,
            "lease_s": args.lease,
            "enable_schedule": not args.no_schedule,
        }
        answer = call(args, "POST", f"{BASE}/clusters", body)
    elif cmd == "list":
        answer = call(args, "GET", f"{BASE}/clusters")
    elif cmd in ("show", "nodes", "diagnose"):
        answer = call(args, "GET", base if cmd == "show" else f"{base}/{cmd}")
    elif cmd == "shards":
        answer = call(args, "GET", f"{base}/shards" + (f"?node={args.node}" if args.node else ""))
    elif cmd in ("pause", "resume", "freeze", "thaw"):
        key = "paused" if cmd in ("pause", "resume") else "frozen"
        answer = call(args, "PATCH", base, {key: cmd in ("pause", "freeze")})
    elif cmd == "limits":
        answer = call(args, "PATCH", base, _limits(args, c))
    elif cmd in ("drain", "undrain"):
        answer = call(args, "POST", f"{base}/nodes/{args.node}/{cmd}", {})
    elif cmd == "remove":
        answer = call(args, "DELETE", f"{base}/nodes/{args.node}")
    elif cmd == "route":
        query = f"table={args.table}" if args.table else f"key={args.route_key or ''}"
        answer = call(args, "GET", f"{base}/route?{query}")
    elif cmd == "procedures":
        answer = call(args, "GET", f"{base}/procedures" + (f"?status={args.status}" if args.status else ""))
    elif cmd == "operator":
        body = {
            "kind": args.kind,
            "shards": args.shards,
            "node_from": args.node_from,
            "node_to": args.node_to,
            "split_key": args.split_key,
            "targets": _split(args.targets),
        }
        answer = call(args, "POST", f"{base}/procedures", body)
    elif cmd == "cancel":
        answer = call(args, "POST", f"{BASE}/procedures/{args.proc}/cancel", {"reason": args.reason})
    elif cmd == "what-if":
        add = [
            {"name": n.partition("@")[0], "labels": {"zone": z} if (z := n.partition("@")[2]) else {}}
            for n in _split(args.add)
        ]
        body = {"down": _split(args.down), "drain": _split(args.drain), "add": add}
        answer = call(args, "POST", f"{base}/what-if", body, 120.0)
    else:
        call(args, "DELETE", base)
        print(f"dropped {c}")
        return 0
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        _print(cmd, answer)
    return 0


def _print(cmd: str, answer: Any) -> None:
    if cmd == "list":
        print(f"{'NAME':20} {'TOPOLOGY':8} {'SHARDS':>6} {'REPLICAS':>8}  {'NODES':24} {'RUNNING':>7}  FLAGS")
        for c in answer:
            nodes = " ".join(f"{k}={v}" for k, v in sorted(c["nodes"].items())) or "-"
            flags = ",".join(f for f in ("paused", "frozen") if c[f]) or ("" if c["enable_schedule"] else "no-schedule")
            print(
                f"{c['name']:20} {c['topology']:8} {c['shards']:>6} {c['max_replicas']:>8}  {nodes:24} "
                f"{c['procedures_running']:>7}  {flags or '-'}"
            )
    elif cmd == "nodes" or cmd in ("drain", "undrain", "remove"):
        rows = answer if isinstance(answer, list) else [answer]
        print(f"{'NODE':20} {'STATE':9} {'REPLICAS':>8} {'LEADERS':>7} {'HEARD':>7}  LABELS")
        for n in rows:
            heard = "-" if n["heard_s_ago"] is None else f"{n['heard_s_ago']:.1f}s"
            labels = ",".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"
            print(f"{n['name']:20} {n['state']:9} {n['replicas']:>8} {n['leaders']:>7} {heard:>7}  {labels}")
    elif cmd == "shards":
        print(f"{'SHARD':>6} {'EPOCH':>6} {'RANGE':19} {'LEADER':16} {'PROC':>5}  REPLICAS")
        for s in answer:
            reps = " ".join(
                f"{r['node']}{'*' if r['role'] == 'leader' else '+' if r['role'] == 'learner' else ''}"
                for r in s["replicas"]
            )
            rng = f"{s['start'] or '-'}..{s['end'] or '-'}"
            print(f"{s['id']:>6} {s['epoch']:>6} {rng:19} {s['leader'] or '-':16} {s['procedure'] or '-':>5}  {reps}")
    elif cmd == "procedures" or cmd in ("operator", "cancel"):
        rows = answer if isinstance(answer, list) else [answer]
        print(f"{'ID':>6} {'KIND':16} {'SHARDS':10} {'SOURCE':14} {'STATUS':9} {'STEP':>5} {'UPDATED':19}  REASON")
        for p in rows:
            updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(p["updated_ms"] / 1000))
            shards = ",".join(str(s) for s in p["op"]["shards"])
            step = f"{p['at'] + 1}/{len(p['steps'])}"
            print(
                f"{p['id']:>6} {p['op']['kind']:16} {shards:10} {p['op']['source']:14} {p['status']:9} {step:>5} "
                f"{updated:19}  {p['reason'] or '-'}"
            )
    elif cmd == "diagnose":
        for v in answer:
            print(f"{v['scheduler']:15} {len(v['operators']):>4} operators  {v['reason']}")
    elif cmd == "what-if":
        print(f"{len(answer['operators'])} operators in {answer['rounds']} rounds, ETA {answer['eta_s']:.0f}s")
        for kind, n in sorted(answer["by_kind"].items()):
            print(f"  {kind:32} {n:>6}")
        print("replicas after: " + " ".join(f"{k}={v}" for k, v in answer["replicas_after"].items()))
        print("leaders after:  " + " ".join(f"{k}={v}" for k, v in answer["leaders_after"].items()))
    elif cmd == "route":
        print(
            f"shard {answer['shard']} epoch {answer['epoch']} [{answer['start'] or '-'}..{answer['end'] or '-'}) "
            f"leader {answer['leader'] or '-'} {answer['leader_address']}  replicas {' '.join(answer['replicas'])}"
        )
    else:
        print(json.dumps(answer, indent=2))
