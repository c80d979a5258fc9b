"""One command-line flag per configuration key (`--http-port` for http.port), generated from app.config's schema."""

from __future__ import annotations

import argparse

from app import config

_DEST = "config_key:"  # argparse dest of a key's flag: the prefix keeps it apart from other options


def _metavar(key: str) -> str:
    kind = config.describe_key(key)
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


def add_flags(parser: argparse.ArgumentParser) -> None:
    """A flag for every key, one group per section; each takes the text its FLEETMATE_* variable takes."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    docs = config.key_docs()
    for key in config.key_names():
        section = key.split(".", 1)[0] if "." in key else ""
        group = groups.get(section)
        if group is None:
            title = f"configuration [{section}]" if section else "configuration"
            description = (
                None
                if section
                else "Every configuration key is also a flag, over its FLEETMATE_* variable, over the files "
                "(`fleetmate config keys` lists them). A flag takes the text its variable takes; a bad value "
                "exits 2 naming the key. Secrets given here are visible to other local users (ps): prefer "
                "the variables or files for them."
            )
            group = groups[section] = parser.add_argument_group(title, description)
        default = config.default_text(key) or "none"
        doc = _prose(docs.get(key, ""))
        help_text = (
            f"{doc + ' ' if doc else ''}[{config.describe_key(key)}; default: {default}; ${config.env_name(key)}]"
        )
        options: dict[str, object] = {}
        if config.describe_key(key) == "true or false":
            options.update(nargs="?", const="true", metavar="BOOL")  # `--zk-enabled` alone means true
        else:
            options["metavar"] = _metavar(key)
        group.add_argument(
            config.flag_name(key),
            dest=_DEST + key,
            help=help_text.replace("%", "%%"),
            **options,  # type: ignore[arg-type]
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
