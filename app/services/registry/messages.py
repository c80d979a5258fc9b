"""Registry messages: log commands (a tagged union), stats, ACLs, results and watch events."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec

# Permission bits, as ZooKeeper numbers them.
PERM_READ, PERM_WRITE, PERM_CREATE, PERM_DELETE, PERM_ADMIN = 1, 2, 4, 8, 16
PERM_ALL = 31

# What ZooKeeper's wire types can carry, and so what the edges (REST, WebSocket, ZooKeeper, CLI)
# accept: versions are jute ints, session ids and TTLs longs, timeouts ints. A value past these
# is refused where it enters (400 naming the field), never put in a log entry.
INT32_MAX = 2**31 - 1
INT64_MAX = 2**63 - 1
Version = Annotated[int, msgspec.Meta(ge=-1, le=INT32_MAX)]  # -1: any version
SessionId = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]  # 0: none
TtlMs = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
TimeoutMs = Annotated[int, msgspec.Meta(gt=0, le=INT32_MAX)]

KIND_PERSISTENT = 0
KIND_CONTAINER = 1
KIND_TTL = 2


class Acl(msgspec.Struct, frozen=True, array_like=True):
    """One ACL entry: permission bits, scheme (world, digest, ip, ...) and id."""

    perms: int
    scheme: str
    id: str


OPEN_ACL_UNSAFE = (Acl(PERM_ALL, "world", "anyone"),)


class Stat(msgspec.Struct, frozen=True, rename="camel"):
    """A znode's stat, field for field ZooKeeper's (zxids are fleetmate revisions; times in ms)."""

    czxid: int
    mzxid: int
    pzxid: int
    ctime: int
    mtime: int
    version: int
    cversion: int
    aversion: int
    ephemeral_owner: int
    data_length: int
    num_children: int


# ---- log commands -----------------------------------------------------------------------------
# Time and ids come inside the command, chosen by the replica that appends it: apply is pure.


class Create(msgspec.Struct, frozen=True, tag="create", array_like=True):
    """Create a node (ephemeral when session_id != 0; sequential appends the parent's cversion)."""

    path: str
    data: bytes | None = b""  # None is ZooKeeper's null data (length -1), kept apart from empty
    session_id: int = 0
    sequential: bool = False
    container: bool = False
    parents: bool = False
    acl: tuple[Acl, ...] = OPEN_ACL_UNSAFE
    time_ms: int = 0
    ttl_ms: int = 0  # > 0: a TTL node, reaped by the leader when childless and unmodified that long


class SetData(msgspec.Struct, frozen=True, tag="set", array_like=True):
    """Replace a node's data; version -1 matches any."""

    path: str
    data: bytes | None
    version: int = -1
    time_ms: int = 0


class Delete(msgspec.Struct, frozen=True, tag="delete", array_like=True):
    """Delete a node (version -1 matches any); recursive deletes the subtree, deepest first."""

    path: str
    version: int = -1
    recursive: bool = False


class Check(msgspec.Struct, frozen=True, tag="check", array_like=True):
    """Fail unless the node exists with this version (-1: any); only meaningful inside Multi."""

    path: str
    version: int = -1


class SetAcl(msgspec.Struct, frozen=True, tag="setacl", array_like=True):
    """Replace a node's ACL; version is the expected aversion (-1: any)."""

    path: str
    acl: tuple[Acl, ...]
    version: int = -1


Op = Create | SetData | Delete | Check


class Multi(msgspec.Struct, frozen=True, tag="multi", array_like=True):
    """Several operations applied atomically: all succeed or none."""

    ops: tuple[Op, ...]
    time_ms: int = 0
    term: int = 0  # > 0: a leader's write, refused (StaleTerm) unless this is still the latest term


class OpenSession(msgspec.Struct, frozen=True, tag="open", array_like=True):
    """Start a session with a negotiated timeout."""

    session_id: int
    timeout_ms: int
    time_ms: int = 0
    password: bytes = b""


class CloseSession(msgspec.Struct, frozen=True, tag="close", array_like=True):
    """End a session at the client's request: its ephemeral nodes go."""

    session_id: int


class ExpireSession(msgspec.Struct, frozen=True, tag="expire", array_like=True):
    """The leader (of `term`) decided this session timed out."""

    session_id: int
    term: int


class LeaderElected(msgspec.Struct, frozen=True, tag="leader", array_like=True):
    """A replica took the lease for `term`; older terms are fenced from now on."""

    term: int
    node_id: str
    time_ms: int = 0


class ReapContainer(msgspec.Struct, frozen=True, tag="reap", array_like=True):
    """The leader (of `term`) removes a container node that had children and is empty again,
    or a TTL node with no children not modified for its TTL as of `time_ms` (the leader's clock)."""

    path: str
    term: int
    time_ms: int = 0


Command = (
    Create
    | SetData
    | Delete
    | Check
    | SetAcl
    | Multi
    | OpenSession
    | CloseSession
    | ExpireSession
    | LeaderElected
    | ReapContainer
)

# ---- results (local to the replica that applied; never on the wire) ---------------------------


class Created(msgspec.Struct, frozen=True):
    """A node was created at `path` (differs from the request for sequential nodes)."""

    path: str
    stat: Stat


class Updated(msgspec.Struct, frozen=True):
    """A node's data or ACL changed, or a check passed."""

    path: str
    stat: Stat


class Deleted(msgspec.Struct, frozen=True):
    """These nodes were deleted, deepest first."""

    path: str
    deleted: tuple[str, ...]


class MultiDone(msgspec.Struct, frozen=True):
    """Every operation of a Multi, in order."""

    results: tuple[Created | Updated | Deleted, ...]


class SessionOpened(msgspec.Struct, frozen=True):
    """A session exists with this timeout."""

    session_id: int
    timeout_ms: int


class SessionClosed(msgspec.Struct, frozen=True):
    """A session ended (closed or expired) and took these ephemeral nodes."""

    session_id: int
    deleted: tuple[str, ...]


class Noted(msgspec.Struct, frozen=True):
    """A command that changes no node (leader elected, nothing to reap)."""

    what: str


Result = Created | Updated | Deleted | MultiDone | SessionOpened | SessionClosed | Noted

# ---- watch events -----------------------------------------------------------------------------

EventType = Literal["created", "deleted", "changed", "children"]


class Event(msgspec.Struct, frozen=True, array_like=True):
    """One change seen by watchers: children means a child was added or removed under path."""

    revision: int
    type: EventType
    path: str
    version: int = 0


# ---- bus messages -----------------------------------------------------------------------------


class KeepaliveRequest(msgspec.Struct, frozen=True):
    """A client's session keepalive, forwarded to the leader over core NATS.

    idle_ms: how long before sending the forwarding replica last heard from the client. Replicas
    forward at most every third of the timeout, so the leader counts the timeout from the
    client's last activity (its own clock minus idle_ms), never from when the forward arrived.
    """

    session_id: SessionId
    idle_ms: Annotated[int, msgspec.Meta(ge=0, le=INT32_MAX)] = 0


class KeepaliveReply(msgspec.Struct, frozen=True):
    """The leader refreshed the session, whose timeout is timeout_ms."""

    session_id: int
    timeout_ms: int


class Entry(msgspec.Struct, frozen=True, array_like=True):
    """One log entry: the commands the batcher gathered, applied in order."""

    commands: list[Command]
