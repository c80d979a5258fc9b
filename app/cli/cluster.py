"""`fleetmate cluster status`: the replicas table as one replica sees it, and the registry's position."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from app.cli.api import ApiError, call


def _get(args: argparse.Namespace, path: str) -> dict[str, Any]:
    try:
        data: dict[str, Any] = call(args, "GET", path, timeout=5)
    except ApiError as exc:
        raise SystemExit(f"fleetmate: {exc}") from None
    return data


def status(args: argparse.Namespace) -> int:
    """Print the leader, every replica announced on the bus, and the registry's revision."""
    view = _get(args, "/api/v1/cluster")
    registry = _get(args, "/api/v1/registry")
    now = time.time()  # ages of announcements; each replica refreshes its own every 2 s
    out = sys.stdout
    print(f"leader: {view['leader']['node_id'] or '(none)'}  {view['leader']['http_url']}", file=out)
    print(
        f"registry: revision {registry['revision']}, term {registry['term']}, {registry['nodes']} nodes, "
        f"{registry['sessions']} sessions",
        file=out,
    )
    print(f"nats: {', '.join(view['nats_servers'])}", file=out)
    print(file=out)
    print(
        f"{'replica':<20}{'role':<10}{'http':<34}{'zookeeper':<22}{'revision':>10}{'lag':>6}{'version':>9}"
        f"{'up':>9}{'seen':>8}",
        file=out,
    )
    for r in view["replicas"]:
        up = f"{now - r['started_at']:.0f}s"
        seen = f"{max(0.0, now - r['seen_at']):.1f}s"
        print(
            f"{r['node_id']:<20}{r['role']:<10}{r['http_url']:<34}{r.get('zk_address') or '-':<22}"
            f"{r['revision']:>10}{r['lag']:>6}"
            f"{r['version']:>9}{up:>9}{seen:>8}",
            file=out,
        )
    return 0
