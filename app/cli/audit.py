"""`fleetmate audit`: recorded decisions (HA steps, node state changes) with their trace ids, over the REST API."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlencode

from app.cli.api import ApiError, add_connection_options, call
from app.web.routes.audit_models import MAX_LIMIT, SOURCES, AuditEntry

_AGO = re.compile(r"^(\d+(?:\.\d+)?)([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def add_parser(sub: Any) -> None:
    """Add the `audit` command to the top-level subparsers."""
    p: argparse.ArgumentParser = sub.add_parser(
        "audit", help="recorded decisions (HA steps, node state changes), newest first, with their trace ids"
    )
    p.add_argument("--trace-id", metavar="ID", help="only the decisions of this trace (32 hex digits)")
    p.add_argument("--source", choices=SOURCES, help="only HA's, membership's or the scheduler's decisions")
    p.add_argument("--subject", metavar="NAME", help="only this cluster name or node id")
    p.add_argument("--since", metavar="TIME", help="unix seconds, or an age such as 90s, 30m, 2h, 7d")
    p.add_argument("--limit", type=int, default=100, metavar="N", help=f"at most N (1..{MAX_LIMIT}, default 100)")
    add_connection_options(p)


def since_time(text: str, now: float) -> float:
    """--since as unix seconds: a number as is, an age (30m) before now; ValueError otherwise."""
    ago = _AGO.match(text.strip())
    if ago is not None:
        return now - float(ago.group(1)) * _UNITS[ago.group(2)]
    return float(text)


def table(entries: Iterable[AuditEntry]) -> list[str]:
    """The entries as aligned lines under a header: time, source, subject, kind, trace id, message."""
    lines = [f"{'TIME':<19}  {'SOURCE':<6} {'SUBJECT':<20} {'KIND':<12} {'TRACE_ID':<32}  MESSAGE"]
    for e in entries:
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.at))
        lines.append(f"{at:<19}  {e.source:<9} {e.subject:<20} {e.kind:<12} {e.trace_id or '-':<32}  {e.message}")
    return lines


def run(args: argparse.Namespace) -> int:
    """Print the audit; 1 with the server's message when it refuses, 2 for a bad --since or --limit."""
    if not 1 <= args.limit <= MAX_LIMIT:
        print(f"fleetmate: --limit takes 1 to {MAX_LIMIT}, not {args.limit}", file=sys.stderr)
        return 2
    query: dict[str, Any] = {"limit": args.limit}
    for key in ("trace_id", "source", "subject"):
        value = getattr(args, key)
        if value is not None:
            query[key] = value
    if args.since is not None:
        try:
            query["since"] = since_time(args.since, time.time())
        except ValueError:
            print(f"fleetmate: --since takes unix seconds or an age like 30m, not {args.since!r}", file=sys.stderr)
            return 2
    try:
        answer = call(args, "GET", f"/api/v1/audit?{urlencode(query)}")
    except ApiError as exc:
        print(f"fleetmate: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
        return 0
    if not answer:
        print("no recorded decision matches")
        return 0
    import msgspec

    print("\n".join(table(msgspec.convert(answer, list[AuditEntry]))))
    return 0
