"""Znode path syntax: validation, parent/name split, and sequential names."""

from __future__ import annotations

import re

from app.services.registry.errors import BadArguments

ROOT = "/"
# apply() checks structure with this bound; the configured (smaller) limit is checked on append.
MAX_STRUCTURAL_LENGTH = 1 << 20
# Forbidden in a path (ZooKeeper's rule): control characters, U+D800-U+F8FF, U+FFF0-U+FFFF.
_FORBIDDEN = r"\x00-\x1f\x7f-\x9f\ud800-\uf8ff\ufff0-\uffff"
# A valid path other than the root, as one pattern: each segment non-empty, not '.' or '..', no
# forbidden character. Every write checks its path, so the common case is one C call; a path it
# does not match goes on to _explain(), which finds the reason.
_VALID = re.compile(rf"(?:/(?!\.\.?(?:/|$))[^/{_FORBIDDEN}]+)+")


def validate(path: str, max_length: int, *, allow_root: bool = True) -> str:
    """Return path if it is a valid absolute znode path, else raise BadArguments saying why."""
    if (
        type(path) is str
        and _VALID.fullmatch(path) is not None
        and (len(path) * 4 <= max_length or len(path.encode("utf-8")) <= max_length)
    ):
        return path
    return _explain(path, max_length, allow_root)


def _explain(path: str, max_length: int, allow_root: bool) -> str:
    """validate() for what the pattern did not accept: the root, a str subclass, or the first rule broken."""
    if not isinstance(path, str) or not path:
        raise BadArguments("path must be a non-empty string", str(path))
    if len(path.encode("utf-8", "surrogatepass")) > max_length:
        raise BadArguments(f"path is longer than {max_length} bytes", path[:64])
    if not path.startswith("/"):
        raise BadArguments("path must start with '/'", path)
    if path == ROOT:
        if not allow_root:
            raise BadArguments("the root node cannot be used here", path)
        return path
    if path.endswith("/"):
        raise BadArguments("path must not end with '/'", path)
    for segment in path[1:].split("/"):
        if not segment:
            raise BadArguments("path has an empty segment ('//')", path)
        if segment in (".", ".."):
            raise BadArguments("path segments '.' and '..' are not allowed", path)
    for ch in path:
        code = ord(ch)
        if code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xF8FF or 0xFFF0 <= code <= 0xFFFF:
            raise BadArguments(f"path contains a forbidden character U+{code:04X}", path)
    return path


def parent_of(path: str) -> str:
    """The parent path ('/' for top-level nodes)."""
    idx = path.rfind("/")
    return ROOT if idx == 0 else path[:idx]


def name_of(path: str) -> str:
    """The last segment of path."""
    return path[path.rfind("/") + 1 :]


def join(parent: str, name: str) -> str:
    """parent + '/' + name without doubling the root slash."""
    return f"/{name}" if parent == ROOT else f"{parent}/{name}"


def sequential(path: str, counter: int) -> str:
    """ZooKeeper's sequential name: the path followed by the parent's cversion as 10 digits."""
    return f"{path}{counter:010d}"


def ancestors(path: str) -> list[str]:
    """Every proper ancestor of path except the root, shallowest first."""
    out = []
    idx = path.find("/", 1)
    while idx != -1:
        out.append(path[:idx])
        idx = path.find("/", idx + 1)
    return out


def is_under(path: str, prefix: str) -> bool:
    """True when path is prefix or a descendant of it."""
    if prefix == ROOT:
        return True
    return path == prefix or path.startswith(prefix + "/")
