"""The one configuration loader: defaults, config/default.toml, an optional file, FLEETMATE_* vars, then flags."""

from __future__ import annotations

import contextlib
import functools
import os
import re
import socket
import tomllib
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from app import failpoints, tls
from app.services.agent.messages import LogRule

LogLevel = Literal["debug", "info", "warning", "error"]
LogFormat = Literal["json", "text"]
Exporter = Literal["none", "console", "otlp"]
Scope = Literal["read", "admin"]

Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
Seconds = Annotated[float, msgspec.Meta(gt=0, le=3600)]

ENV_PREFIX = "FLEETMATE_"
FLAG_PREFIX = "--"
# Variables read by the CLI (config file; the shell's address, token and TLS files), not mapped onto a key.
RESERVED_ENV = frozenset(
    {
        "FLEETMATE_CONFIG",
        "FLEETMATE_ADDR",
        "FLEETMATE_TOKEN",
        "FLEETMATE_CACERT",
        "FLEETMATE_CLIENT_CERT",
        "FLEETMATE_CLIENT_KEY",
        failpoints.ENV,  # tests only (app/failpoints.py)
    }
)
NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NATS_URL_RE = re.compile(r"^(nats|tls|ws|wss)://[^\s,/]+(:\d+)?/?$")
DEFAULT_TOML = Path(__file__).resolve().parent.parent / "config" / "default.toml"


class ConfigError(Exception):
    """A configuration value that stops start-up; names the key and the problem."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


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
}
SECRET_KEYS = frozenset(
    {"auth.tokens", "sql.dsn", "s3.secret_key", "nats.token", "ha.password", "ha.replication_password"}
)
SQL_DSN_RE = re.compile(r"^(mysql|mariadb|postgresql|postgres)://[^\s/]+(/[A-Za-z0-9_$-]*)?(\?\S*)?$")


@functools.cache  # type hints are evaluated once per struct: --help asks for every key several times
def _fields(struct: type[msgspec.Struct]) -> dict[str, Any]:
    hints = typing.get_type_hints(struct, include_extras=True)
    return {name: hints[name] for name in struct.__struct_fields__}


def key_names() -> list[str]:
    """Every dotted key of the schema (`log_level`, `http.port`, ...), in its order: the one list
    that TOML tables, FLEETMATE_* variables and command-line flags are all named from."""
    out: list[str] = []
    for name in Config.__struct_fields__:
        if name in SECTIONS:
            out.extend(f"{name}.{sub}" for sub in SECTIONS[name].__struct_fields__)
        else:
            out.append(name)
    return out


def env_name(key: str) -> str:
    """The variable that sets key: `http.port` -> FLEETMATE_HTTP_PORT."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def flag_name(key: str) -> str:
    """The command-line flag that sets key: `http.port` -> --http-port."""
    return FLAG_PREFIX + key.replace(".", "-").replace("_", "-")


def key_docs(path: Path = DEFAULT_TOML) -> dict[str, str]:
    """Each key's comment in config/default.toml (the comment lines just above it, one line each);
    empty when the file is not there (an installed wheel has no config/)."""
    docs: dict[str, str] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return docs
    section, comment = "", []
    for line in lines:
        text = line.strip()
        if text.startswith("#"):
            comment.append(text.lstrip("#").strip())
        elif text.startswith("[") and text.endswith("]"):
            section, comment = text[1:-1].strip(), []
        elif "=" in text:
            name = text.split("=", 1)[0].strip()
            docs[f"{section}.{name}" if section else name] = "\n".join(c for c in comment if c)
            comment = []
        else:
            comment = []
    return docs


def env_keys() -> dict[str, str]:
    """Map every FLEETMATE_* variable name to the dotted key it sets."""
    return {env_name(key): key for key in key_names()}


def flag_keys() -> dict[str, str]:
    """Map every command-line flag (`--http-port`) to the dotted key it sets."""
    return {flag_name(key): key for key in key_names()}


def describe_key(key: str) -> str:
    """What a key takes, in words: 'an integer >= 0, <= 65535', "one of 'debug', 'info', ...", ..."""
    declared = _key_type(key)
    tp = _base_type(declared)
    if typing.get_origin(tp) is tuple:
        item = _base_type(typing.get_args(tp)[0])
        if _is_table(item):
            return "a JSON list of tables"
        if typing.get_origin(item) is Literal:
            return "a comma-separated list of " + ", ".join(repr(a) for a in typing.get_args(item))
    bounds = []
    while typing.get_origin(declared) is Annotated:
        declared, *metas = typing.get_args(declared)
        for meta in metas:
            if isinstance(meta, msgspec.Meta):
                for op, value in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
                    if getattr(meta, op) is not None:
                        bounds.append(f"{value} {getattr(meta, op)}")
    return _describe(tp) + (" " + ", ".join(bounds) if bounds else "")


def _is_table(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, msgspec.Struct)


def default_text(key: str) -> str:
    """A key's built-in default as its variable or flag would spell it."""
    section, _, sub = key.rpartition(".")
    value = getattr(getattr(Config(), section) if section else Config(), sub)
    if describe_key(key) == "a JSON list of tables":
        return msgspec.json.encode(value).decode()
    return text_of(value)


def text_of(value: Any) -> str:
    """A plain configuration value as a variable or flag spells it: true/false, lists comma-separated."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, tuple | list):
        return ",".join(text_of(v) for v in value)
    return str(value)


def _key_type(key: str) -> Any:
    if "." in key:
        section, sub = key.split(".", 1)
        return _fields(SECTIONS[section])[sub]
    return _fields(Config)[key]


def _base_type(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def _describe(tp: Any) -> str:
    tp = _base_type(tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a comma-separated list" if typing.get_origin(tp) is tuple else str(tp)
    )


def _from_text(key: str, raw: str) -> Any:
    """Turn one variable's or flag's string into the typed value for key."""
    tp = _base_type(_key_type(key))
    origin = typing.get_origin(tp)
    if origin is tuple:
        item = _base_type(typing.get_args(tp)[0])
        if _is_table(item):
            if not raw.strip():
                return []
            try:
                return msgspec.json.decode(raw)
            except msgspec.DecodeError as exc:
                raise ConfigError(key, f"expected a JSON list of tables: {exc}") from None
        return [part.strip() for part in raw.split(",") if part.strip()]
    if tp is bool:
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(key, f"expected true or false, got {raw!r}")
    if tp is int:
        try:
            return int(raw.strip())
        except ValueError:
            raise ConfigError(key, f"expected an integer, got {raw!r}") from None
    if tp is float:
        try:
            return float(raw.strip())
        except ValueError:
            raise ConfigError(key, f"expected a number, got {raw!r}") from None
    return raw


def _merge(base: dict[str, Any], over: dict[str, Any], origin: str) -> None:
    for name, value in over.items():
        if name in SECTIONS:
            if not isinstance(value, dict):
                raise ConfigError(name, f"expected a table in {origin}")
            section = base.setdefault(name, {})
            for sub, subval in value.items():
                if sub not in SECTIONS[name].__struct_fields__:
                    raise ConfigError(f"{name}.{sub}", f"unknown key in {origin}")
                section[sub] = subval
        elif name in Config.__struct_fields__:
            base[name] = value
        else:
            raise ConfigError(name, f"unknown key in {origin}")


def _set_dotted(tree: dict[str, Any], key: str, value: Any) -> None:
    if "." in key:
        section, sub = key.split(".", 1)
        tree.setdefault(section, {})[sub] = value
    else:
        tree[key] = value


def _read_toml(path: Path) -> dict[str, Any]:
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError("--config", f"file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("--config", f"{path} is not valid TOML: {exc}") from None
    except OSError as exc:
        raise ConfigError("--config", f"cannot read {path}: {exc.strerror}") from None


_PATH_RE = re.compile(r"at `\$\.([A-Za-z0-9_.\[\]]+)`")


def _convert(tree: dict[str, Any]) -> Config:
    try:
        return msgspec.convert(tree, Config)
    except msgspec.ValidationError as exc:
        text = str(exc)
        match = _PATH_RE.search(text)
        key = match.group(1) if match else "config"
        key = re.sub(r"\[\d+\]$", "", key)
        problem = _PATH_RE.sub("", text).rstrip(" -")
        bound = re.match(r"Expected `\w+` ([<>]=? .*)", problem)
        if bound:
            problem = f"must be {bound.group(1)}"
        elif problem.startswith(("Expected `", "Invalid enum value")):
            if "enum" in problem:
                got = problem.removeprefix("Invalid enum value ")
            else:
                got = re.sub(r"Expected `\w+`, got `(\w+)`", r"a value of type \1", problem)
            with contextlib.suppress(KeyError):
                problem = f"expected {_describe(_key_type(key))}, got {got}"
        raise ConfigError(key, problem) from None


def load(
    path: str | os.PathLike[str] | None = None,
    environ: typing.Mapping[str, str] | None = None,
    flags: typing.Mapping[str, str] | None = None,
) -> Config:
    """Build the effective configuration, validate it, and return it; raise ConfigError on a bad value.

    Later sources win: defaults, config/default.toml, the file (path or FLEETMATE_CONFIG), the
    FLEETMATE_* variables, then flags (dotted key -> the flag's text, as its variable would take it).
    A bad value is reported with the key and where it came from: `http.port (--http-port)`.
    """
    env = os.environ if environ is None else environ
    tree: dict[str, Any] = {}
    if DEFAULT_TOML.exists():
        _merge(tree, _read_toml(DEFAULT_TOML), str(DEFAULT_TOML))
    if path is None and env.get("FLEETMATE_CONFIG"):
        path = env["FLEETMATE_CONFIG"]
    if path is not None:
        _merge(tree, _read_toml(Path(path)), str(path))
    if failpoints.error is not None:
        raise ConfigError(failpoints.ENV, failpoints.error)
    known = env_keys()
    origin: dict[str, str] = {}
    for name, raw in env.items():
        if not name.startswith(ENV_PREFIX) or name in RESERVED_ENV:
            continue
        if name not in known:
            raise ConfigError(name, "unknown FLEETMATE_ variable (see `fleetmate config keys`)")
        origin[known[name]] = name
        try:
            _set_dotted(tree, known[name], _from_text(known[name], raw))
        except ConfigError as exc:
            raise ConfigError(f"{exc.key} ({name})", exc.problem) from None
    schema = set(key_names())
    for key, raw in (flags or {}).items():
        if key not in schema:
            raise ConfigError(flag_name(key), "unknown flag")
        origin[key] = flag_name(key)  # a flag wins over a variable, and so names the source
        try:
            _set_dotted(tree, key, _from_text(key, raw))
        except ConfigError as exc:
            raise ConfigError(f"{exc.key} ({flag_name(key)})", exc.problem) from None
    try:
        return validate(_convert(tree))
    except ConfigError as exc:
        if exc.key in origin:
            raise ConfigError(f"{exc.key} ({origin[exc.key]})", exc.problem) from None
        raise


def validate(cfg: Config) -> Config:
    """Check what types alone cannot: ids, URLs, files, tokens, the data dir, public binds."""
    if cfg.node_id and not NODE_ID_RE.match(cfg.node_id):
        raise ConfigError("node_id", f"{cfg.node_id!r} must be 1-64 letters, digits, '-' or '_'")
    if not cfg.node_id:
        host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname())[:64] or "fleetmate"
        cfg = msgspec.structs.replace(cfg, node_id=host)
    if cfg.http.advertise_url and not re.match(r"^https?://[^\s/]+(:\d+)?(/.*)?$", cfg.http.advertise_url):
        raise ConfigError("http.advertise_url", f"{cfg.http.advertise_url!r} is not an http(s):// URL")
    for url in cfg.nats.url:
        if not NATS_URL_RE.match(url):
            raise ConfigError("nats.url", f"{url!r} is not a nats://host:port URL")
    if cfg.lease.renew_interval > cfg.lease.ttl / 2:
        raise ConfigError("lease.renew_interval", "must be at most half of lease.ttl, or the lease lapses")
    reg = cfg.registry
    if reg.session_timeout_min_ms > reg.session_timeout_max_ms:
        raise ConfigError("registry.session_timeout_min_ms", "must not exceed registry.session_timeout_max_ms")
    _check_stores(cfg)
    if cfg.telemetry.exporter == "otlp" and not cfg.telemetry.endpoint:
        raise ConfigError("telemetry.endpoint", "required when telemetry.exporter is 'otlp'")
    if cfg.nats.token and (len(cfg.nats.token) < 8 or any(c.isspace() for c in cfg.nats.token)):
        raise ConfigError("nats.token", "must be at least 8 characters with no spaces")
    if cfg.nats.token_file and not Path(cfg.nats.token_file).expanduser().is_file():
        raise ConfigError("nats.token_file", f"file not found: {cfg.nats.token_file}")
    if bool(cfg.nats.tls_cert) != bool(cfg.nats.tls_key):
        raise ConfigError("nats.tls_cert", "nats.tls_cert and nats.tls_key go together")
    for key, path in (
        ("nats.tls_ca", cfg.nats.tls_ca),
        ("nats.tls_cert", cfg.nats.tls_cert),
        ("nats.tls_key", cfg.nats.tls_key),
    ):
        if path and not Path(path).expanduser().is_file():
            raise ConfigError(key, f"file not found: {path}")
    _check_tls(cfg)
    if cfg.ha.secrets_file and not Path(cfg.ha.secrets_file).expanduser().is_file():
        raise ConfigError("ha.secrets_file", f"file not found: {cfg.ha.secrets_file}")
    if cfg.membership.down_after <= cfg.membership.heartbeat_interval:
        raise ConfigError("membership.down_after", "must be longer than membership.heartbeat_interval")
    for i, rule in enumerate(cfg.agent.log_rules):
        if not Path(rule.directory).is_absolute():
            raise ConfigError(f"agent.log_rules[{i}].directory", f"{rule.directory!r} must be an absolute path")
    for key, host in (("http.host", cfg.http.host), ("nats.host", cfg.nats.host), ("zk.host", cfg.zk.host)):
        if not host or any(c.isspace() for c in host):
            raise ConfigError(key, f"{host!r} is not a host name or address")
    parse_tokens(cfg)  # raises on a malformed token
    _check_data_dir(cfg.data_path)
    if not is_loopback(cfg.http.host) and not parse_tokens(cfg):
        raise ConfigError(
            "http.host",
            f"binding {cfg.http.host} (not loopback) needs an API token: set auth.tokens or auth.tokens_file",
        )
    return cfg


def auto_workers(cfg: Config, cpus: int) -> int:
    """Workers for `workers = 0`: one per CPU, less the one the embedded nats-server needs.

    Every worker applies every write (each is a replica), so writes do not scale with workers;
    reads and connections do. Measured on 2 cores with the embedded server, 2 workers gave
    0.6x etcd on writes and 1 gave 0.8x: the server's own core is worth more than a worker.
    """
    return max(1, cpus - 1) if cfg.embedded_nats else max(1, cpus)


def sql_flavor(dsn: str) -> str:
    """'mysql' or 'postgresql' for a DSN (mariadb:// counts as mysql, postgres:// as postgresql)."""
    scheme = dsn.split("://", 1)[0]
    return {"mariadb": "mysql", "postgres": "postgresql"}.get(scheme, scheme)


def _check_stores(cfg: Config) -> None:
    if cfg.sql.dsn and not SQL_DSN_RE.match(cfg.sql.dsn):
        raise ConfigError("sql.dsn", "must look like mysql://user:pass@host:port/db or postgresql://user@host/db")
    if cfg.s3.endpoint and not re.match(r"^https?://[^\s/]+(:\d+)?/?$", cfg.s3.endpoint):
        raise ConfigError("s3.endpoint", f"{cfg.s3.endpoint!r} is not an http(s)://host:port URL")
    if cfg.lease.backend == "sql" and not cfg.sql.dsn:
        raise ConfigError("lease.backend", "'sql' needs sql.dsn")
    if "s3" in (cfg.lease.backend, cfg.snapshot.store) and not cfg.s3.endpoint:
        key = "lease.backend" if cfg.lease.backend == "s3" else "snapshot.store"
        raise ConfigError(key, "'s3' needs s3.endpoint")
    if cfg.snapshot.store in ("mysql", "postgresql"):
        if not cfg.sql.dsn:
            raise ConfigError("snapshot.store", f"{cfg.snapshot.store!r} needs sql.dsn")
        if sql_flavor(cfg.sql.dsn) != cfg.snapshot.store:
            raise ConfigError("snapshot.store", f"{cfg.snapshot.store!r} does not match the scheme of sql.dsn")


def _check_tls(cfg: Config) -> None:
    """The listeners' TLS settings: pairs complete, files readable PEM, each key the certificate's own."""
    http, zk = cfg.http, cfg.zk
    for section, cert, key in (("http", http.tls_cert, http.tls_key), ("zk", zk.tls_cert, zk.tls_key)):
        if bool(cert) != bool(key):
            missing = f"{section}.tls_key" if cert else f"{section}.tls_cert"
            raise ConfigError(missing, f"{section}.tls_cert and {section}.tls_key go together")
    if http.tls_client_ca and not http.tls_cert:
        raise ConfigError("http.tls_client_ca", "checks the certificates of HTTPS clients: set http.tls_cert too")
    if zk.enabled and not zk.plaintext_enabled and not zk.secure_enabled:
        raise ConfigError("zk.plaintext_enabled", "false leaves no ZooKeeper port: set zk.secure_enabled or zk.enabled")
    if zk.enabled and not zk.secure_enabled:
        for key, value in (("zk.tls_cert", zk.tls_cert), ("zk.tls_client_ca", zk.tls_client_ca)):
            if value:
                raise ConfigError(key, "is for the secure port: set zk.secure_enabled = true")
    if zk.enabled and zk.secure_enabled and zk.plaintext_enabled and zk.secure_port and zk.secure_port == zk.port:
        raise ConfigError("zk.secure_port", f"{zk.secure_port} is zk.port too; the plaintext and TLS ports differ")
    try:
        if http.tls_cert:
            tls.server_context(http.tls_cert, http.tls_key, http.tls_client_ca, keys=_tls_keys("http"))
        if zk.enabled and zk.secure_enabled:
            if not zk.tls_cert and not http.tls_cert:
                raise ConfigError(
                    "zk.secure_enabled",
                    "needs a certificate: set zk.tls_cert and zk.tls_key (or http.tls_cert/tls_key)",
                )
            cert, key, names = zk_tls_files(cfg)
            tls.server_context(cert, key, zk.tls_client_ca, keys=names)
    except tls.TlsFileError as exc:
        raise ConfigError(exc.key, exc.problem) from None


def _tls_keys(section: str) -> tuple[str, str, str]:
    return f"{section}.tls_cert", f"{section}.tls_key", f"{section}.tls_client_ca"


def zk_tls_files(cfg: Config) -> tuple[str, str, tuple[str, str, str]]:
    """The certificate and key of the ZooKeeper secure port (zk.tls_cert/tls_key, else the HTTP pair),
    and the names of the keys that set them and zk.tls_client_ca, for errors."""
    if cfg.zk.tls_cert:
        return cfg.zk.tls_cert, cfg.zk.tls_key, _tls_keys("zk")
    return cfg.http.tls_cert, cfg.http.tls_key, (*_tls_keys("http")[:2], "zk.tls_client_ca")


def check_free_space(cfg: Config) -> None:
    """Refuse to start a replica whose data directory has less than disk.min_free_mb free (exit 2)."""
    path = cfg.data_path
    min_free = cfg.disk.min_free_mb << 20
    try:
        st = os.statvfs(path)
    except OSError as exc:
        raise ConfigError("data_dir", f"cannot read the free space of {path}: {exc.strerror or exc}") from None
    free = st.f_bavail * st.f_frsize
    if free < min_free:
        raise ConfigError(
            "data_dir",
            f"{path} has {free / (1 << 20):.1f} MiB free, below disk.min_free_mb ({cfg.disk.min_free_mb} MiB): "
            "free space there, or lower disk.min_free_mb",
        )


def _check_data_dir(path: Path) -> None:
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise ConfigError("data_dir", f"{path} is not writable: {exc.strerror or exc}") from None


def is_loopback(host: str) -> bool:
    """True for addresses that only this machine can reach."""
    return host in ("localhost", "::1") or host.startswith("127.")


def parse_tokens(cfg: Config) -> tuple[Token, ...]:
    """All configured tokens, from auth.tokens and auth.tokens_file."""
    entries: list[tuple[str, str]] = [("auth.tokens", t) for t in cfg.auth.tokens]
    if cfg.auth.tokens_file:
        try:
            text = Path(cfg.auth.tokens_file).expanduser().read_text()
        except OSError as exc:
            raise ConfigError("auth.tokens_file", f"cannot read {cfg.auth.tokens_file}: {exc.strerror}") from None
        for raw in text.splitlines():
            line = raw.strip()
            if line and not line.startswith("#"):
                entries.append(("auth.tokens_file", line))
    tokens = []
    for key, entry in entries:
        scope, sep, secret = entry.partition(":")
        if not sep or scope not in ("read", "admin"):
            raise ConfigError(key, "each token must be 'read:SECRET' or 'admin:SECRET'")
        if len(secret) < 8 or any(c.isspace() for c in secret):
            raise ConfigError(key, f"a {scope} token must be at least 8 characters with no spaces")
        tokens.append(Token(scope=typing.cast(Scope, scope), secret=secret))
    return tuple(tokens)


def secrets(cfg: Config) -> tuple[str, ...]:
    """Every secret string in the configuration, so logs can redact them."""
    candidates = (cfg.s3.secret_key, cfg.nats.token, cfg.ha.password, cfg.ha.replication_password)
    found: list[str] = [s for s in candidates if s]
    password = re.match(r"^\w+://[^:@/]+:([^@/]+)@", cfg.sql.dsn)
    if password:
        found.append(password.group(1))
    try:
        return (*found, *(t.secret for t in parse_tokens(cfg)))
    except ConfigError:
        return tuple(found)


def to_dict(cfg: Config, *, masked: bool = True) -> dict[str, Any]:
    """The configuration as plain data, secrets replaced by '***' unless masked is False."""
    data: dict[str, Any] = msgspec.to_builtins(cfg)
    if masked:
        data["auth"]["tokens"] = [t.split(":", 1)[0] + ":***" for t in cfg.auth.tokens]
        if cfg.sql.dsn:
            data["sql"]["dsn"] = re.sub(r"://([^:@/]+):[^@/]*@", r"://\1:***@", cfg.sql.dsn)
        if cfg.s3.secret_key:
            data["s3"]["secret_key"] = "***"
        if cfg.nats.token:
            data["nats"]["token"] = "***"
        for key in ("password", "replication_password"):
            if data["ha"][key]:
                data["ha"][key] = "***"
    return data


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items() if v is not None) + "}"
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


def to_toml(data: dict[str, Any]) -> str:
    """Render a config dict as TOML (flat keys first, then one table per section)."""
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for name, section in data.items():
        if isinstance(section, dict):
            lines.append("")
            lines.append(f"[{name}]")
            lines.extend(f"{k} = {_toml_value(v)}" for k, v in section.items())
    return "\n".join(lines) + "\n"
