"""REST bodies of the registry and sessions APIs (msgspec Structs, shown in OpenAPI)."""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import msgspec

from app.services.registry.errors import BadArguments
from app.services.registry.messages import INT64_MAX, Acl, SessionId, Stat, TimeoutMs, TtlMs, Version

Encoding = Literal["utf-8", "base64"]


def decode_data(data: str | None, encoding: Encoding) -> bytes | None:
    """The bytes a client sent as text or base64; null stays null (ZooKeeper's null data)."""
    if data is None:
        return None
    if encoding == "base64":
        try:
            return base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise BadArguments("data is not valid base64") from None
    return data.encode("utf-8")


def encode_data(data: bytes | None, encoding: Encoding | None) -> tuple[str | None, Encoding]:
    """Data as text when asked (or when it is valid UTF-8 and no encoding was asked), else base64;
    null data is null."""
    if data is None:
        return None, encoding or "utf-8"
    if encoding != "base64":
        try:
            return data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            if encoding == "utf-8":
                raise BadArguments("the node's data is not valid UTF-8; ask for encoding=base64") from None
    return base64.b64encode(data).decode("ascii"), "base64"


class AclEntry(msgspec.Struct, frozen=True):
    """One ACL entry: perms is a bit mask (read 1, write 2, create 4, delete 8, admin 16)."""

    perms: Annotated[int, msgspec.Meta(ge=0, le=31)]
    scheme: str
    id: str

    def to_acl(self) -> Acl:
        return Acl(self.perms, self.scheme, self.id)


class NodeView(msgspec.Struct, frozen=True):
    """A node: its data (in `encoding`; null for ZooKeeper's null data, which is not empty data) and stat."""

    path: str
    data: str | None
    encoding: Encoding
    stat: Stat


class StatView(msgspec.Struct, frozen=True):
    """A node's path and stat."""

    path: str
    stat: Stat


class CreateBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Create a node. ephemeral needs session_id; sequential appends a 10-digit counter; ttl_ms > 0 makes a
    TTL node, deleted once it has no children and was not modified for that long."""

    data: str | None = ""  # null: ZooKeeper's null data, kept apart from ""
    encoding: Encoding = "utf-8"
    ephemeral: bool = False
    session_id: SessionId = 0
    sequential: bool = False
    container: bool = False
    parents: bool = False
    acl: list[AclEntry] | None = None
    ttl_ms: TtlMs = 0


class SetBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Replace a node's data (null: ZooKeeper's null data); version -1 (default) matches any version."""

    data: str | None
    encoding: Encoding = "utf-8"
    version: Version = -1


class AclBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Replace a node's ACL; version is the expected aversion (-1: any)."""

    acl: list[AclEntry]
    version: Version = -1


class AclView(msgspec.Struct, frozen=True):
    """A node's ACL and stat."""

    path: str
    acl: list[AclEntry]
    stat: Stat


class DeletedView(msgspec.Struct, frozen=True):
    """What a delete removed, deepest first."""

    path: str
    deleted: list[str]


class ChildView(msgspec.Struct, frozen=True):
    """A child's name and, when asked, its stat."""

    name: str
    stat: Stat | None = None


class ChildrenView(msgspec.Struct, frozen=True):
    """A node's children (sorted) and its own stat."""

    path: str
    children: list[str | ChildView]  # names, or name+stat objects when stat=true
    stat: Stat


class CheckBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Succeed only if the node exists at this version (-1: any)."""

    path: str
    version: Version = -1


class OpCreate(msgspec.Struct, frozen=True, tag="create", tag_field="op", forbid_unknown_fields=True):
    """Multi: create."""

    path: str
    data: str | None = ""
    encoding: Encoding = "utf-8"
    ephemeral: bool = False
    session_id: SessionId = 0
    sequential: bool = False
    container: bool = False
    parents: bool = False


class OpSet(msgspec.Struct, frozen=True, tag="set", tag_field="op", forbid_unknown_fields=True):
    """Multi: set data."""

    path: str
    data: str | None
    encoding: Encoding = "utf-8"
    version: Version = -1


class OpDelete(msgspec.Struct, frozen=True, tag="delete", tag_field="op", forbid_unknown_fields=True):
    """Multi: delete (recursive is allowed)."""

    path: str
    version: Version = -1
    recursive: bool = False


class OpCheck(msgspec.Struct, frozen=True, tag="check", tag_field="op", forbid_unknown_fields=True):
    """Multi: check a version."""

    path: str
    version: Version = -1


class MultiBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Operations applied atomically: all or none."""

    ops: list[OpCreate | OpSet | OpDelete | OpCheck]


class OpResult(msgspec.Struct, frozen=True, omit_defaults=True):
    """One multi result: the op, its path (the created path for create) and stat or deleted paths."""

    op: str
    path: str
    stat: Stat | None = None
    deleted: list[str] | None = None


class MultiView(msgspec.Struct, frozen=True):
    """Every op's result and the revision they share."""

    revision: int
    results: list[OpResult]


class SessionBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Open a session; the timeout is clamped to the configured bounds."""

    timeout_ms: TimeoutMs = 10000


class SessionView(msgspec.Struct, frozen=True, omit_defaults=True):
    """A session: id, negotiated timeout and, when listed alone, its ephemeral nodes."""

    session_id: int
    timeout_ms: int
    created_ms: int = 0
    ephemerals: list[str] | None = None


class LockBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Take the lock at path for a session; wait up to wait_ms (0: try once)."""

    path: str
    session_id: Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=300_000)] = 0
    owner: str = ""


class LockView(msgspec.Struct, frozen=True):
    """The lock is held through `node` (delete it, or DELETE the lock, to release)."""

    path: str
    node: str
    owner: str


class ElectionBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Join the election at path as candidate; wait up to wait_ms to become leader (0: do not wait)."""

    path: str
    session_id: Annotated[int, msgspec.Meta(gt=0, le=INT64_MAX)]
    candidate: str
    wait_ms: Annotated[int, msgspec.Meta(ge=0, le=300_000)] = 0


class ElectionView(msgspec.Struct, frozen=True):
    """An election: the leader's candidate and node, and every contender in order."""

    path: str
    leader: str | None
    leader_node: str | None
    contenders: list[str]
    node: str | None = None
    elected: bool = False


class RegistryStatus(msgspec.Struct, frozen=True):
    """The registry as this replica has applied it."""

    revision: int
    nodes: int
    sessions: int
    term: int
    leader: str
    applied_seq: int
    watches: int
    oldest_resumable_revision: int
