"""ZooKeeper's client protocol records: op codes, error codes, requests decoded from jute, replies encoded to it."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec

from app.services.registry.messages import Acl, Stat
from app.zk.jute import JuteError, Reader, Writer

# Op codes (ZooDefs.OpCode).
NOTIFICATION, CREATE, DELETE, EXISTS, GET_DATA, SET_DATA, GET_ACL, SET_ACL = 0, 1, 2, 3, 4, 5, 6, 7
GET_CHILDREN, SYNC, PING, GET_CHILDREN2, CHECK, MULTI, CREATE2, RECONFIG = 8, 9, 11, 12, 13, 14, 15, 16
CHECK_WATCHES, REMOVE_WATCHES, CREATE_CONTAINER, DELETE_CONTAINER, CREATE_TTL, MULTI_READ = 17, 18, 19, 20, 21, 22
AUTH, SET_WATCHES, SASL, GET_EPHEMERALS, GET_ALL_CHILDREN_NUMBER, SET_WATCHES2, ADD_WATCH = (
    100,
    101,
    102,
    103,
    104,
    105,
    106,
)
WHO_AM_I, CLOSE_SESSION, ERROR = 107, -11, -1

# Special xids.
XID_NOTIFICATION, XID_PING, XID_AUTH, XID_SET_WATCHES = -1, -2, -4, -8

# Error codes (KeeperException.Code) the front end itself produces; registry errors carry theirs.
OK, SYSTEM_ERROR, RUNTIME_INCONSISTENCY, MARSHALLING_ERROR, UNIMPLEMENTED = 0, -1, -2, -5, -6
BAD_ARGUMENTS, NO_NODE, NO_AUTH, SESSION_EXPIRED, AUTH_FAILED, NO_WATCHER = -8, -101, -102, -112, -115, -121

# Create modes (CreateMode): flags of create/create2/createContainer/createTTL.
EPHEMERAL, SEQUENTIAL, CONTAINER, TTL = 1, 2, 4, 5
CREATE_FLAGS = {
    0: (False, False, False, False),  # persistent
    1: (True, False, False, False),  # ephemeral
    2: (False, True, False, False),  # persistent sequential
    3: (True, True, False, False),  # ephemeral sequential
    4: (False, False, True, False),  # container
    5: (False, False, False, True),  # persistent with TTL
    6: (False, True, False, True),  # persistent sequential with TTL
}

# Watcher events (Watcher.Event.EventType) and the connected state.
EV_CREATED, EV_DELETED, EV_CHANGED, EV_CHILDREN = 1, 2, 3, 4
EVENT_TYPES = {"created": EV_CREATED, "deleted": EV_DELETED, "changed": EV_CHANGED, "children": EV_CHILDREN}
STATE_SYNC_CONNECTED = 3

# removeWatches/checkWatches types (WatcherType) and addWatch modes.
WATCH_CHILDREN, WATCH_DATA, WATCH_ANY = 1, 2, 3
ADD_WATCH_PERSISTENT, ADD_WATCH_PERSISTENT_RECURSIVE = 0, 1

PASSWORD_BYTES = 16

# ---- requests -----------------------------------------------------------------------------------


class ConnectRequest(msgspec.Struct, frozen=True):
    """The first packet of a connection."""

    protocol_version: int
    last_zxid_seen: int
    timeout_ms: int
    session_id: int
    password: bytes
    read_only: bool | None  # None: the client did not send the flag


class PathRequest(msgspec.Struct, frozen=True):
    """sync, getACL, getEphemerals, getAllChildrenNumber, deleteContainer."""

    path: str


class PathWatchRequest(msgspec.Struct, frozen=True):
    """exists, getData, getChildren, getChildren2."""

    path: str
    watch: bool


class CreateRequest(msgspec.Struct, frozen=True):
    """create, create2, createContainer, createTTL (ttl_ms 0 unless createTTL)."""

    path: str
    data: bytes | None  # None: null data (length -1), kept apart from empty
    acl: tuple[Acl, ...]
    flags: int
    ttl_ms: int = 0


class DeleteRequest(msgspec.Struct, frozen=True):
    """delete (and check: the same fields)."""

    path: str
    version: int


class SetDataRequest(msgspec.Struct, frozen=True):
    """setData."""

    path: str
    data: bytes | None
    version: int


class SetAclRequest(msgspec.Struct, frozen=True):
    """setACL."""

    path: str
    acl: tuple[Acl, ...]
    version: int


class SetWatchesRequest(msgspec.Struct, frozen=True):
    """setWatches (and setWatches2 with the persistent lists) after a reconnect."""

    relative_zxid: int
    data: list[str]
    exist: list[str]
    child: list[str]
    persistent: list[str] = msgspec.field(default_factory=list)
    persistent_recursive: list[str] = msgspec.field(default_factory=list)


class WatchTypeRequest(msgspec.Struct, frozen=True):
    """addWatch (mode), removeWatches and checkWatches (watcher type)."""

    path: str
    kind: int


class AuthRequest(msgspec.Struct, frozen=True):
    """An auth packet: scheme and credentials."""

    kind: int
    scheme: str
    auth: bytes


class MultiRequest(msgspec.Struct, frozen=True):
    """multi or multiRead: (op code, request) pairs."""

    ops: list[tuple[int, Any]]


class Empty(msgspec.Struct, frozen=True):
    """A request with no body (ping, closeSession, whoAmI)."""


def _acl_list(r: Reader) -> tuple[Acl, ...]:
    out = []
    for _ in range(r.count()):
        perms = r.int()
        out.append(Acl(perms, r.ustring(), r.ustring()))
    return tuple(out)


def read_connect(data: bytes) -> ConnectRequest:
    """Decode a ConnectRequest (the trailing readOnly flag is optional)."""
    r = Reader(data)
    req = ConnectRequest(r.int(), r.long(), r.int(), r.long(), r.buffer() or b"", None)
    if r.remaining() >= 1:
        req = msgspec.structs.replace(req, read_only=r.bool())
    return req


def _path(r: Reader) -> PathRequest:
    return PathRequest(r.ustring())


def _path_watch(r: Reader) -> PathWatchRequest:
    return PathWatchRequest(r.ustring(), r.bool())


def _create(r: Reader) -> CreateRequest:
    return CreateRequest(r.ustring(), r.buffer(), _acl_list(r), r.int())


def _create_ttl(r: Reader) -> CreateRequest:
    return CreateRequest(r.ustring(), r.buffer(), _acl_list(r), r.int(), r.long())


def _delete(r: Reader) -> DeleteRequest:
    return DeleteRequest(r.ustring(), r.int())


def _set_data(r: Reader) -> SetDataRequest:
    return SetDataRequest(r.ustring(), r.buffer(), r.int())


def _set_acl(r: Reader) -> SetAclRequest:
    return SetAclRequest(r.ustring(), _acl_list(r), r.int())


def _set_watches(r: Reader) -> SetWatchesRequest:
    return SetWatchesRequest(r.long(), r.strings(), r.strings(), r.strings())


def _set_watches2(r: Reader) -> SetWatchesRequest:
    return SetWatchesRequest(r.long(), r.strings(), r.strings(), r.strings(), r.strings(), r.strings())


def _watch_type(r: Reader) -> WatchTypeRequest:
    return WatchTypeRequest(r.ustring(), r.int())


def _auth(r: Reader) -> AuthRequest:
    return AuthRequest(r.int(), r.ustring(), r.buffer() or b"")


def _empty(r: Reader) -> Empty:
    return Empty()


MULTI_WRITE_OPS = frozenset({CREATE, CREATE2, CREATE_CONTAINER, CREATE_TTL, DELETE, SET_DATA, CHECK})
MULTI_READ_OPS = frozenset({GET_DATA, GET_CHILDREN})


def _multi(r: Reader, allowed: frozenset[int]) -> MultiRequest:
    ops: list[tuple[int, Any]] = []
    while True:
        op, done, _err = r.int(), r.bool(), r.int()
        if done:
            return MultiRequest(ops)
        if op not in allowed:
            raise JuteError(f"op code {op} is not allowed inside this multi")
        ops.append((op, DECODERS[op](r)))
        if len(ops) > 10_000:
            raise JuteError("more than 10,000 operations in one multi")


DECODERS: dict[int, Callable[[Reader], Any]] = {
    CREATE: _create,
    CREATE2: _create,
    CREATE_CONTAINER: _create,
    CREATE_TTL: _create_ttl,
    DELETE: _delete,
    CHECK: _delete,
    EXISTS: _path_watch,
    GET_DATA: _path_watch,
    GET_CHILDREN: _path_watch,
    GET_CHILDREN2: _path_watch,
    SET_DATA: _set_data,
    GET_ACL: _path,
    SET_ACL: _set_acl,
    SYNC: _path,
    PING: _empty,
    CLOSE_SESSION: _empty,
    WHO_AM_I: _empty,
    GET_EPHEMERALS: _path,
    GET_ALL_CHILDREN_NUMBER: _path,
    DELETE_CONTAINER: _path,
    SET_WATCHES: _set_watches,
    SET_WATCHES2: _set_watches2,
    ADD_WATCH: _watch_type,
    REMOVE_WATCHES: _watch_type,
    CHECK_WATCHES: _watch_type,
    AUTH: _auth,
    MULTI: lambda r: _multi(r, MULTI_WRITE_OPS),
    MULTI_READ: lambda r: _multi(r, MULTI_READ_OPS),
}


def read_request(data: bytes) -> tuple[int, int, Any]:
    """(xid, op code, decoded request); JuteError for a packet that does not decode.

    An op code without a decoder (reconfig, sasl, unknown ones) decodes to None: the
    connection answers it with Unimplemented rather than dropping the client.
    """
    r = Reader(data)
    xid, op = r.int(), r.int()
    decoder = DECODERS.get(op)
    return xid, op, (decoder(r) if decoder is not None else None)


# ---- replies ------------------------------------------------------------------------------------


def write_stat(w: Writer, s: Stat) -> Writer:
    """Stat in ZooKeeper's field order."""
    w.long(s.czxid).long(s.mzxid).long(s.ctime).long(s.mtime)
    w.int(s.version).int(s.cversion).int(s.aversion).long(s.ephemeral_owner)
    return w.int(s.data_length).int(s.num_children).long(s.pzxid)


def write_acl(w: Writer, acl: tuple[Acl, ...]) -> Writer:
    """A vector of ACL entries."""
    w.int(len(acl))
    for entry in acl:
        w.int(entry.perms).ustring(entry.scheme).ustring(entry.id)
    return w


def connect_response(timeout_ms: int, session_id: int, password: bytes, read_only: bool | None) -> bytes:
    """The answer to ConnectRequest; timeout 0 and session 0 tell the client its session expired."""
    w = Writer().int(0).int(timeout_ms).long(session_id).buffer(password)
    if read_only is not None:
        w.bool(False)
    return w.frame()


def notification(zxid: int, event_type: int, path: str) -> bytes:
    """A watch event (xid -1)."""
    return Writer().header(XID_NOTIFICATION, zxid, OK).int(event_type).int(STATE_SYNC_CONNECTED).ustring(path).frame()
