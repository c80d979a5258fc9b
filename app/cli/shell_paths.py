"""The shell's paths: ZooKeeper's own path rules and messages, and navigation relative to the working node."""

from __future__ import annotations

from app.cli.shell_client import ShellError


class InvalidPath(ShellError):
    """A path ZooKeeper refuses; the message is the one ZooKeeper's client gives (zkCli prints it)."""

    def __init__(self, message: str) -> None:
        super().__init__("BadArguments", message)


def _forbidden(code: int) -> bool:
    # ZooKeeper's character rule. A character beyond U+FFFF is two UTF-16 units to Java, and its
    # high surrogate falls in U+D800-U+F8FF; fleetmate's registry accepts such characters, so the
    # shell does too (ZooKeeper's Java client alone would refuse them).
    return 0 < code <= 0x1F or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xF8FF or 0xFFF0 <= code <= 0xFFFF


def _at(path: str, i: int) -> int:
    """The index ZooKeeper reports for path[i]: Java counts UTF-16 units."""
    return len(path[:i].encode("utf-16-le", "surrogatepass")) // 2


def path_problem(path: str, *, sequential: bool = False, dots: bool = False) -> str | None:
    """Why ZooKeeper refuses path, in its words (PathUtils.validatePath), or None when it is valid.

    sequential: the server appends the counter, so a trailing '/' is fine (ZooKeeper checks path + "1").
    dots: '.' and '..' segments pass (the shell resolves them in relative paths before anything is sent).
    """
    if sequential:
        path += "1"
    if not path:
        return "Path length must be > 0"
    if path[0] != "/":
        return "Path must start with / character"
    if len(path) == 1:
        return None
    if path[-1] == "/":
        return "Path must not end with / character"
    reason = ""
    last = "/"
    for i in range(1, len(path)):
        c = path[i]
        if c == "\0":
            reason = "null character not allowed"
        elif c == "/" and last == "/":
            reason = "empty node name specified"
        elif c == "." and last == ".":
            if path[i - 2] == "/" and (i + 1 == len(path) or path[i + 1] == "/") and not dots:
                reason = "relative paths not allowed"
        elif c == ".":
            if path[i - 1] == "/" and (i + 1 == len(path) or path[i + 1] == "/") and not dots:
                reason = "relative paths not allowed"
        elif _forbidden(ord(c)):
            reason = "invalid character"
        if reason:
            return f'Invalid path string "{path}" caused by {reason} @{_at(path, i)}'
        last = c
    return None


def join(parent: str, name: str) -> str:
    """parent + '/' + name without doubling the root's slash."""
    return f"/{name}" if parent == "/" else f"{parent}/{name}"


def resolve(cwd: str, arg: str, *, sequential: bool = False, directory: bool = False) -> str:
    """The absolute path arg names from the working node cwd; InvalidPath when ZooKeeper would refuse it.

    An absolute arg is a ZooKeeper path and is taken exactly as written: '/a//b', '/a/', '/a/../b'
    are refused, never folded into another node. A relative arg is the shell's navigation: its '.'
    and '..' segments move from cwd (as in a Unix shell), and the rest must still be a valid path.
    directory (cd) lets one trailing '/' go, as tab completion leaves it after a node with children.
    """
    if directory and len(arg) > 1 and arg.endswith("/"):
        arg = arg[:-1]
    if not arg:
        raise InvalidPath("Path length must be > 0")
    if arg.startswith("/"):
        problem = path_problem(arg, sequential=sequential)
        if problem:
            raise InvalidPath(problem)
        return arg
    # Checked as written (joined to cwd), so the message points at the problem in what was typed.
    problem = path_problem(join(cwd, arg), sequential=sequential, dots=True)
    if problem:
        raise InvalidPath(problem)
    parts = [p for p in cwd.split("/") if p]
    for segment in arg.split("/"):
        if segment == ".":
            continue
        if segment == "..":
            if parts:
                parts.pop()
            continue
        parts.append(segment)  # "" only as the last segment of a sequential path: kept
    return "/" + "/".join(parts)
