"""The configuration as output: plain data or TOML with secrets masked, and its secrets for log redaction."""

from __future__ import annotations

import re
from typing import Any

import msgspec

from app.config.checks import parse_tokens
from app.config.errors import ConfigError
from app.config.schema import Config


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
