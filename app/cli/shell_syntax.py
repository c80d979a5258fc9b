"""The shell's command-line grammar: statuses, usage errors, command specs, `;` splitting, flag parsing."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from app.cli.shell_client import ShellError


class Status(enum.IntEnum):
    """A command's outcome, also the script's exit code (the worst one wins)."""

    OK = 0
    FAILED = 1
    USAGE = 2


class UsageError(ShellError):
    """A command line the shell itself rejects (reported as BadArguments, exit code 2)."""

    def __init__(self, message: str) -> None:
        super().__init__("BadArguments", message)


@dataclass(frozen=True)
class Spec:
    """A command's syntax: boolean flags, flags with a value, positional paths, and a trailing value."""

    usage: str
    summary: str
    options: tuple[str, ...] = ()  # lines describing the flags, for `CMD -h`
    flags: str = ""  # boolean one-letter flags
    valued: str = ""  # one-letter flags that take a value
    paths: tuple[int, int] = (1, 1)  # min and max positional paths
    value: str = ""  # "required" or "optional": the rest of the line after the path


@dataclass
class Args:
    """A parsed command line."""

    flags: set[str] = field(default_factory=set)
    valued: dict[str, str] = field(default_factory=dict)
    paths: list[str] = field(default_factory=list)
    value: str | None = None
    help: bool = False


def split_commands(line: str) -> list[str]:
    """Split a line at `;` outside quotes (a value may contain a quoted `;`)."""
    parts: list[str] = []
    current: list[str] = []
    quote, escaped = "", False
    for ch in line:
        if escaped:
            escaped = False
        elif ch == "\\" and quote != "'":
            escaped = True
        elif quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == ";":
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p.strip() for p in parts if p.strip()]


def parse(name: str, spec: Spec, tokens: list[str]) -> Args:
    """Parse a command's tokens: flags (combinable, -vN or -v N), paths, then the rest as the value."""
    args = Args()
    i, options_done = 0, False
    while i < len(tokens):
        token = tokens[i]
        if spec.value and args.paths:
            break  # after the path, everything is the value, dashes included
        i += 1
        if not options_done and token in ("-h", "--help"):
            args.help = True
        elif not options_done and token == "--":
            options_done = True
        elif not options_done and token.startswith("-") and len(token) > 1:
            letters = token[1:]
            for j, letter in enumerate(letters):
                if letter in spec.valued:
                    value = letters[j + 1 :]
                    if not value:
                        if i >= len(tokens):
                            raise UsageError(f"{name}: -{letter} needs a value")
                        value, i = tokens[i], i + 1
                    args.valued[letter] = value
                    break
                if letter not in spec.flags:
                    raise UsageError(f"{name}: unknown option -{letter}")
                args.flags.add(letter)
        else:
            args.paths.append(token)
    if args.help:
        return args
    lo, hi = spec.paths
    if len(args.paths) < lo:
        raise UsageError(f"{name}: a path is needed")
    if len(args.paths) > hi:
        raise UsageError(f"{name}: unexpected argument {args.paths[hi]!r}")
    if spec.value:
        rest = tokens[i:]
        if not rest and spec.value == "required":
            raise UsageError(f'{name}: a value is needed (use "" for empty data)')
        args.value = " ".join(rest) if rest else None
    return args


def version_option(args: Args, name: str) -> int:
    """The -v version of a command; -1 (any version) without it."""
    raw = args.valued.get("v")
    if raw is None:
        return -1
    try:
        version = int(raw)
    except ValueError:
        raise UsageError(f"{name}: -v needs an integer version, not {raw!r}") from None
    if version < -1:
        raise UsageError(f"{name}: -v must be >= -1")
    return version


def wait_option(args: Args, name: str) -> int:
    """The -w milliseconds to wait; 0 without it."""
    raw = args.valued.get("w")
    if raw is None:
        return 0
    if not raw.isdigit() or int(raw) > 300_000:
        raise UsageError(f"{name}: -w needs milliseconds from 0 to 300000, not {raw!r}")
    return int(raw)
