"""A cluster's topology as a tree (each instance under the one it replicates from), and its text drawing."""

from __future__ import annotations

import msgspec

from app.services.ha.analysis import Analysis
from app.services.ha.layout import InstanceRecord


class TreeNode(msgspec.Struct, frozen=True):
    """One instance and, under it, the instances replicating from it."""

    address: str
    state: str  # a one-line summary: role, writable, lag, replication health, version
    instance: InstanceRecord
    replicas: list[TreeNode] = []


class TopologyTree(msgspec.Struct, frozen=True):
    """The whole tree: the recorded primary first among the roots, then detached instances."""

    cluster: str
    engine: str
    primary: str
    roots: list[TreeNode]
    analyses: list[Analysis] = []


def summary(inst: InstanceRecord) -> str:
    """role, writable or read-only, lag, replication stopped, version; or why it is unreachable."""
    if not inst.reachable:
        return f"unreachable: {inst.error}"
    parts = (
        inst.role,
        "read-only" if inst.read_only else "writable",
        f"lag {inst.lag_seconds:.1f}s" if inst.lag_seconds is not None else "",
        "replication stopped" if inst.receiving is False or inst.applying is False else "",
        inst.version,
    )
    return ", ".join(p for p in parts if p)


def build(
    cluster: str, engine: str, primary: str, instances: list[InstanceRecord], analyses: list[Analysis]
) -> TopologyTree:
    """Hang each instance under its source (when that is a known instance); the rest are roots."""
    by_address = {i.address: i for i in instances}
    children: dict[str, list[str]] = {}
    roots = []
    for address, inst in sorted(by_address.items()):
        if inst.source and inst.source in by_address and inst.source != address:
            children.setdefault(inst.source, []).append(address)
        else:
            roots.append(address)
    roots.sort(key=lambda a: (a != primary, a))
    placed: set[str] = set()

    def node(address: str) -> TreeNode:
        placed.add(address)
        below = [node(c) for c in children.get(address, []) if c not in placed]
        inst = by_address[address]
        return TreeNode(address, summary(inst), inst, below)

    trees = [node(r) for r in roots]
    # A replication cycle has no root: show each of its members as one.
    trees.extend(node(a) for a in sorted(by_address) if a not in placed)
    return TopologyTree(cluster, engine, primary, trees, analyses)


def render(tree: TopologyTree) -> list[str]:
    """The tree as orchestrator-client draws a topology, then the findings."""
    lines = [f"cluster {tree.cluster} ({tree.engine}), primary {tree.primary or '-'}"]

    def walk(n: TreeNode, depth: int) -> None:
        lines.append(f"{'  ' * depth}{'+ ' if depth else ''}{n.address}  [{n.state}]")
        for child in n.replicas:
            walk(child, depth + 1)

    for root in tree.roots:
        walk(root, 0)
    lines.extend(f"! {a.kind} {a.instance}: {a.detail}" for a in tree.analyses)
    return lines
