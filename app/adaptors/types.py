"""What the engine adaptors report and take: addresses, logins, instance probes, replication links, topologies."""

from __future__ import annotations

from typing import Literal

import msgspec

Engine = Literal["mysql", "postgresql"]
Role = Literal["primary", "replica", "unknown"]


class Address(msgspec.Struct, frozen=True, order=True):
    """An instance's host and port, as other instances reach it (`host:port` in keys and CLIs)."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"

    @classmethod
    def parse(cls, text: str) -> Address:
        """'host:port' (IPv6 as '[::1]:5432'); ValueError with a clear message otherwise."""
        host, sep, port = text.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"{text!r} is not host:port")
        return cls(host, int(port))


class Credentials(msgspec.Struct, frozen=True):
    """How fleetmate logs in to a cluster's instances (never echoed: repr hides the password)."""

    user: str
    password: str = msgspec.field(default="")
    database: str = ""

    def __repr__(self) -> str:
        return f"Credentials(user={self.user!r}, password='***', database={self.database!r})"


class ReplicationLink(msgspec.Struct, frozen=True):
    """A replica's view of its source: whether it is connected and how far it got.

    MySQL/MariaDB: the IO thread (receiving) and SQL thread (applying), Seconds_Behind_Master.
    PostgreSQL: the WAL receiver (receiving) and replay; lag from replay timestamps.
    """

    source: Address | None  # None: configured but the source's address is unknown
    receiving: bool  # IO thread running / WAL receiver streaming
    applying: bool  # SQL thread running / replay not paused
    last_error: str = ""
    lag_seconds: float | None = None
    received_position: str = ""  # GTID set or LSN received
    applied_position: str = ""  # GTID set or LSN applied


class InstanceStatus(msgspec.Struct, frozen=True):
    """One probe of one instance. reachable False: the probe failed (error says why), nothing else is known."""

    address: Address
    engine: Engine
    reachable: bool
    probed_at: float  # unix seconds
    error: str = ""
    role: Role = "unknown"
    server_id: str = ""  # MySQL server_uuid / MariaDB server_id / PostgreSQL system identifier + timeline
    version: str = ""
    read_only: bool | None = None  # MySQL read_only / super_read_only; PostgreSQL: in recovery
    # The executed/committed position: MySQL gtid_executed, MariaDB gtid_current_pos, PostgreSQL the
    # current WAL LSN (primary) or last replayed LSN (standby), as text.
    position: str = ""
    timeline: int | None = None  # PostgreSQL only
    replication: ReplicationLink | None = None  # set on replicas
    replicas: tuple[Address, ...] = ()  # instances replicating from this one, as it sees them
    # Semi-sync (MySQL/MariaDB) or synchronous replication (PostgreSQL): on for a primary that
    # waits for a replica's acknowledgement before a commit returns.
    sync_replication: bool = False
    sync_replicas: tuple[Address, ...] = ()  # PostgreSQL: standbys in sync/quorum state
    extra: dict[str, str] = {}


class Topology(msgspec.Struct, frozen=True):
    """Every instance discovery reached from a seed, with their probes."""

    engine: Engine
    instances: tuple[InstanceStatus, ...]

    def primaries(self) -> tuple[InstanceStatus, ...]:
        """Reachable instances that replicate from no one (writable or not: check read_only)."""
        return tuple(i for i in self.instances if i.reachable and i.role == "primary")
