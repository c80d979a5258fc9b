"""The registry's pure state machine: apply(state, command) -> (result, events); no clock, no I/O."""

from __future__ import annotations

from collections.abc import Callable

import msgspec

from app.services.registry import paths
from app.services.registry.errors import (
    BadArguments,
    BadVersion,
    InvalidACL,
    NoChildrenForEphemerals,
    NodeExists,
    NoNode,
    NotEmpty,
    RegistryError,
    RuntimeInconsistency,
    SessionExpired,
    StaleTerm,
)
from app.services.registry.messages import (
    KIND_CONTAINER,
    KIND_PERSISTENT,
    KIND_TTL,
    OPEN_ACL_UNSAFE,
    Acl,
    Check,
    CloseSession,
    Command,
    Create,
    Created,
    Delete,
    Deleted,
    Event,
    ExpireSession,
    LeaderElected,
    Multi,
    MultiDone,
    Noted,
    OpenSession,
    ReapContainer,
    Result,
    SessionClosed,
    SessionOpened,
    SetAcl,
    SetData,
    Stat,
    Updated,
)

ROOT = paths.ROOT


class Znode(msgspec.Struct, frozen=True, array_like=True):
    """A node as stored (children are kept apart, so a parent's row never grows with them).

    data None is ZooKeeper's null data: it reads back as null, with data_length 0.
    """

    data: bytes | None
    czxid: int
    mzxid: int
    pzxid: int
    ctime: int
    mtime: int
    version: int
    cversion: int
    aversion: int
    ephemeral_owner: int
    kind: int
    acl: tuple[Acl, ...]
    ttl_ms: int = 0


class SessionRecord(msgspec.Struct, frozen=True, array_like=True):
    """A session as stored: its id, negotiated timeout, creation time and password."""

    session_id: int
    timeout_ms: int
    created_ms: int
    password: bytes = b""


def _expect_version(path: str, actual: int, expected: int, what: str = "") -> None:
    if expected not in (-1, actual):
        raise BadVersion(f"{path} {what}is at version {actual}, not {expected}", path)


_ROOT_NODE = Znode(b"", 0, 0, 0, 0, 0, 0, 0, 0, 0, KIND_PERSISTENT, OPEN_ACL_UNSAFE)

_Undo = Callable[[], None]


class RegistryState:
    """The whole applied registry: nodes, children, sessions, revision and leader term.

    Only `apply` mutates it. `dirty_nodes` / `dirty_sessions` name what changed since the
    last `take_dirty()`, so the store writes only those rows.
    """

    def __init__(self) -> None:
        self.nodes: dict[str, Znode] = {ROOT: _ROOT_NODE}
        self.children: dict[str, set[str]] = {ROOT: set()}
        self.sessions: dict[int, SessionRecord] = {}
        self.ephemerals: dict[int, set[str]] = {}
        self.revision = 0
        self.term = 0
        self.leader = ""
        self.dirty_nodes: set[str] = set()
        self.dirty_sessions: set[int] = set()
        self.meta_dirty = False
        self._undo: list[_Undo] | None = None

    # ---- loading (from the store) ----------------------------------------------------------

    def load(
        self,
        nodes: dict[str, Znode],
        sessions: dict[int, SessionRecord],
        revision: int,
        term: int,
        leader: str,
    ) -> None:
        """Replace everything with stored rows and rebuild the derived indexes."""
        self.nodes = {ROOT: _ROOT_NODE, **nodes}
        self.children = {path: set() for path in self.nodes}
        self.ephemerals = {sid: set() for sid in sessions}
        for path, node in self.nodes.items():
            if path != ROOT:
                self.children[paths.parent_of(path)].add(paths.name_of(path))
            if node.ephemeral_owner:
                self.ephemerals.setdefault(node.ephemeral_owner, set()).add(path)
        self.sessions = dict(sessions)
        self.revision, self.term, self.leader = revision, term, leader
        self.take_dirty()

    def take_dirty(self) -> tuple[set[str], set[int], bool]:
        """Return and reset the names of changed rows since the last call."""
        out = (self.dirty_nodes, self.dirty_sessions, self.meta_dirty)
        self.dirty_nodes, self.dirty_sessions, self.meta_dirty = set(), set(), False
        return out

    # ---- reads ------------------------------------------------------------------------------

    def stat(self, path: str) -> Stat:
        """The stat of an existing node; raises NoNode."""
        node = self.nodes.get(path)
        if node is None:
            raise NoNode(f"no node {path}", path)
        return self._stat(path, node)

    def _stat(self, path: str, node: Znode) -> Stat:
        return Stat(
            node.czxid,
            node.mzxid,
            node.pzxid,
            node.ctime,
            node.mtime,
            node.version,
            node.cversion,
            node.aversion,
            node.ephemeral_owner,
            len(node.data) if node.data is not None else 0,
            len(self.children[path]),
        )

    def get(self, path: str) -> tuple[bytes | None, Stat]:
        """Data and stat; raises NoNode."""
        node = self.nodes.get(path)
        if node is None:
            raise NoNode(f"no node {path}", path)
        return node.data, self._stat(path, node)

    def child_names(self, path: str) -> list[str]:
        """Sorted child names; raises NoNode."""
        kids = self.children.get(path)
        if kids is None:
            raise NoNode(f"no node {path}", path)
        return sorted(kids)

    def descendants(self, path: str) -> list[str]:
        """Every node below path (not path itself), breadth first: depth never decreases."""
        out: list[str] = []
        level = [path]
        while level:
            below = [paths.join(p, name) for p in level for name in sorted(self.children.get(p, ()))]
            out.extend(below)
            level = below
        return out

    def containers_to_reap(self, now_ms: int = 0) -> list[str]:
        """Container nodes that had children and have none now, and childless TTL nodes not modified
        for their TTL by now_ms (the leader's clock; 0 leaves TTL nodes out): the leader reaps them."""
        return [p for p, n in self.nodes.items() if self._reapable(p, n, now_ms)]

    def _reapable(self, path: str, node: Znode, now_ms: int) -> bool:
        if self.children[path]:
            return False
        if node.kind == KIND_CONTAINER:
            return node.cversion > 0
        return node.kind == KIND_TTL and now_ms > 0 and now_ms - node.mtime >= node.ttl_ms

    # ---- apply ------------------------------------------------------------------------------

    def apply(self, cmd: Command) -> tuple[Result | RegistryError, list[Event]]:
        """Apply one command: on success the revision grows by one; on error nothing changes."""
        events: list[Event] = []
        rev = self.revision + 1
        try:
            result = self._dispatch(cmd, rev, events)
        except RegistryError as err:
            return err, []
        except Exception as exc:  # a command apply cannot take: the same error on every replica, log goes on
            return RegistryError(f"{type(cmd).__name__} could not be applied: {exc!r}"), []
        self.revision = rev
        self.meta_dirty = True
        return result, events

    def _dispatch(self, cmd: Command, rev: int, events: list[Event]) -> Result:
        match cmd:
            case Create():
                return self._create(cmd, rev, cmd.time_ms, events)
            case SetData():
                return self._set(cmd, rev, cmd.time_ms, events)
            case Delete():
                return self._delete(cmd, rev, events)
            case SetAcl():
                return self._set_acl(cmd)
            case Multi():
                return self._multi(cmd, rev, events)
            case OpenSession():
                return self._open(cmd)
            case CloseSession():
                return self._end_session(cmd.session_id, rev, events)
            case ExpireSession():
                self._check_term(cmd.term)
                return self._end_session(cmd.session_id, rev, events)
            case LeaderElected():
                if cmd.term <= self.term:
                    raise StaleTerm(f"term {cmd.term} is not newer than {self.term}")
                self.term, self.leader = cmd.term, cmd.node_id
                return Noted(f"leader {cmd.node_id} term {cmd.term}")
            case ReapContainer():
                self._check_term(cmd.term)
                return self._reap(cmd.path, rev, events, cmd.time_ms)
            case Check():
                raise BadArguments("check is only valid inside multi", cmd.path)
        raise BadArguments(f"unknown command {type(cmd).__name__}")

    def _check_term(self, term: int) -> None:
        if term < self.term:
            raise StaleTerm(f"term {term} is older than the current leader's term {self.term}")

    # Every mutation goes through these four, which record how to undo it inside a multi.

    def _put_node(self, path: str, node: Znode | None) -> None:
        old = self.nodes.get(path)
        if self._undo is not None:
            self._undo.append(lambda: self._restore_node(path, old))
        if node is None:
            del self.nodes[path]
        else:
            self.nodes[path] = node
        self.dirty_nodes.add(path)

    def _restore_node(self, path: str, old: Znode | None) -> None:
        if old is None:
            self.nodes.pop(path, None)
        else:
            self.nodes[path] = old

    def _link(self, path: str, add: bool) -> None:
        parent, name = paths.parent_of(path), paths.name_of(path)
        if add:
            self.children[parent].add(name)
            self.children[path] = set()
        else:
            self.children[parent].discard(name)
            del self.children[path]
        if self._undo is not None:
            self._undo.append(lambda: self._link(path, not add))  # runs with _undo None: not re-recorded

    def _own(self, session_id: int, path: str, add: bool) -> None:
        owned = self.ephemerals.setdefault(session_id, set())
        if add:
            owned.add(path)
        else:
            owned.discard(path)
        if self._undo is not None:
            self._undo.append(lambda: self._own(session_id, path, not add))

    # ---- operations -------------------------------------------------------------------------

    def _create(self, cmd: Create, rev: int, now: int, events: list[Event]) -> Created:
        if cmd.path == ROOT:
            raise NodeExists("the root node always exists", ROOT)
        # A sequential name may end in '/' ('/q/' -> '/q/0000000003'): check the name it will get.
        paths.validate(cmd.path + "0" if cmd.sequential else cmd.path, paths.MAX_STRUCTURAL_LENGTH)
        if not cmd.acl:
            raise InvalidACL("an ACL needs at least one entry", cmd.path)
        if cmd.container and (cmd.session_id or cmd.sequential):
            raise BadArguments("a container node cannot be ephemeral or sequential", cmd.path)
        if cmd.ttl_ms and (cmd.session_id or cmd.container or cmd.ttl_ms < 0):
            raise BadArguments(
                "a TTL node is persistent (not ephemeral nor a container), with a positive TTL", cmd.path
            )
        if cmd.session_id and cmd.session_id not in self.sessions:
            raise SessionExpired(f"session 0x{cmd.session_id:x} does not exist", cmd.path)
        parent = paths.parent_of(cmd.path)
        missing: list[str] = []
        if parent not in self.nodes:
            if not cmd.parents:
                raise NoNode(f"parent {parent} does not exist", cmd.path)
            missing = [a for a in paths.ancestors(cmd.path) if a not in self.nodes]
        existing_parent = paths.parent_of(missing[0]) if missing else parent
        if self.nodes[existing_parent].ephemeral_owner:
            raise NoChildrenForEphemerals(f"{existing_parent} is ephemeral", cmd.path)
        path = cmd.path
        if cmd.sequential:
            counter = self.nodes[parent].cversion if not missing else 0
            path = paths.sequential(cmd.path, counter)
        if path in self.nodes:
            raise NodeExists(f"{path} already exists", path)
        for ancestor in missing:
            self._add_node(ancestor, b"", 0, KIND_PERSISTENT, OPEN_ACL_UNSAFE, rev=rev, now=now, events=events)
        kind = KIND_CONTAINER if cmd.container else KIND_TTL if cmd.ttl_ms else KIND_PERSISTENT
        self._add_node(
            path, cmd.data, cmd.session_id, kind, cmd.acl, rev=rev, now=now, events=events, ttl_ms=cmd.ttl_ms
        )
        return Created(path, self._stat(path, self.nodes[path]))

    def _add_node(
        self,
        path: str,
        data: bytes | None,
        owner: int,
        kind: int,
        acl: tuple[Acl, ...],
        *,
        rev: int,
        now: int,
        events: list[Event],
        ttl_ms: int = 0,
    ) -> None:
        parent = paths.parent_of(path)
        pnode = self.nodes[parent]
        self._put_node(path, Znode(data, rev, rev, rev, now, now, 0, 0, 0, owner, kind, acl, ttl_ms))
        self._put_node(parent, msgspec.structs.replace(pnode, cversion=pnode.cversion + 1, pzxid=rev))
        self._link(path, True)
        if owner:
            self._own(owner, path, True)
        events.append(Event(rev, "created", path, 0))
        events.append(Event(rev, "children", parent, 0))

    def _set(self, cmd: SetData, rev: int, now: int, events: list[Event]) -> Updated:
        node = self.nodes.get(cmd.path)
        if node is None:
            raise NoNode(f"no node {cmd.path}", cmd.path)
        _expect_version(cmd.path, node.version, cmd.version)
        new = msgspec.structs.replace(node, data=cmd.data, mzxid=rev, mtime=now, version=node.version + 1)
        self._put_node(cmd.path, new)
        events.append(Event(rev, "changed", cmd.path, new.version))
        return Updated(cmd.path, self._stat(cmd.path, new))

    def _delete(self, cmd: Delete, rev: int, events: list[Event]) -> Deleted:
        if cmd.path == ROOT:
            raise BadArguments("the root node cannot be deleted", ROOT)
        node = self.nodes.get(cmd.path)
        if node is None:
            raise NoNode(f"no node {cmd.path}", cmd.path)
        _expect_version(cmd.path, node.version, cmd.version)
        if self.children[cmd.path] and not cmd.recursive:
            raise NotEmpty(f"{cmd.path} has {len(self.children[cmd.path])} children", cmd.path)
        doomed = [*self.descendants(cmd.path)[::-1], cmd.path] if cmd.recursive else [cmd.path]
        for path in doomed:
            self._remove_node(path, rev, events)
        return Deleted(cmd.path, tuple(doomed))

    def _remove_node(self, path: str, rev: int, events: list[Event]) -> None:
        node = self.nodes[path]
        parent = paths.parent_of(path)
        pnode = self.nodes[parent]
        self._put_node(path, None)
        self._put_node(parent, msgspec.structs.replace(pnode, cversion=pnode.cversion + 1, pzxid=rev))
        self._link(path, False)
        if node.ephemeral_owner:
            self._own(node.ephemeral_owner, path, False)
        events.append(Event(rev, "deleted", path, node.version))
        events.append(Event(rev, "children", parent, 0))

    def check(self, cmd: Check) -> Updated:
        """Raise unless the node exists at the expected version (-1: any); a read, never logged."""
        node = self.nodes.get(cmd.path)
        if node is None:
            raise NoNode(f"no node {cmd.path}", cmd.path)
        _expect_version(cmd.path, node.version, cmd.version)
        return Updated(cmd.path, self._stat(cmd.path, node))

    def _set_acl(self, cmd: SetAcl) -> Updated:
        node = self.nodes.get(cmd.path)
        if node is None:
            raise NoNode(f"no node {cmd.path}", cmd.path)
        _expect_version(cmd.path, node.aversion, cmd.version, "ACL ")
        if not cmd.acl:
            raise InvalidACL("an ACL needs at least one entry", cmd.path)
        new = msgspec.structs.replace(node, acl=cmd.acl, aversion=node.aversion + 1)
        self._put_node(cmd.path, new)
        return Updated(cmd.path, self._stat(cmd.path, new))

    def _multi(self, cmd: Multi, rev: int, events: list[Event]) -> MultiDone:
        if cmd.term and cmd.term != self.term:
            raise StaleTerm(f"term {cmd.term} is not the current leader's term {self.term}")
        self._undo = []
        local: list[Event] = []
        results: list[Created | Updated | Deleted] = []
        try:
            for index, op in enumerate(cmd.ops):
                try:
                    results.append(self._multi_op(op, rev, cmd.time_ms, local))
                except RegistryError as err:
                    err.failed_index = index
                    raise
        except Exception:  # a RegistryError, or anything else: nothing of the multi stays
            undo, self._undo = self._undo, None
            for step in reversed(undo):
                step()
            raise
        self._undo = None
        events.extend(local)
        return MultiDone(tuple(results))

    def _multi_op(
        self, op: Create | SetData | Delete | Check, rev: int, now: int, events: list[Event]
    ) -> Created | Updated | Deleted:
        match op:
            case Create():
                return self._create(op, rev, now, events)
            case SetData():
                return self._set(msgspec.structs.replace(op, time_ms=now), rev, now, events)
            case Delete():
                return self._delete(op, rev, events)
            case Check():
                return self.check(op)
        raise RuntimeInconsistency(f"unknown multi op {type(op).__name__}")

    def _open(self, cmd: OpenSession) -> SessionOpened:
        if cmd.session_id in self.sessions:
            raise BadArguments(f"session 0x{cmd.session_id:x} already exists")
        if cmd.session_id <= 0:
            raise BadArguments("session ids are positive")
        self.sessions[cmd.session_id] = SessionRecord(cmd.session_id, cmd.timeout_ms, cmd.time_ms, cmd.password)
        self.ephemerals.setdefault(cmd.session_id, set())
        self.dirty_sessions.add(cmd.session_id)
        return SessionOpened(cmd.session_id, cmd.timeout_ms)

    def _end_session(self, session_id: int, rev: int, events: list[Event]) -> SessionClosed:
        if session_id not in self.sessions:
            raise SessionExpired(f"session 0x{session_id:x} does not exist")
        owned = sorted(self.ephemerals.get(session_id, ()), reverse=True)
        for path in owned:
            if path in self.nodes:
                self._remove_node(path, rev, events)
        self.ephemerals.pop(session_id, None)  # after the removals, which touch this index
        del self.sessions[session_id]
        self.dirty_sessions.add(session_id)
        return SessionClosed(session_id, tuple(owned))

    def _reap(self, path: str, rev: int, events: list[Event], now_ms: int = 0) -> Result:
        node = self.nodes.get(path)
        if node is None:
            raise NoNode(f"no node {path}", path)
        if not ((node.kind == KIND_CONTAINER and node.cversion > 0) or node.kind == KIND_TTL):
            raise BadArguments(f"{path} is not a container that has had children, nor a TTL node", path)
        if self.children[path]:
            raise NotEmpty(f"{path} has children", path)
        if not self._reapable(path, node, now_ms):
            raise BadArguments(f"{path} was modified within its TTL", path)
        self._remove_node(path, rev, events)
        return Deleted(path, (path,))
