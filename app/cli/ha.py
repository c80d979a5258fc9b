"""`fleetmate ha ...`: discover, list, topology, history, switchover, failover, rule, downtime, acknowledge, forget."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import msgspec

from app.cli.api import ApiError, call, subcommands
from app.services.ha import topology

DISCOVER_S = 60.0  # discovery probes every instance it finds


def add_parser(sub: Any) -> None:
    """Add the `ha` command and its subcommands to the top-level subparsers."""
    command = subcommands(
        sub,
        "ha",
        "MySQL/MariaDB and PostgreSQL clusters: discovery, topology, failovers",
        "ha_command",
        "name",
        "NAME",
        "the cluster's name",
    )

    disc = command("discover", "register a cluster by discovering it from one instance")
    disc.add_argument("dsn", metavar="DSN", help="mysql://user@host:3306, mariadb://..., postgresql://user@host:5432")
    command("list", "every registered cluster with its primary and findings", with_arg=False)
    command("topology", "a cluster as a tree: the primary and who replicates from whom")
    command("history", "a cluster's detections and recovery steps")
    sw = command("switchover", "hand the primary role to a replica, losing nothing")
    sw.add_argument("--to", metavar="HOST:PORT", help="the replica to promote (default: the best candidate)")
    fo = command("failover", "recover a dead primary now, when its automatic recovery is blocked or off")
    fo.add_argument("--to", metavar="HOST:PORT", help="the replica to promote (default: the best candidate)")
    rule = command("rule", "set an instance's promotion rule")
    rule.add_argument("address", metavar="HOST:PORT")
    rule.add_argument("rule", choices=("prefer", "neutral", "must_not"))
    down = command("downtime", "put an instance in downtime (no recovery of it or onto it); 0 ends it")
    down.add_argument("address", metavar="HOST:PORT")
    down.add_argument("seconds", type=float)
    down.add_argument("--reason", default="")
    ack = command("acknowledge", "acknowledge the last recovery, lifting the anti-flapping block")
    ack.add_argument("--reason", default="")
    command("forget", "stop watching a cluster (its instances are not touched)")


def run(args: argparse.Namespace) -> int:
    """Run one `fleetmate ha` subcommand; exit 1 with the server's message on an error."""
    try:
        return _run(args)
    except ApiError as exc:
        print(f"fleetmate: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    base = "/api/v1/ha/clusters"
    if args.ha_command == "discover":
        answer = call(args, "POST", base, {"name": args.name, "dsn": args.dsn}, DISCOVER_S)
    elif args.ha_command == "list":
        answer = call(args, "GET", base)
    elif args.ha_command == "topology":
        answer = call(args, "GET", f"{base}/{args.name}/topology")
    elif args.ha_command == "history":
        answer = call(args, "GET", f"{base}/{args.name}/history")
    elif args.ha_command == "rule":
        answer = call(args, "PUT", f"{base}/{args.name}/instances/{args.address}/rule", {"rule": args.rule})
    elif args.ha_command == "downtime":
        body = {"seconds": args.seconds, "reason": args.reason}
        answer = call(args, "PUT", f"{base}/{args.name}/instances/{args.address}/downtime", body)
    elif args.ha_command == "acknowledge":
        answer = call(args, "POST", f"{base}/{args.name}/acknowledge", {"reason": args.reason})
    elif args.ha_command == "switchover":
        answer = call(args, "POST", f"{base}/{args.name}/switchover", {"to": args.to}, DISCOVER_S)
    elif args.ha_command == "failover":
        answer = call(args, "POST", f"{base}/{args.name}/failover", {"to": args.to}, DISCOVER_S)
    else:
        answer = call(args, "DELETE", f"{base}/{args.name}")
        print(f"forgot {args.name}")
        return 0
    if args.json:
        print(json.dumps(answer, indent=2))
    elif args.ha_command == "list":
        _print_list(answer)
    elif args.ha_command == "history":
        _print_history(answer)
    elif args.ha_command == "topology":
        print("\n".join(topology.render(msgspec.convert(answer, topology.TopologyTree))))
    else:
        view = call(args, "GET", f"{base}/{args.name}/topology")
        print("\n".join(topology.render(msgspec.convert(view, topology.TopologyTree))))
    return 0


def _print_list(clusters: list[dict[str, Any]]) -> None:
    if not clusters:
        print("no clusters registered")
        return
    print(f"{'NAME':20} {'ENGINE':11} {'PRIMARY':24} {'INSTANCES':>9}  FINDINGS")
    for c in clusters:
        findings = "; ".join(c["findings"]) or "-"
        print(f"{c['name']:20} {c['engine']:11} {c['primary']:24} {c['instances']:>9}  {findings}")


def _print_history(entries: list[dict[str, Any]]) -> None:
    print(f"{'TIME':<19}  {'KIND':12} {'INSTANCE':22} {'TRACE_ID':<32}  MESSAGE")
    for e in entries:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e["at"]))
        trace_id = e.get("trace_id") or "-"
        print(f"{at}  {e['kind']:12} {e['instance'] or '-':22} {trace_id:<32}  {e['message']}")
