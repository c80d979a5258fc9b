"""`fleetmate kv ...`: get, put, del, scan, shards and split on the sharded KV store."""

from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
from typing import Any

from app.cli.api import ApiError, call, subcommands

BASE = "/api/v1/kv"


def add_parser(sub: Any) -> None:
    """Add the `kv` command and its subcommands to the top-level subparsers."""
    command = subcommands(
        sub, "kv", "the sharded KV store: keys, scans, shards", "kv_command", "kv_key", "KEY", "the key"
    )
    get = command("get", "a key's value (and with --json its revision, version)")
    get.add_argument("--serializable", action="store_true", help="the holder's copy at once, no read barrier")
    put = command("put", "set a key")
    put.add_argument("value", metavar="VALUE")
    put.add_argument("--if-revision", type=int, default=-1, help="compare-and-set: 0 only if absent, N only at N")
    rm = command("del", "delete a key")
    rm.add_argument("--if-revision", type=int, default=-1, help="delete only this revision of the key")
    scan = command("scan", "keys from START (or with --prefix) in order", with_arg=False)
    scan.add_argument("start", nargs="?", default="", metavar="START")
    scan.add_argument("end", nargs="?", default="", metavar="END")
    scan.add_argument("--prefix", default="")
    scan.add_argument("--limit", type=int, default=100, help="at most this many keys (default 100)")
    shards = command("shards", "the shards: range, partition, holders, size", with_arg=False)
    shards.add_argument("--local", action="store_true", help="only those the replica asked holds")
    split = command("split", "split a shard (at its middle key unless --at)", with_arg=False)
    split.add_argument("shard", type=int, metavar="SHARD")
    split.add_argument("--at", default="", metavar="KEY", help="the first key of the new shard")


def run(args: argparse.Namespace) -> int:
    """Run one `fleetmate kv` subcommand; exit 1 with the server's message on an error (get: 1 when absent)."""
    try:
        return _run(args)
    except ApiError as exc:
        print(f"fleetmate: {exc}", file=sys.stderr)
        return 1


def _q(**params: Any) -> str:
    return urllib.parse.urlencode({k: v for k, v in params.items() if v not in ("", None, False)})


def _run(args: argparse.Namespace) -> int:
    cmd = args.kv_command
    if cmd == "get":
        answer = call(args, "GET", f"{BASE}/get?" + _q(key=args.kv_key, serializable=str(args.serializable).lower()))
        print(json.dumps(answer, indent=2) if args.json else answer["value"])
        return 0
    if cmd == "put":
        answer = call(
            args, "POST", f"{BASE}/put", {"key": args.kv_key, "value": args.value, "if_revision": args.if_revision}
        )
    elif cmd == "del":
        answer = call(args, "POST", f"{BASE}/delete", {"key": args.kv_key, "if_revision": args.if_revision})
    elif cmd == "scan":
        answer = call(
            args, "GET", f"{BASE}/scan?" + _q(start=args.start, end=args.end, prefix=args.prefix, limit=args.limit)
        )
    elif cmd == "shards":
        answer = call(args, "GET", f"{BASE}/shards?" + _q(local=str(args.local).lower()))
    else:
        answer = call(args, "POST", f"{BASE}/shards/{args.shard}/split", {"key": args.at})
    if args.json:
        print(json.dumps(answer, indent=2))
    else:
        _print(cmd, answer)
    return 0


def _print(cmd: str, answer: Any) -> None:
    if cmd in ("put", "del"):
        extra = f" deleted={answer['deleted']}" if cmd == "del" else ""
        print(f"revision={answer['revision']} shard={answer['shard']}{extra}")
    elif cmd == "scan":
        for item in answer["items"]:
            print(f"{item['key']}\t{item['value']}")
        if answer["more"]:
            print(f"# more: go on from {answer['next']!r}", file=sys.stderr)
    elif cmd == "shards":
        print(f"{'SHARD':>6} {'PART':>4} {'EPOCH':>5} {'RANGE':24} {'SIZE':>10} {'LEADER':14} HOLDERS")
        for s in answer:
            rng = f"{s['start'] or '-'}..{s['end'] or '-'}"
            holders = " ".join(f"{h['node']}{'*' if h['role'] == 'leader' else ''}" for h in s["holders"])
            size = s["local_size"] if s["held_here"] else s["size"]
            leader = s["leader"] or "-"
            print(f"{s['id']:>6} {s['partition']:>4} {s['epoch']:>5} {rng:24} {size:>10} {leader:14} {holders}")
    else:
        op = answer["op"]
        print(f"procedure {answer['id']}: {op['kind']} of shard {op['shards'][0]} ({answer['status']})")
