"""Registry write commands, built and syntax-checked once: every edge (REST, the lean path, the
ZooKeeper port, the Python API) builds its writes here before they are appended.

The checks are the edge's: path syntax and the configured path and data sizes, the ranges
ZooKeeper's wire types carry, the flag combinations a create may take. A command built here can
always be encoded, appended and applied. apply() keeps its own deterministic guard for structure
(RegistryState), so a command that reached the log some other way is still refused the same way
on every replica.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Protocol

from app.services.registry import paths
from app.services.registry.errors import BadArguments, InvalidACL, NodeExists, RegistryError
from app.services.registry.messages import (
    INT32_MAX,
    INT64_MAX,
    OPEN_ACL_UNSAFE,
    Acl,
    Check,
    Create,
    Delete,
    Multi,
    SetAcl,
    SetData,
)

MultiOp = Create | SetData | Delete | Check
MULTI_SLACK_BYTES = 64 << 10  # a multi may carry max_data_bytes of data plus this much of paths and framing


class Limits(Protocol):
    """The configured bounds the builders check (RegistryConfig has them)."""

    @property
    def max_path_bytes(self) -> int: ...

    @property
    def max_data_bytes(self) -> int: ...


def now_ms() -> int:
    """Wall-clock milliseconds: the time a command carries, chosen by its appender (apply stays pure)."""
    return int(time.time() * 1000)


def check_data(limits: Limits, data: bytes | None, path: str) -> int:
    """Check data (None is ZooKeeper's null); returns its size."""
    if data is None:
        return 0
    if not isinstance(data, bytes):
        raise BadArguments("data must be bytes or None", path)
    if len(data) > limits.max_data_bytes:
        raise BadArguments(f"data is {len(data)} bytes; the limit is {limits.max_data_bytes}", path)
    return len(data)


def version_in_range(version: int, path: str) -> int:
    """A version fits ZooKeeper's int32 (-1: any)."""
    if not -1 <= version <= INT32_MAX:
        raise BadArguments(f"version must be -1 (any) or 0..{INT32_MAX} (ZooKeeper's int32), not {version}", path)
    return version


def build_create(
    limits: Limits,
    path: str,
    data: bytes | None = b"",
    *,
    session_id: int = 0,
    sequential: bool = False,
    container: bool = False,
    parents: bool = False,
    acl: tuple[Acl, ...] | None = None,
    ttl_ms: int = 0,
    now: int = 0,
) -> Create:
    """A checked Create: ephemeral when session_id is given, a TTL node when ttl_ms > 0; acl None is open."""
    if path == paths.ROOT:
        raise NodeExists("the root node always exists", path)
    paths.validate(path + "0" if sequential else path, limits.max_path_bytes)
    check_data(limits, data, path)
    if container and (session_id or sequential):
        raise BadArguments("a container node cannot be ephemeral or sequential", path)
    if not 0 <= session_id <= INT64_MAX:
        raise BadArguments(f"session_id must be 0..{INT64_MAX} (ZooKeeper's int64), not {session_id}", path)
    if acl is not None and not acl:
        raise InvalidACL("an ACL needs at least one entry", path)
    if not 0 <= ttl_ms <= INT64_MAX:
        raise BadArguments(f"ttl_ms must be 0..{INT64_MAX}, not {ttl_ms}", path)
    if ttl_ms and (session_id or container):
        raise BadArguments("a TTL node is persistent (not ephemeral nor a container), with a positive TTL", path)
    return Create(path, data, session_id, sequential, container, parents, acl or OPEN_ACL_UNSAFE, now, ttl_ms)


def build_set(limits: Limits, path: str, data: bytes | None, version: int = -1, now: int = 0) -> SetData:
    """A checked SetData (data None: ZooKeeper's null); version -1 matches any."""
    paths.validate(path, limits.max_path_bytes)
    if data is not None:
        check_data(limits, data, path)
    if not -1 <= version <= INT32_MAX:
        version_in_range(version, path)
    return SetData(path, data, version, now)


def build_delete(limits: Limits, path: str, version: int = -1, recursive: bool = False) -> Delete:
    """A checked Delete (never of the root)."""
    paths.validate(path, limits.max_path_bytes, allow_root=False)
    return Delete(path, version_in_range(version, path), recursive)


def build_check(limits: Limits, path: str, version: int = -1) -> Check:
    """A checked Check (a multi's version guard)."""
    paths.validate(path, limits.max_path_bytes)
    return Check(path, version_in_range(version, path))


def build_set_acl(limits: Limits, path: str, acl: tuple[Acl, ...], version: int = -1) -> SetAcl:
    """A checked SetAcl: at least one entry; version is the expected aversion (-1: any)."""
    paths.validate(path, limits.max_path_bytes)
    if not acl:
        raise InvalidACL("an ACL needs at least one entry", path)
    return SetAcl(path, acl, version_in_range(version, path))


def build_op(limits: Limits, op: MultiOp, now: int) -> MultiOp:
    """One multi operation checked as its command is (Create and SetData take the multi's time)."""
    match op:
        case Create():
            return build_create(
                limits,
                op.path,
                op.data,
                session_id=op.session_id,
                sequential=op.sequential,
                container=op.container,
                parents=op.parents,
                acl=op.acl,
                ttl_ms=op.ttl_ms,
                now=now,
            )
        case SetData():
            return build_set(limits, op.path, op.data, op.version, now)
        case Delete():
            return build_delete(limits, op.path, op.version, op.recursive)
        case Check():
            return build_check(limits, op.path, op.version)
        case _:
            raise BadArguments(f"unknown operation {type(op).__name__}")


def multi_size(ops: Sequence[MultiOp]) -> int:
    """A multi's size as the batcher and the limit count it (data, paths, framing)."""
    size = 32
    for op in ops:
        if isinstance(op, Create | SetData):
            size += len(op.data or b"")
        size += len(op.path) + 16
    return size


def assemble_multi(limits: Limits, ops: Sequence[MultiOp], now: int, term: int = 0) -> Multi:
    """A Multi of operations already built (build_op or the build_* functions): not empty, not too large."""
    if not ops:
        raise BadArguments("multi needs at least one operation")
    size = multi_size(ops)
    if size > limits.max_data_bytes + MULTI_SLACK_BYTES:
        raise BadArguments(f"multi is {size} bytes; the limit is {limits.max_data_bytes} plus 64 KiB")
    return Multi(tuple(ops), now, term)


def build_multi(limits: Limits, ops: Sequence[MultiOp], now: int, term: int = 0) -> Multi:
    """A checked Multi from unchecked operations; a failing one's error carries its failed_index.

    term > 0 makes it a leader's duty, refused in apply once a newer leader was elected.
    """
    if not ops:
        raise BadArguments("multi needs at least one operation")
    checked: list[MultiOp] = []
    for index, op in enumerate(ops):
        try:
            checked.append(build_op(limits, op, now))
        except RegistryError as err:
            err.failed_index = index
            raise
    return assemble_multi(limits, checked, now, term)
