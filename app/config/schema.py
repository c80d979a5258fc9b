"""The configuration's schema: one frozen msgspec Struct per section, their value types, and the whole Config."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

import msgspec

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
Exporter = Literal["none", "console", "otlp"]
Scope = Literal["read", "admin"]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]

NonNegativeInt = Annotated[int, msgspec.Meta(ge=0, le=2**63 - 1)]  # what a signed 64-bit field holds
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]


class LogRule(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A retention rule; a file goes when ANY set limit says so; a rule with no limit deletes nothing.

    pattern is a glob relative to directory ("*.log", "**/*.log.*"). keep_days removes files
    modified longer ago than that; keep_newest keeps only the N newest matching files;
    keep_total_bytes removes the oldest files until the matching files add up to no more.
    """

    directory: str
    pattern: str = "*"
    keep_days: NonNegativeFloat | None = None
    keep_total_bytes: NonNegativeInt | None = None
    keep_newest: NonNegativeInt | None = None
    name: str = ""


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The HTTP gateway."""

    host: str = "127.0.0.1"
    port: Port = 21510
    advertise_url: str = ""
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # What one client can make the gateway hold (docs/limits.md).
    max_body_bytes: Annotated[int, msgspec.Meta(ge=1024, le=1 << 30)] = 8 << 20
    max_json_depth: Annotated[int, msgspec.Meta(ge=1, le=500)] = 64
    header_read_timeout: Seconds = 10.0
    body_read_timeout: Seconds = 30.0
    max_connections: Annotated[int, msgspec.Meta(ge=1, le=1_000_000)] = 10000


class AuthConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """API tokens, as "scope:token" strings and/or a file of such lines."""

    tokens: tuple[str, ...] = ()
    tokens_file: str = ""


class NatsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The bus: an external NATS (url) or the embedded nats-server."""

    url: tuple[str, ...] = ()
    host: str = "127.0.0.1"
    port: Port = 21520
    connect_timeout: Seconds = 5.0
    sync_always: bool = True
    step_down_on_stop: bool = True
    token: str = ""
    token_file: str = ""
    tls_ca: str = ""
    tls_cert: str = ""
    tls_key: str = ""


class RegistryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The registry: limits, sessions, watch history, the log stream, rate limits."""

    max_data_bytes: Annotated[int, msgspec.Meta(ge=0, le=4 << 20)] = 1 << 20
    max_path_bytes: Annotated[int, msgspec.Meta(ge=16, le=65536)] = 4096
    session_timeout_min_ms: Annotated[int, msgspec.Meta(ge=100, le=2**31 - 1)] = 4000
    session_timeout_max_ms: Annotated[int, msgspec.Meta(ge=100, le=2**31 - 1)] = 40000
    event_history: Annotated[int, msgspec.Meta(ge=0, le=10_000_000)] = 10000
    watch_max_pending: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 10000
    stream_replicas: Annotated[int, msgspec.Meta(ge=0, le=5)] = 0
    write_timeout: Seconds = 10.0
    rate_limit_total: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    rate_limit_per_client: Annotated[float, msgspec.Meta(ge=0)] = 0.0
    container_check_interval: Seconds = 60.0


class LeaseConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The leader lease: which backend holds it, how long it lasts, how often it is renewed."""

    backend: Literal["nats", "sql", "s3"] = "nats"
    ttl: Annotated[float, msgspec.Meta(ge=1.0, le=300.0)] = 5.0
    renew_interval: Annotated[float, msgspec.Meta(ge=0.1, le=60.0)] = 1.0
    name: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9_.-]{1,64}$")] = "fleetmate"


FourLetterWord = Literal["ruok", "srvr", "stat", "mntr", "conf", "envi", "cons", "wchs", "dirs"]


class ZkConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The ZooKeeper wire-protocol listener."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: Port = 2181
    four_letter_words: tuple[FourLetterWord, ...] = ("ruok", "srvr", "stat", "mntr", "conf", "envi")
    plaintext_enabled: bool = True
    secure_enabled: bool = False
    secure_port: Port = 2281
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    # Connections one client address may hold (ZooKeeper's maxClientCnxns); 0: no limit.
    max_client_cnxns: Annotated[int, msgspec.Meta(ge=0, le=1_000_000)] = 60


class SqlConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """A MySQL/MariaDB or PostgreSQL database for the sql lease and the mysql/postgresql snapshot stores."""

    dsn: str = ""
    table_prefix: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,31}$")] = "fleetmate_"


class S3Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """An S3-compatible object store (MinIO, SeaweedFS, AWS) for the s3 lease and snapshot store."""

    endpoint: str = ""
    access_key: str = ""
    secret_key: str = ""
    bucket: Annotated[str, msgspec.Meta(pattern=r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")] = "fleetmate"
    region: str = ""
    prefix: str = "fleetmate/"


class SnapshotConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Snapshots of the applied state: where they go, how often, how many are kept, trimming of the log."""

    store: Literal["file", "s3", "mysql", "postgresql", "memory"] = "file"
    dir: str = ""
    every_entries: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] = 10000
    every_seconds: Annotated[float, msgspec.Meta(ge=0, le=86400)] = 300.0
    keep: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    trim: bool = True
    on_stop_timeout: Annotated[float, msgspec.Meta(ge=0, le=300)] = 5.0


class DiskConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[disk]: the free space kept in the data directory (app/storage/diskspace.py)."""

    min_free_mb: Annotated[int, msgspec.Meta(ge=0, le=1 << 30)] = 64
    check_interval: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 1.0


class MembershipConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[membership]: node heartbeats and the states the leader derives from them."""

    heartbeat_interval: Seconds = 5.0
    suspect_after: Annotated[int, msgspec.Meta(ge=1, le=1000)] = 3
    down_after: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 30.0


class AgentConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[agent]: what `fleetmate agent` reports about its host, and its log cleanup rules."""

    zone: str = ""
    rack: str = ""
    role: str = ""
    interface: str = ""
    peers: tuple[str, ...] = ()
    engine_dirs: tuple[str, ...] = ()
    log_rules: tuple[LogRule, ...] = ()
    log_clean_interval: Annotated[float, msgspec.Meta(ge=0, le=604800)] = 3600.0
    log_clean_dry_run: bool = False


class HaConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[ha]: discovery, failure analysis and automatic recovery of MySQL/MariaDB and PostgreSQL clusters."""

    enabled: bool = True
    poll_interval: Annotated[float, msgspec.Meta(ge=0.1, le=3600)] = 1.0
    connect_timeout: Annotated[float, msgspec.Meta(ge=0.1, le=60)] = 2.0
    lag_threshold: Annotated[float, msgspec.Meta(ge=0)] = 10.0
    auto_recover: bool = True
    recovery_block_seconds: Annotated[float, msgspec.Meta(ge=0)] = 3600.0
    apply_timeout: Annotated[float, msgspec.Meta(gt=0, le=3600)] = 30.0
    secrets_file: str = ""
    user: str = ""
    password: str = ""
    replication_user: str = ""
    replication_password: str = ""
    pre_failover_hook: str = ""
    post_failover_hook: str = ""
    hook_timeout: Seconds = 30.0
    rejoin: bool = True
    rejoin_timeout: Annotated[float, msgspec.Meta(gt=0, le=86400)] = 300.0


class MetricsConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[metrics]: the DuckDB time-series store, its ingest batches, retention and rollups."""

    enabled: bool = True
    path: str = ""
    batch_points: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] = 100_000
    flush_interval: Seconds = 0.2
    raw_retention: Annotated[float, msgspec.Meta(gt=0, le=3.2e8)] = 86400.0
    rollup_step: Annotated[float, msgspec.Meta(ge=1, le=86400)] = 60.0
    rollup_retention: Annotated[float, msgspec.Meta(gt=0, le=3.2e8)] = 2592000.0
    stream_max_bytes: Annotated[int, msgspec.Meta(ge=1 << 20, le=1 << 50)] = 1 << 30


class SchedulerConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[scheduler]: the shard scheduler's leader rounds, assignment pushes and load records."""

    enabled: bool = True
    interval: Annotated[float, msgspec.Meta(ge=0.05, le=600)] = 1.0
    push_interval: Annotated[float, msgspec.Meta(ge=0.5, le=3600)] = 5.0
    load_interval: Annotated[float, msgspec.Meta(ge=1, le=3600)] = 10.0
    balance_primaries: bool = False
    primary_cooldown: Annotated[float, msgspec.Meta(ge=0, le=604800)] = 600.0


class KvConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """[kv]: the sharded KV store on log partitions (docs/kv.md)."""

    enabled: bool = True
    partitions: Annotated[int, msgspec.Meta(ge=0, le=256)] = 0
    max_replicas: Annotated[int, msgspec.Meta(ge=1, le=7)] = 3
    shard_capacity: Annotated[int, msgspec.Meta(ge=1024, le=1 << 40)] = 96 << 20
    split_writes_per_s: Annotated[float, msgspec.Meta(ge=0, le=1e9)] = 0.0
    merge_after: Annotated[float, msgspec.Meta(ge=0, le=30 * 86400)] = 3600.0
    max_peer_down_time: Annotated[float, msgspec.Meta(ge=1, le=30 * 86400)] = 1800.0
    node_lease: Annotated[float, msgspec.Meta(ge=0.5, le=600)] = 10.0
    max_key_bytes: Annotated[int, msgspec.Meta(ge=1, le=65536)] = 4096
    max_value_bytes: Annotated[int, msgspec.Meta(ge=1, le=4 << 20)] = 1 << 20
    matrixkv: bool = True


class TelemetryConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """OpenTelemetry tracing."""

    exporter: Exporter = "none"
    endpoint: str = ""
    service_name: str = "fleetmate"
    sample_ratio: Annotated[float, msgspec.Meta(ge=0.0, le=1.0)] = 1.0


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """The whole effective configuration of one fleetmate process."""

    node_id: str = ""
    data_dir: str = "data"
    log_level: LogLevel = "info"
    log_format: LogFormat = "json"
    workers: Annotated[int, msgspec.Meta(ge=0, le=64)] = 0
    http: HttpConfig = msgspec.field(default_factory=HttpConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    nats: NatsConfig = msgspec.field(default_factory=NatsConfig)
    telemetry: TelemetryConfig = msgspec.field(default_factory=TelemetryConfig)
    registry: RegistryConfig = msgspec.field(default_factory=RegistryConfig)
    lease: LeaseConfig = msgspec.field(default_factory=LeaseConfig)
    sql: SqlConfig = msgspec.field(default_factory=SqlConfig)
    s3: S3Config = msgspec.field(default_factory=S3Config)
    snapshot: SnapshotConfig = msgspec.field(default_factory=SnapshotConfig)
    disk: DiskConfig = msgspec.field(default_factory=DiskConfig)
    zk: ZkConfig = msgspec.field(default_factory=ZkConfig)
    membership: MembershipConfig = msgspec.field(default_factory=MembershipConfig)
    agent: AgentConfig = msgspec.field(default_factory=AgentConfig)
    metrics: MetricsConfig = msgspec.field(default_factory=MetricsConfig)
    ha: HaConfig = msgspec.field(default_factory=HaConfig)
    scheduler: SchedulerConfig = msgspec.field(default_factory=SchedulerConfig)
    kv: KvConfig = msgspec.field(default_factory=KvConfig)

    @property
    def data_path(self) -> Path:
        """The data directory as an absolute path."""
        return Path(self.data_dir).expanduser().resolve()

    @property
    def embedded_nats(self) -> bool:
        """True when fleetmate starts its own nats-server."""
        return not self.nats.url


class Token(msgspec.Struct, frozen=True):
    """One API token and what it may do."""

    scope: Scope
    secret: str


SECTIONS: dict[str, type[msgspec.Struct]] = {
    "http": HttpConfig,
    "auth": AuthConfig,
    "nats": NatsConfig,
    "telemetry": TelemetryConfig,
    "registry": RegistryConfig,
    "lease": LeaseConfig,
    "sql": SqlConfig,
    "s3": S3Config,
    "snapshot": SnapshotConfig,
    "disk": DiskConfig,
    "zk": ZkConfig,
    "membership": MembershipConfig,
    "agent": AgentConfig,
    "metrics": MetricsConfig,
    "ha": HaConfig,
    "scheduler": SchedulerConfig,
    "kv": KvConfig,
}
SECRET_KEYS = frozenset(
    {"auth.tokens", "sql.dsn", "s3.secret_key", "nats.token", "ha.password", "ha.replication_password"}
)


def auto_workers(cfg: Config, cpus: int) -> int:
    """Workers for `workers = 0`: one per CPU, less the one the embedded nats-server needs.

    Every worker applies every write (each is a replica), so writes do not scale with workers;
    reads and connections do. Measured on 2 cores with the embedded server, 2 workers gave
    0.6x etcd on writes and 1 gave 0.8x: the server's own core is worth more than a worker.
    """
    return max(1, cpus - 1) if cfg.embedded_nats else max(1, cpus)
