"""What the KV shows of its shards: the cluster's table from the scheduler, a replica's own copies, MatrixKV's form."""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

import msgspec

from app.services.kv.holder import CLUSTER

if TYPE_CHECKING:
    from app.services.kv.service import KvService


class HolderView(msgspec.Struct, frozen=True):
    """A shard's copy on a replica: its role there and the newest scheduler epoch it acknowledged."""

    node: str
    role: str
    acked: int


class ShardInfo(msgspec.Struct, frozen=True):
    """A shard: key range, partition, epochs, holders and leader; size and keys of the copy here, if any."""

    id: int
    partition: int
    start: str
    end: str
    epoch: int  # the scheduler's (every change of range or holders)
    leader: str
    holders: list[HolderView]
    size: int  # bytes, as last reported by its leader
    held_here: bool = False
    keys: int = 0  # the copy here
    data_epoch: int = 0  # the copy here: its range version (splits and merges)
    local_size: int = 0


def shard_infos(kv: KvService, local: bool = False) -> list[ShardInfo]:
    """Every shard of the kv cluster in key order (local: only those this replica holds)."""
    c = kv.scheduler.state.clusters.get(CLUSTER)
    if c is None:
        return []
    out = []
    for s in sorted(c.shards.values(), key=lambda s: s.start):
        part = kv.partitions.get(s.group)
        held = part.state.held.get(s.id) if part is not None else None
        if local and held is None:
            continue
        out.append(
            ShardInfo(
                s.id,
                s.group,
                s.start,
                s.end,
                s.epoch,
                s.leader,
                [HolderView(r.node, r.role, r.acked) for r in s.replicas],
                c.sizes.get(s.id, 0),
                held is not None,
                len(held.items) if held else 0,
                held.epoch if held else 0,
                held.size if held else 0,
            )
        )
    return out


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def store_ids(kv: KvService) -> dict[str, int]:
    """MatrixKV numbers its stores: each replica of the kv cluster gets 1, 2, ... in the order it joined."""
    c = kv.scheduler.state.clusters.get(CLUSTER)
    if c is None:
        return {}
    ordered = sorted(c.nodes.values(), key=lambda n: (n.registered_ms, n.spec.name))
    return {n.spec.name: i + 1 for i, n in enumerate(ordered)}


def matrixkv_shards(kv: KvService, local: bool = False) -> list[dict[str, Any]]:
    """The shard listing as MatrixKV's /shards gives it (MatrixCube's metapb.Shard as Go encodes it to JSON:
    omitted zero fields, byte keys in base64, replica roles 0 voter / 1 learner, labels null)."""
    ids = store_ids(kv)
    out = []
    for info in shard_infos(kv, local):
        shard: dict[str, Any] = {}
        if info.id:
            shard["id"] = info.id
        if info.start:
            shard["start"] = _b64(info.start)
        if info.end:
            shard["end"] = _b64(info.end)
        epoch: dict[str, int] = {}
        if info.epoch:
            epoch["configVer"] = info.epoch
        if info.data_epoch:
            epoch["generation"] = info.data_epoch
        shard["epoch"] = epoch
        replicas = []
        for h in info.holders:
            rep: dict[str, Any] = {"id": info.id * 1000 + ids.get(h.node, 0)}
            if ids.get(h.node):
                rep["storeID"] = ids[h.node]
            if h.role == "learner":
                rep["role"] = 1
            replicas.append(rep)
        shard["replicas"] = replicas or None
        if info.partition:
            shard["group"] = info.partition
        shard["labels"] = None
        out.append(shard)
    return out
