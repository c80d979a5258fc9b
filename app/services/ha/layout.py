"""Where HA keeps a cluster in the registry, and the JSON of each znode.

/fleet/clusters/<name>/config                 ClusterRecord (engine, seed, rules, downtime, last recovery)
/fleet/clusters/<name>/primary                "host:port" of the writable primary (proxies watch this key)
/fleet/clusters/<name>/instances/<host:port>  InstanceRecord (role, source, lag, position, health)
/fleet/clusters/<name>/history/h-NNNNNNNNNN   HistoryEntry (detections and recovery steps, oldest first)
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from app.adaptors.types import Engine, InstanceStatus
from app.services.ha.messages import PromotionRule

ROOT = "/fleet/clusters"
NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
HISTORY_PREFIX = "h-"
HISTORY_KEEP = 1000

_enc = msgspec.json.Encoder()


def cluster_path(name: str) -> str:
    """The cluster's folder."""
    return f"{ROOT}/{name}"


def config_path(name: str) -> str:
    """The cluster's ClusterRecord."""
    return f"{ROOT}/{name}/config"


def primary_path(name: str) -> str:
    """The key holding the writable primary's host:port."""
    return f"{ROOT}/{name}/primary"


def instances_path(name: str) -> str:
    """The folder of the cluster's instances."""
    return f"{ROOT}/{name}/instances"


def instance_path(name: str, address: str) -> str:
    """One instance's record (address as host:port)."""
    return f"{ROOT}/{name}/instances/{address}"


def history_path(name: str) -> str:
    """The folder of the cluster's history entries."""
    return f"{ROOT}/{name}/history"


Part = Literal["config", "primary", "instance", "history", "cluster"]


def parse_path(path: str) -> tuple[str, Part, str] | None:
    """(cluster, part, child) of a znode under ROOT: child is the instance address or history
    entry name ("" otherwise); None for ROOT itself, folders and anything else."""
    if not path.startswith(ROOT + "/"):
        return None
    parts = path[len(ROOT) + 1 :].split("/")
    name = parts[0]
    if not NAME_RE.match(name):
        return None
    if len(parts) == 1:
        return name, "cluster", ""
    if len(parts) == 2 and parts[1] in ("config", "primary"):
        return name, "config" if parts[1] == "config" else "primary", ""
    if len(parts) == 3 and parts[1] == "instances":
        return name, "instance", parts[2]
    if len(parts) == 3 and parts[1] == "history":
        return name, "history", parts[2]
    return None


class ClusterRecord(msgspec.Struct, frozen=True):
    """A registered cluster: how to reach it (never a password) and its recovery rules."""

    name: str
    engine: Engine
    seed: str  # host:port discovery started from
    user: str = ""  # the login from the DSN; the password comes from ha.secrets_file or [ha]
    database: str = ""
    created_at: float = 0.0
    rules: dict[str, PromotionRule] = {}  # host:port -> promotion rule
    downtime: dict[str, float] = {}  # host:port -> until (unix s)
    auto_recover: bool | None = None  # None: ha.auto_recover
    last_recovery_at: float | None = None  # the anti-flapping clock; None once acknowledged
    old_primaries: list[str] = []  # failed primaries to fence if they come back writable


class InstanceRecord(msgspec.Struct, frozen=True):
    """What the latest probe of an instance showed, as kept in the registry."""

    address: str
    reachable: bool
    role: str = "unknown"
    read_only: bool | None = None
    source: str = ""  # host:port it replicates from
    receiving: bool | None = None
    applying: bool | None = None
    lag_seconds: float | None = None
    position: str = ""
    sync_replication: bool = False
    version: str = ""
    server_id: str = ""
    error: str = ""
    probed_at: float = 0.0


HistoryKind = Literal["registered", "analysis", "recovery", "blocked", "step", "failed", "fenced", "acknowledged"]


class HistoryEntry(msgspec.Struct, frozen=True):
    """One detection or recovery step, with the trace it ran under."""

    at: float
    kind: HistoryKind
    message: str
    instance: str = ""
    trace_id: str = ""


def instance_record(status: InstanceStatus, last: InstanceRecord | None = None) -> InstanceRecord:
    """The registry's view of one probe.

    An unreachable instance keeps what was last seen of it (role, position, whether it was a
    synchronous primary: recovery needs that after it died), with reachable off and the error.
    """
    if not status.reachable and last is not None:
        return msgspec.structs.replace(last, reachable=False, error=status.error, probed_at=status.probed_at)
    link = status.replication
    return InstanceRecord(
        address=str(status.address),
        reachable=status.reachable,
        role=status.role,
        read_only=status.read_only,
        source=str(link.source) if link is not None and link.source is not None else "",
        receiving=link.receiving if link is not None else None,
        applying=link.applying if link is not None else None,
        lag_seconds=link.lag_seconds if link is not None else None,
        position=status.position,
        sync_replication=status.sync_replication,
        version=status.version,
        server_id=status.server_id,
        error=status.error,
        probed_at=status.probed_at,
    )


def same_shape(a: InstanceRecord, b: InstanceRecord) -> bool:
    """True when only the figures that move all the time differ (position, lag, probe time)."""
    strip = {"position": "", "lag_seconds": None, "probed_at": 0.0}
    return msgspec.structs.replace(a, **strip) == msgspec.structs.replace(b, **strip)


def encode(record: msgspec.Struct) -> bytes:
    """The znode data of a record."""
    return _enc.encode(record)
