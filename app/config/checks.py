"""Checks types alone cannot make: ids, URLs, stores, TLS files, tokens, the data dir and its free space."""

from __future__ import annotations

import os
import re
import socket
import typing
from pathlib import Path

import msgspec

from app import tls
from app.config.errors import ConfigError
from app.config.schema import Config, Scope, Token

NODE_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
NATS_URL_RE = re.compile(r"^(nats|tls|ws|wss)://[^\s,/]+(:\d+)?/?$")
SQL_DSN_RE = re.compile(r"^(mysql|mariadb|postgresql|postgres)://[^\s/]+(/[A-Za-z0-9_$-]*)?(\?\S*)?$")


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
    if cfg.kv.enabled and not cfg.scheduler.enabled:
        raise ConfigError("kv.enabled", "the kv store needs the scheduler (scheduler.enabled) to place its shards")
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
