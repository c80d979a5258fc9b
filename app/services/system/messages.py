"""Messages of the system service."""

from __future__ import annotations

from typing import Literal

import msgspec

Role = Literal["leader", "follower"]


class ReplicaRecord(msgspec.Struct, frozen=True):
    """What a replica announces in the replicas bucket every few seconds."""

    node_id: str
    http_url: str
    version: str
    started_at: float
    seen_at: float
    pid: int
    host: str
    revision: int = 0  # registry revision applied when announced
    applied_seq: int = 0  # log sequence applied when announced
    zk_address: str = ""  # host:port of its ZooKeeper listener ("" when off)
    zk_secure_address: str = ""  # host:port of its ZooKeeper TLS listener ("" when off)


class NodeInfo(msgspec.Struct, frozen=True):
    """A live description of one replica, answered over the bus."""

    node_id: str
    role: Role
    leader_id: str
    version: str
    started_at: float
    uptime_s: float
    http_url: str
    nats_servers: tuple[str, ...]
    nats_connected_url: str
    embedded_nats: bool
    pid: int
    rss_bytes: int
    revision: int = 0
    applied_seq: int = 0
    zk_address: str = ""
    zk_secure_address: str = ""


class InfoRequest(msgspec.Struct, frozen=True):
    """Ask a replica for its NodeInfo (empty today; room for options)."""
