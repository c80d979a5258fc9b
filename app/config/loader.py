"""Loading: config/default.toml, a file, FLEETMATE_* variables and flags merged into one validated Config."""

from __future__ import annotations

import contextlib
import os
import re
import tomllib
import typing
from pathlib import Path
from typing import Any

import msgspec

from app import failpoints
from app.config.checks import validate
from app.config.errors import ConfigError
from app.config.keys import (
    DEFAULT_TOML,
    ENV_PREFIX,
    RESERVED_ENV,
    describe_type,
    env_keys,
    flag_name,
    from_text,
    key_names,
    key_type,
)
from app.config.schema import SECTIONS, Config


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
                problem = f"expected {describe_type(key_type(key))}, got {got}"
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
            _set_dotted(tree, known[name], from_text(known[name], raw))
        except ConfigError as exc:
            raise ConfigError(f"{exc.key} ({name})", exc.problem) from None
    schema = set(key_names())
    for key, raw in (flags or {}).items():
        if key not in schema:
            raise ConfigError(flag_name(key), "unknown flag")
        origin[key] = flag_name(key)  # a flag wins over a variable, and so names the source
        try:
            _set_dotted(tree, key, from_text(key, raw))
        except ConfigError as exc:
            raise ConfigError(f"{exc.key} ({flag_name(key)})", exc.problem) from None
    try:
        return validate(_convert(tree))
    except ConfigError as exc:
        if exc.key in origin:
            raise ConfigError(f"{exc.key} ({origin[exc.key]})", exc.problem) from None
        raise
