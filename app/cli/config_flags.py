"""One command-line flag per configuration key (`--http-port` for http.port), generated from app.config's schema."""

from __future__ import annotations

import argparse
import functools
from typing import NamedTuple

from app import config

_DEST = "config_key:"  # argparse dest of a key's flag: the prefix keeps it apart from other options


def _metavar(kind: str) -> str:
    if kind.startswith("an integer"):
        return "N"
    if kind.startswith("a number"):
        return "X"
    if kind.startswith("one of "):
        return "{" + kind.removeprefix("one of ").replace("'", "").replace(" ", "") + "}"
    if kind.startswith("a comma-separated list"):
        return "A,B,..."
    if kind.startswith("a JSON"):
        return "JSON"
    return "TEXT"


def _prose(doc: str) -> str:
    """A key's documentation up to its first TOML example (a `[table]` line): help text is reflowed."""
    lines = []
    for line in doc.splitlines():
        if line.startswith("["):
            break
        lines.append(line)
    return " ".join(lines)


class _Flag(NamedTuple):
    """One key's flag as argparse is given it."""

    key: str
    section: str
    help: str
    options: dict[str, str]


@functools.cache  # serve, agent and config show take the same flags: work them out once
def _flags() -> tuple[_Flag, ...]:
    docs = config.key_docs()
    out = []
    for key in config.key_names():
        kind = config.describe_key(key)
        doc = _prose(docs.get(key, ""))
        default = config.default_text(key) or "none"
        help_text = f"{doc + ' ' if doc else ''}[{kind}; default: {default}; ${config.env_name(key)}]"
        if kind == "true or false":
            options = {"nargs": "?", "const": "true", "metavar": "BOOL"}  # `--zk-enabled` alone means true
        else:
            options = {"metavar": _metavar(kind)}
        section = key.split(".", 1)[0] if "." in key else ""
        out.append(_Flag(key, section, help_text.replace("%", "%%"), options))
    return tuple(out)


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every key, one group per section; each takes the text its FLEETMATE_* variable takes."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in _flags():
        group = groups.get(flag.section)
        if group is None:
            title = f"configuration [{flag.section}]" if flag.section else "configuration"
            description = (
                None
                if flag.section
                else "Every configuration key is also a flag, over its FLEETMATE_* variable, over the files "
                "(`fleetmate config keys` lists them). A flag takes the text its variable takes; a bad value "
                "exits 2 naming the key. Secrets given here are visible to other local users (ps): prefer "
                "the variables or files for them."
            )
            group = groups[flag.section] = parser.add_argument_group(title, description)
        group.add_argument(
            config.flag_name(flag.key),
            dest=_DEST + flag.key,
            help=flag.help,
            **flag.options,  # type: ignore[arg-type]
        )


def given(args: argparse.Namespace) -> dict[str, str]:
    """The keys set by flags on this command line, with their text (dotted key -> text)."""
    return {
        name.removeprefix(_DEST): value
        for name, value in vars(args).items()
        if name.startswith(_DEST) and value is not None
    }


def as_env(flags: dict[str, str]) -> dict[str, str]:
    """The same settings as FLEETMATE_* variables (for processes started with them, e.g. workers)."""
    return {config.env_name(key): value for key, value in flags.items()}
