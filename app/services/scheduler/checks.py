"""Range checks of what a user sends the scheduler: cluster specs, limits, node specs, names."""

from __future__ import annotations

import re

from app.services.scheduler.errors import BadSchedulerRequest
from app.services.scheduler.messages import ClusterSpec, ClusterUpdate, Limits, NodeSpec

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,63}$")
MAX_SHARDS = 100_000
MAX_NODES = 10_000
YEAR_S = 366 * 86400.0


def name(value: str, what: str) -> str:
    """A cluster, node or table name: 1-64 of letters, digits and _.:- (not starting with a symbol)."""
    if not NAME.match(value):
        raise BadSchedulerRequest(f"{what} {value!r}: 1-64 letters, digits or _.:-, starting with a letter or digit")
    return value


def _within(value: float, lo: float, hi: float, key: str) -> None:
    if not lo <= value <= hi:
        raise BadSchedulerRequest(f"{key} must be within {lo:g}..{hi:g}, not {value!r}")


def limits(lim: Limits) -> Limits:
    """Every limit within its range (PD's ranges where it has them)."""
    for key in ("leader", "replica", "merge", "hot"):
        _within(getattr(lim, key), 0, 10_000, f"limits.{key}")
    _within(lim.shard, 0, 1_000_000, "limits.shard")
    _within(lim.node_adds_per_min, 0, 100_000, "limits.node_adds_per_min")
    _within(lim.node_removes_per_min, 0, 100_000, "limits.node_removes_per_min")
    _within(lim.small_shard_bytes, 0, 1 << 50, "limits.small_shard_bytes")
    _within(lim.small_shard_cost, 0.01, 1.0, "limits.small_shard_cost")
    _within(lim.cooldown_s, 0, YEAR_S, "limits.cooldown_s")
    _within(lim.step_timeout_s, 0.1, 86400, "limits.step_timeout_s")
    _within(lim.step_bytes_per_s, 1, 1 << 40, "limits.step_bytes_per_s")
    _within(lim.expire_s, 0.1, 86400, "limits.expire_s")
    return lim


def cluster_spec(spec: ClusterSpec) -> ClusterSpec:
    """A cluster spec a scheduler can run: names, counts and times in range, no dynamic local data."""
    name(spec.name, "cluster")
    _within(spec.shard_count, 1, MAX_SHARDS, "shard_count")
    _within(spec.node_count, 1, MAX_NODES, "node_count")
    _within(spec.max_replicas, 1, 7, "max_replicas")
    _within(spec.max_down_time_s, 0.1, YEAR_S, "max_down_time_s")
    _within(spec.lease_s, 0.1, 3600, "lease_s")
    if spec.topology == "dynamic" and spec.local_data:
        raise BadSchedulerRequest(
            "a dynamic topology is refused for local data: moving a shard whose data is on a node's disk "
            "would corrupt it (HoraeMeta's warning); use topology static"
        )
    if spec.topology == "static" and spec.max_replicas > spec.node_count:
        raise BadSchedulerRequest(f"max_replicas {spec.max_replicas} is more than node_count {spec.node_count}")
    _within(spec.groups, 0, 256, "groups")
    if spec.split_keys:
        if len(spec.split_keys) + 1 != spec.shard_count:
            raise BadSchedulerRequest(
                f"{len(spec.split_keys)} split_keys make {len(spec.split_keys) + 1} shards, not {spec.shard_count}"
            )
        if any(not k for k in spec.split_keys) or list(spec.split_keys) != sorted(set(spec.split_keys)):
            raise BadSchedulerRequest("split_keys must be distinct, non-empty and in order")
    limits(spec.limits)
    return spec


def cluster_update(update: ClusterUpdate) -> ClusterUpdate:
    """An update's fields in range."""
    if update.max_down_time_s is not None:
        _within(update.max_down_time_s, 0.1, YEAR_S, "max_down_time_s")
    if update.limits is not None:
        limits(update.limits)
    for shard, labels in (update.affinity or {}).items():
        if not shard.isdigit():
            raise BadSchedulerRequest(f"affinity keys are shard ids, not {shard!r}")
        if not labels:
            raise BadSchedulerRequest(f"affinity of shard {shard} names no label")
    return update


def node_spec(spec: NodeSpec) -> NodeSpec:
    """A node spec in range."""
    name(spec.name, "node")
    if len(spec.address) > 256:
        raise BadSchedulerRequest("address is longer than 256 characters")
    if len(spec.labels) > 32 or any(len(k) > 64 or len(v) > 256 for k, v in spec.labels.items()):
        raise BadSchedulerRequest("labels: at most 32, keys up to 64 and values up to 256 characters")
    _within(spec.capacity, 0, 1 << 60, "capacity")
    if spec.lease_s:
        _within(spec.lease_s, 0.1, 3600, "lease_s")
    return spec
