"""The schema's keys and their spellings: dotted keys, FLEETMATE_* variables, flags, help text, values from text."""

from __future__ import annotations

import functools
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

import msgspec

from app import failpoints
from app.config.errors import ConfigError
from app.config.schema import SECTIONS, Config

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
DEFAULT_TOML = Path(__file__).resolve().parents[2] / "config" / "default.toml"


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
    declared = key_type(key)
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
    return describe_type(tp) + (" " + ", ".join(bounds) if bounds else "")


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


def key_type(key: str) -> Any:
    if "." in key:
        section, sub = key.split(".", 1)
        return _fields(SECTIONS[section])[sub]
    return _fields(Config)[key]


def _base_type(tp: Any) -> Any:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return tp


def describe_type(tp: Any) -> str:
    tp = _base_type(tp)
    if typing.get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        tp, "a comma-separated list" if typing.get_origin(tp) is tuple else str(tp)
    )


def from_text(key: str, raw: str) -> Any:
    """Turn one variable's or flag's string into the typed value for key."""
    tp = _base_type(key_type(key))
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
