"""Agent messages: host figures, ports, engines, log-cleanup rules and reports, network status.

The agent's contract on the bus (subjects in app.bus.subjects; every payload is msgspec JSON):

- ``fleetmate.agent.heartbeat.<node_id>``: a ``Heartbeat`` every membership.heartbeat_interval
  seconds; ``seq`` grows by one per heartbeat of one agent process (``started_at`` tells a
  restart), ``facts_rev`` is the revision of the agent's current ``NodeFacts``.
- ``fleetmate.agent.facts.<node_id>``: ``NodeFacts`` at start and whenever ports, engines,
  network or cleanup reports change (``rev`` grows each time). A consumer that sees a heartbeat
  with a ``facts_rev`` it has not received asks ``fleetmate.agent.<node_id>.facts``.
- nats.micro service ``fleetmate-agent``, endpoints at ``fleetmate.agent.<node_id>.<name>``:
  info -> HostInfo, ports -> ListeningPorts, free_ports (FreePortsRequest) -> FreePorts,
  scan -> EngineScan (and new facts), clean (CleanRequest) -> CleanResult, net -> NetStatus,
  facts -> NodeFacts. An empty request body means the defaults; errors come back as nats.micro
  errors (code "400" bad request, "404" unknown rule, "503" not ready) with a readable message.
"""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

from app.config.schema import LogRule as LogRule  # noqa: PLC0414  (re-exported: the agent imports it from here)

Proto = Literal["tcp", "udp"]
Family = Literal["ipv4", "ipv6"]

# ---- host figures ------------------------------------------------------------------------------


class DiskUsage(msgspec.Struct, frozen=True):
    """One mounted file system: where, what, and its size in bytes."""

    mount: str
    device: str
    fstype: str
    total: int
    used: int
    free: int
    percent: float


class HostInfo(msgspec.Struct, frozen=True):
    """A host's figures at one moment (bytes, seconds since the epoch, percent 0..100)."""

    hostname: str
    time: float
    cpu_percent: float
    cpu_cores: int  # logical CPUs
    cpu_physical_cores: int | None
    memory_total: int
    memory_available: int
    memory_used: int
    memory_percent: float
    swap_total: int
    swap_used: int
    swap_percent: float
    load1: float
    load5: float
    load15: float
    boot_time: float
    uptime: float
    disks: tuple[DiskUsage, ...]


# ---- ports ----------------------------------------------------------------------------------------


class ListeningPort(msgspec.Struct, frozen=True):
    """A socket bound for incoming traffic: TCP in LISTEN, or UDP with no remote end."""

    proto: Proto
    family: Family
    address: str
    port: int
    pid: int | None = None
    process: str | None = None


class ListeningPorts(msgspec.Struct, frozen=True):
    """Every listening port seen; complete is False when the system hid sockets from us."""

    ports: tuple[ListeningPort, ...]
    complete: bool = True


class FreePorts(msgspec.Struct, frozen=True):
    """Ports in [start, end] that nothing listens on; fewer than count when the range ran out."""

    proto: Proto
    start: int
    end: int
    count: int
    ports: tuple[int, ...]


# ---- engines --------------------------------------------------------------------------------------

EngineName = Literal["mysql", "mariadb", "postgresql", "opengauss"]


class Engine(msgspec.Struct, frozen=True):
    """An installed database server binary: path is its real path, links the other names found for it."""

    engine: EngineName
    version: str  # "10.11.19"; "" when the output held no version number
    version_line: str  # the first line the binary printed for --version
    path: str
    links: tuple[str, ...] = ()


class EngineFailure(msgspec.Struct, frozen=True):
    """A binary that was found but did not report a version (timed out, failed to start, ...)."""

    path: str
    error: str


class EngineScan(msgspec.Struct, frozen=True):
    """Result of one engine scan."""

    engines: tuple[Engine, ...]
    failures: tuple[EngineFailure, ...] = ()


# ---- log cleanup ----------------------------------------------------------------------------------

# LogRule is also the schema of the agent.log_rules key, so it lives with the configuration.


class LogFile(msgspec.Struct, frozen=True):
    """A file a cleanup deleted (or, in a dry run, would delete), and why."""

    path: str
    size: int
    mtime: float
    reason: str


class SkippedFile(msgspec.Struct, frozen=True):
    """A matching path a cleanup left alone, and why."""

    path: str
    reason: str


class LogCleanReport(msgspec.Struct, frozen=True):
    """What one cleanup run did; in a dry run, deleted and bytes_freed say what it would do."""

    rule: LogRule
    time: float
    dry_run: bool
    considered: int  # regular files matching the rule inside its directory
    kept: int
    deleted: tuple[LogFile, ...]
    skipped: tuple[SkippedFile, ...]
    bytes_freed: int
    open_check_complete: bool = True  # False: some processes' open files could not be inspected
    error: str | None = None


# ---- network --------------------------------------------------------------------------------------


class InterfaceAddress(msgspec.Struct, frozen=True):
    """One address on an interface; family is ipv4, ipv6 or link (MAC)."""

    family: Literal["ipv4", "ipv6", "link"]
    address: str
    netmask: str | None = None
    broadcast: str | None = None


class Interface(msgspec.Struct, frozen=True):
    """A network interface: up/down, speed in Mbit/s (0 when unknown), MTU and addresses."""

    name: str
    is_up: bool
    speed_mbps: int
    mtu: int
    addresses: tuple[InterfaceAddress, ...]


class ClientAddress(msgspec.Struct, frozen=True):
    """The address this host shows to clients: from a named interface or the route to a host."""

    ip: str
    source: Literal["interface", "route"]
    interface: str | None = None
    target: str | None = None


class Target(msgspec.Struct, frozen=True):
    """A host:port to check for reachability."""

    host: str
    port: Annotated[int, msgspec.Meta(ge=1, le=65535)]


class Reachability(msgspec.Struct, frozen=True):
    """Result of a TCP connect to a target: round-trip (connect) time in ms, or the error."""

    host: str
    port: int
    reachable: bool
    rtt_ms: float | None = None
    address: str | None = None
    error: str | None = None


class NetStatus(msgspec.Struct, frozen=True):
    """Interfaces, the client-facing address (None when undetermined) and reachability checks."""

    interfaces: tuple[Interface, ...]
    client: ClientAddress | None
    reachability: tuple[Reachability, ...] = ()
    error: str | None = None


# ---- the agent on the bus -------------------------------------------------------------------------


class Heartbeat(msgspec.Struct, frozen=True, kw_only=True):
    """A node's sign of life with its host figures (agents; replicas may send it too with kind "replica").

    The contract with the membership tracker: subject fleetmate.agent.heartbeat.<node_id>,
    msgspec JSON. Unknown fields are ignored on decoding, so fields can be added later.
    """

    node_id: str
    kind: str = "agent"
    labels: dict[str, str] = msgspec.field(default_factory=dict)  # zone, rack, role when configured
    seq: int  # 1, 2, 3, ... per process
    sent_at: float  # unix seconds
    started_at: float  # unix seconds the process started
    version: str  # fleetmate version
    host: HostInfo
    client_ip: str = ""  # the address clients should use for this host ("" when unknown)
    http_url: str = ""  # empty for agents
    zk_address: str = ""  # empty for agents
    facts_rev: int = 0  # revision of the NodeFacts last published (0: none yet)


class NodeFacts(msgspec.Struct, frozen=True, kw_only=True):
    """What an agent knows about its host beyond the heartbeat: ports, engines, network, cleanups."""

    node_id: str
    rev: int  # grows by one each time the facts change
    ports: ListeningPorts
    engines: EngineScan
    network: NetStatus
    logs: tuple[LogCleanReport, ...] = ()  # the most recent cleanup runs, oldest first
    updated_at: float  # unix seconds of the change
    started_at: float = 0.0  # when this agent process started: rev counts from 1 again after a restart


class FreePortsRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of the free_ports endpoint: find `count` free ports in [start, end]."""

    start: int
    end: int
    proto: Proto = "tcp"
    count: int = 1


class CleanRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of the clean endpoint: run one rule (by name, or directory for an unnamed rule) or all.

    An agent configured with agent.log_clean_dry_run only ever does dry runs.
    """

    dry_run: bool = False
    rule: str | None = None


class CleanResult(msgspec.Struct, frozen=True):
    """The reports of the rules a clean request ran."""

    reports: tuple[LogCleanReport, ...]


class PgRejoinRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Body of the pg_rejoin endpoint: make the local postmaster on `port` a standby of `source`.

    Sent by the HA leader to fence a PostgreSQL former primary that came back writable. It
    carries the cluster's logins (an agent keeps none): `user` runs pg_rewind against source,
    `replication_user` goes into primary_conninfo. Neither is logged nor echoed.
    """

    address: str  # the instance as its cluster knows it (host:port)
    port: int
    source: str  # host:port of the primary to follow
    user: str
    password: str = ""
    database: str = "postgres"
    replication_user: str = ""
    replication_password: str = ""
    application_name: str = ""  # default: the address
    connect_timeout: float = 2.0
    timeout: float = 300.0  # for pg_rewind, and again for the restart

    def __repr__(self) -> str:
        return f"PgRejoinRequest(address={self.address!r}, source={self.source!r}, user={self.user!r}, password='***')"


class PgRejoinReport(msgspec.Struct, frozen=True):
    """What pg_rejoin did: the instance found on the port, and how long the whole rejoin took."""

    address: str
    source: str
    data_dir: str
    bin_dir: str
    run_as: str
    seconds: float
