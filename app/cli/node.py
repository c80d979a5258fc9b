"""`fleetmate node list|show|scan|clean|ports|maintenance|remove`: membership over the REST API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from app.cli.api import ApiError, call, subcommands

SLOW_S = 60.0  # scans and cleanups run on the host


def add_parser(sub: Any) -> None:
    """Add the `node` command and its subcommands to the top-level subparsers."""
    command = subcommands(
        sub,
        "node",
        "nodes (agents and replicas): states, facts, agent requests",
        "node_command",
        "node_id",
        "ID",
        "the node id",
    )

    lst = command("list", "every node with its state", with_arg=False)
    lst.add_argument("--state", choices=("online", "suspect", "down", "maintenance"), help="only nodes in this state")
    command("show", "a node's state, labels, facts and state history")
    command("scan", "ask the node's agent to scan installed database engines")
    clean = command("clean", "ask the node's agent to run its log cleanup")
    clean.add_argument("--dry-run", action="store_true", help="only report what would be deleted")
    clean.add_argument("--rule", help="run only this rule (default: all)")
    ports = command("ports", "listening ports, or free ports in a range")
    ports.add_argument("--free", metavar="START-END", help="find free ports in this range, e.g. 3306-3400")
    ports.add_argument("--count", type=int, default=1, metavar="N", help="how many free ports (default 1)")
    ports.add_argument("--proto", choices=("tcp", "udp"), default="tcp")
    mnt = command("maintenance", "put a node in maintenance (no state alarms) or take it out")
    mnt.add_argument("mode", choices=("on", "off"))
    mnt.add_argument("--reason", default="", help="why (kept in the node's state and history)")
    rm = command("remove", "forget a node (its agent, if it still runs, registers it again)")
    rm.add_argument("--reason", default="", help="why")


def _ago(now: float, t: float) -> str:
    if not t:
        return "-"
    secs = max(0.0, now - t)
    if secs < 120:
        return f"{secs:.1f}s"
    if secs < 7200:
        return f"{secs / 60:.0f}m"
    return f"{secs / 3600:.0f}h"


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"


def _table(nodes: list[dict[str, Any]]) -> None:
    now = time.time()
    print(f"{'node':<24}{'kind':<9}{'state':<13}{'since':>8}{'seen':>8}  {'labels':<30}reason")
    for n in nodes:
        print(
            f"{n['node_id']:<24}{n['kind']:<9}{n['state']:<13}{_ago(now, n['since']):>8}{_ago(now, n['last_seen']):>8}"
            f"  {_labels(n['labels']):<30}{n['reason']}"
        )


def _show(detail: dict[str, Any]) -> None:
    n = detail["node"]
    now = time.time()
    print(f"node:      {n['node_id']} ({n['kind']})")
    print(f"state:     {n['state']} for {_ago(now, n['since'])} ({n['reason']})")
    print(f"last seen: {_ago(now, n['last_seen'])} ago")
    print(f"labels:    {_labels(n['labels'])}")
    for name, value in sorted(detail["facts"].items()):
        text = json.dumps(value, sort_keys=True)
        print(f"{name + ':':<11}{text if len(text) <= 100 else text[:97] + '...'}")
    print("history:")
    print(f"  {'TIME':<19}  {'FROM':>11}    {'TO':<12}{'TRACE_ID':<32}  REASON")
    for h in detail["history"]:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(h["at"]))
        trace_id = h.get("trace_id") or "-"
        print(f"  {when}  {h['old'] or '-':>11} -> {h['state']:<12}{trace_id:<32}  {h['reason']}")


def _free_ports(answer: Any) -> None:
    ports = answer.get("ports") if isinstance(answer, dict) else None
    if isinstance(ports, list) and all(isinstance(p, int) for p in ports):
        print(" ".join(str(p) for p in ports) if ports else "(no free port in the range)")
    else:
        print(json.dumps(answer, indent=2, sort_keys=True))


def _listening(answer: Any) -> None:
    ports = answer.get("ports") if isinstance(answer, dict) else None
    if not isinstance(ports, list) or not all(isinstance(p, dict) for p in ports):
        print(json.dumps(answer, indent=2, sort_keys=True))
        return
    print(f"{'proto':<7}{'address':<28}{'port':>6}  {'pid':>7}  process")
    for p in ports:
        print(
            f"{p.get('proto', ''):<7}{p.get('address', ''):<28}{p.get('port', ''):>6}  "
            f"{p.get('pid') or '-':>7}  {p.get('process') or '-'}"
        )


def run(args: argparse.Namespace) -> int:
    """Run one `fleetmate node` subcommand; 0 on success, 1 when the server refused."""
    try:
        return _run(args)
    except ApiError as exc:
        print(f"fleetmate: {exc}", file=sys.stderr)
        return 1


def _run(args: argparse.Namespace) -> int:
    from urllib.parse import quote, urlencode

    cmd = args.node_command
    base = "/api/v1/nodes"
    path = f"{base}/{quote(args.node_id, safe='')}" if cmd != "list" else base
    answer: Any
    if cmd == "list":
        answer = call(args, "GET", base + (f"?state={args.state}" if args.state else ""))
    elif cmd == "show":
        answer = call(args, "GET", path)
    elif cmd == "scan":
        answer = call(args, "POST", path + "/scan", timeout=SLOW_S + 5)
    elif cmd == "clean":
        answer = call(args, "POST", path + "/clean", {"dry_run": args.dry_run, "rule": args.rule}, SLOW_S + 5)
    elif cmd == "ports":
        query: dict[str, Any] = {"proto": args.proto}
        if args.free is not None:
            query.update(free=args.free, count=args.count)
        answer = call(args, "GET", f"{path}/ports?{urlencode(query)}")
    elif cmd == "maintenance":
        answer = call(args, "PUT", path + "/maintenance", {"on": args.mode == "on", "reason": args.reason})
    elif cmd == "remove":
        answer = call(args, "DELETE", path + (f"?{urlencode({'reason': args.reason})}" if args.reason else ""))
    else:
        return 2
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif cmd == "list":
        _table(answer)
    elif cmd == "show":
        _show(answer)
    elif cmd in ("maintenance", "remove"):
        _table([answer])
    elif cmd == "ports":
        (_free_ports if args.free is not None else _listening)(answer["answer"])
    else:
        print(json.dumps(answer["answer"], indent=2, sort_keys=True))
    return 0
