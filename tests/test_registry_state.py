"""The registry state machine against ZooKeeper's semantics.

Two halves: a hypothesis RuleBasedStateMachine that drives `RegistryState` with random commands
and checks every step against a small independent model written here, and plain unit tests for
each error case, sequential naming, recursive delete, multi rollback, container reaping, dirty
tracking and the load() round trip through msgpack rows.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

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
    SessionExpired,
    StaleTerm,
)
from app.services.registry.messages import (
    KIND_CONTAINER,
    KIND_PERSISTENT,
    OPEN_ACL_UNSAFE,
    PERM_READ,
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
    SessionClosed,
    SessionOpened,
    SetAcl,
    SetData,
    Stat,
    Updated,
)
from app.services.registry.state import RegistryState, SessionRecord, Znode

# ---- path helpers of the model (deliberately not the code under test's) ------------------------


def _parent(path: str) -> str:
    idx = path.rfind("/")
    return "/" if idx == 0 else path[:idx]


def _name(path: str) -> str:
    return path[path.rfind("/") + 1 :]


def _join(parent: str, name: str) -> str:
    return "/" + name if parent == "/" else parent + "/" + name


def _depth(path: str) -> int:
    return 0 if path == "/" else path.count("/")


def _ancestors(path: str) -> list[str]:
    """Proper ancestors except the root, shallowest first."""
    parts = path.split("/")[1:-1]
    return ["/" + "/".join(parts[: i + 1]) for i in range(len(parts))]


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top + "/")


# ---- the model ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class MNode:
    data: bytes | None
    czxid: int
    mzxid: int
    pzxid: int
    ctime: int
    mtime: int
    version: int = 0
    cversion: int = 0
    aversion: int = 0
    owner: int = 0
    container: bool = False
    acl: tuple[Acl, ...] = OPEN_ACL_UNSAFE


class ModelError(Exception):
    def __init__(self, kind: type[RegistryError]) -> None:
        super().__init__(kind.__name__)
        self.kind = kind
        self.index = -1


ModelEvent = tuple[int, str, str, int]


class Model:
    """ZooKeeper's znode semantics, written plainly: a dict of nodes, children derived."""

    def __init__(self) -> None:
        self.nodes: dict[str, MNode] = {"/": MNode(b"", 0, 0, 0, 0, 0)}
        self.sessions: dict[int, tuple[int, int, bytes]] = {}
        self.revision = 0
        self.term = 0
        self.leader = ""

    # reads

    def kids(self, path: str) -> list[str]:
        return sorted(_name(p) for p in self.nodes if p != "/" and _parent(p) == path)

    def stat(self, path: str) -> Stat:
        n = self.nodes[path]
        return Stat(
            n.czxid,
            n.mzxid,
            n.pzxid,
            n.ctime,
            n.mtime,
            n.version,
            n.cversion,
            n.aversion,
            n.owner,
            len(n.data) if n.data is not None else 0,
            len(self.kids(path)),
        )

    def owners(self) -> dict[int, set[str]]:
        out: dict[int, set[str]] = {}
        for p, n in self.nodes.items():
            if n.owner:
                out.setdefault(n.owner, set()).add(p)
        return out

    def reapable(self) -> list[str]:
        return sorted(p for p, n in self.nodes.items() if n.container and n.cversion > 0 and not self.kids(p))

    # apply

    def apply(self, cmd: Command) -> tuple[Any, list[ModelEvent]]:
        saved = (dict(self.nodes), dict(self.sessions), self.term, self.leader)
        rev = self.revision + 1
        events: list[ModelEvent] = []
        try:
            result = self._dispatch(cmd, rev, events)
        except ModelError:
            self.nodes, self.sessions, self.term, self.leader = saved
            raise
        self.revision = rev
        return result, events

    def try_apply(self, cmd: Command) -> tuple[Any, list[ModelEvent]] | ModelError:
        try:
            return self.apply(cmd)
        except ModelError as err:
            return err

    def _dispatch(self, cmd: Command, rev: int, events: list[ModelEvent]) -> Any:
        if isinstance(cmd, Create):
            return self._create(cmd, rev, cmd.time_ms, events)
        if isinstance(cmd, SetData):
            return self._set(cmd, rev, cmd.time_ms, events)
        if isinstance(cmd, Delete):
            return self._delete(cmd, rev, events)
        if isinstance(cmd, SetAcl):
            return self._set_acl(cmd)
        if isinstance(cmd, Multi):
            results = []
            for index, op in enumerate(cmd.ops):
                try:
                    if isinstance(op, Create):
                        results.append(self._create(op, rev, cmd.time_ms, events))
                    elif isinstance(op, SetData):
                        results.append(self._set(op, rev, cmd.time_ms, events))
                    elif isinstance(op, Delete):
                        results.append(self._delete(op, rev, events))
                    else:
                        results.append(self._check(op))
                except ModelError as err:
                    err.index = index
                    raise
            return MultiDone(tuple(results))
        if isinstance(cmd, OpenSession):
            if cmd.session_id in self.sessions or cmd.session_id <= 0:
                raise ModelError(BadArguments)
            self.sessions[cmd.session_id] = (cmd.timeout_ms, cmd.time_ms, cmd.password)
            return SessionOpened(cmd.session_id, cmd.timeout_ms)
        if isinstance(cmd, CloseSession):
            return self._end_session(cmd.session_id, rev, events)
        if isinstance(cmd, ExpireSession):
            if cmd.term < self.term:
                raise ModelError(StaleTerm)
            return self._end_session(cmd.session_id, rev, events)
        if isinstance(cmd, LeaderElected):
            if cmd.term <= self.term:
                raise ModelError(StaleTerm)
            self.term, self.leader = cmd.term, cmd.node_id
            return Noted("")
        if isinstance(cmd, ReapContainer):
            if cmd.term < self.term:
                raise ModelError(StaleTerm)
            node = self.nodes.get(cmd.path)
            if node is None:
                raise ModelError(NoNode)
            if not node.container or node.cversion == 0:
                raise ModelError(BadArguments)
            if self.kids(cmd.path):
                raise ModelError(NotEmpty)
            self._remove(cmd.path, rev, events)
            return Deleted(cmd.path, (cmd.path,))
        if isinstance(cmd, Check):
            raise ModelError(BadArguments)
        raise AssertionError(cmd)

    def _create(self, op: Create, rev: int, now: int, events: list[ModelEvent]) -> Created:
        if op.path == "/":
            raise ModelError(NodeExists)
        if not op.acl:
            raise ModelError(InvalidACL)
        if op.container and (op.session_id or op.sequential):
            raise ModelError(BadArguments)
        if op.session_id and op.session_id not in self.sessions:
            raise ModelError(SessionExpired)
        parent = _parent(op.path)
        if parent not in self.nodes and not op.parents:
            raise ModelError(NoNode)
        missing = [a for a in _ancestors(op.path) if a not in self.nodes]
        nearest = _parent(missing[0]) if missing else parent
        if self.nodes[nearest].owner:
            raise ModelError(NoChildrenForEphemerals)
        path = op.path
        if op.sequential:
            counter = self.nodes[parent].cversion if parent in self.nodes else 0
            path = f"{op.path}{counter:010d}"
        if path in self.nodes:
            raise ModelError(NodeExists)
        for ancestor in missing:
            self._add(ancestor, MNode(b"", rev, rev, rev, now, now), rev, events)
        node = MNode(op.data, rev, rev, rev, now, now, owner=op.session_id, container=op.container, acl=op.acl)
        self._add(path, node, rev, events)
        return Created(path, self.stat(path))

    def _add(self, path: str, node: MNode, rev: int, events: list[ModelEvent]) -> None:
        parent = _parent(path)
        self.nodes[path] = node
        p = self.nodes[parent]
        self.nodes[parent] = replace(p, cversion=p.cversion + 1, pzxid=rev)
        events += [(rev, "created", path, 0), (rev, "children", parent, 0)]

    def _remove(self, path: str, rev: int, events: list[ModelEvent]) -> None:
        node = self.nodes.pop(path)
        parent = _parent(path)
        p = self.nodes[parent]
        self.nodes[parent] = replace(p, cversion=p.cversion + 1, pzxid=rev)
        events += [(rev, "deleted", path, node.version), (rev, "children", parent, 0)]

    def _existing(self, path: str, version: int, attr: str = "version") -> MNode:
        node = self.nodes.get(path)
        if node is None:
            raise ModelError(NoNode)
        if version not in (-1, getattr(node, attr)):
            raise ModelError(BadVersion)
        return node

    def _set(self, op: SetData, rev: int, now: int, events: list[ModelEvent]) -> Updated:
        node = self._existing(op.path, op.version)
        self.nodes[op.path] = replace(node, data=op.data, mzxid=rev, mtime=now, version=node.version + 1)
        events.append((rev, "changed", op.path, node.version + 1))
        return Updated(op.path, self.stat(op.path))

    def _set_acl(self, op: SetAcl) -> Updated:
        node = self._existing(op.path, op.version, "aversion")
        if not op.acl:
            raise ModelError(InvalidACL)
        self.nodes[op.path] = replace(node, acl=op.acl, aversion=node.aversion + 1)
        return Updated(op.path, self.stat(op.path))

    def _check(self, op: Check) -> Updated:
        self._existing(op.path, op.version)
        return Updated(op.path, self.stat(op.path))

    def _delete(self, op: Delete, rev: int, events: list[ModelEvent]) -> Deleted:
        if op.path == "/":
            raise ModelError(BadArguments)
        self._existing(op.path, op.version)
        if self.kids(op.path) and not op.recursive:
            raise ModelError(NotEmpty)
        doomed = sorted((p for p in self.nodes if _under(p, op.path)), key=lambda p: (-_depth(p), p))
        for p in doomed:
            self._remove(p, rev, events)
        return Deleted(op.path, tuple(doomed))

    def _end_session(self, sid: int, rev: int, events: list[ModelEvent]) -> SessionClosed:
        if sid not in self.sessions:
            raise ModelError(SessionExpired)
        owned = sorted(p for p, n in self.nodes.items() if n.owner == sid)
        for p in owned:
            self._remove(p, rev, events)
        del self.sessions[sid]
        return SessionClosed(sid, tuple(owned))


# ---- comparing ---------------------------------------------------------------------------------


def _normal(result: Any) -> Any:
    """Results with order-free parts made sets (the order of Deleted is checked separately)."""
    if isinstance(result, MultiDone):
        return ("multi", tuple(_normal(r) for r in result.results))
    if isinstance(result, Deleted):
        return ("deleted", result.path, frozenset(result.deleted))
    if isinstance(result, SessionClosed):
        return ("closed", result.session_id, frozenset(result.deleted))
    if isinstance(result, Noted):
        return ("noted",)
    return result


def _deleted_lists(result: Any) -> list[tuple[str, ...]]:
    if isinstance(result, MultiDone):
        return [d for r in result.results for d in _deleted_lists(r)]
    if isinstance(result, Deleted):
        return [result.deleted]
    return []


def _children_before_parents(deleted: tuple[str, ...]) -> bool:
    where = {p: i for i, p in enumerate(deleted)}
    return all(where[p] < where[_parent(p)] for p in deleted if _parent(p) in where)


def snapshot(s: RegistryState) -> tuple[Any, ...]:
    """Everything apply may change (dirty bookkeeping aside)."""
    return (
        dict(s.nodes),
        {k: set(v) for k, v in s.children.items()},
        dict(s.sessions),
        {k: set(v) for k, v in s.ephemerals.items()},
        s.revision,
        s.term,
        s.leader,
    )


def observable(s: RegistryState) -> dict[str, Any]:
    """What a client or the leader can see (empty ephemeral sets are bookkeeping, not state)."""
    return {
        "nodes": {p: (s.nodes[p], s.stat(p), s.child_names(p)) for p in s.nodes},
        "sessions": dict(s.sessions),
        "ephemerals": {k: set(v) for k, v in s.ephemerals.items() if v},
        "meta": (s.revision, s.term, s.leader),
        "reap": sorted(s.containers_to_reap()),
    }


def encode_rows(s: RegistryState, *, with_root: bool = True) -> tuple[dict[str, bytes], dict[int, bytes]]:
    nodes = {p: msgspec.msgpack.encode(z) for p, z in s.nodes.items() if with_root or p != "/"}
    sessions = {sid: msgspec.msgpack.encode(r) for sid, r in s.sessions.items()}
    return nodes, sessions


def load_rows(nodes: dict[str, bytes], sessions: dict[int, bytes], meta: tuple[int, int, str]) -> RegistryState:
    fresh = RegistryState()
    fresh.load(
        {p: msgspec.msgpack.decode(b, type=Znode) for p, b in nodes.items()},
        {sid: msgspec.msgpack.decode(b, type=SessionRecord) for sid, b in sessions.items()},
        *meta,
    )
    return fresh


# ---- the state machine -------------------------------------------------------------------------

NAMES = ("a", "b", "c")
STATIC_PATHS = ["/"] + [
    "/" + "/".join(combo) for depth in (1, 2, 3) for combo in itertools.product(NAMES, repeat=depth)
]
STATIC_PARENTS = [p for p in STATIC_PATHS if _depth(p) <= 2]
CREATE_NAMES = ("a", "b", "c", "s-", "s-0000000001")
DATAS = (b"", b"x", b"hello", None)  # None: ZooKeeper's null data
OTHER_ACL = (Acl(PERM_READ, "digest", "bob:hash"),)
SESSION_IDS = (1, 2, 3)
small_time = st.integers(0, 10_000)


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.sut = RegistryState()
        self.model = Model()
        # a store kept up to date from take_dirty() only; `reload` rebuilds the state from it
        self.rows: dict[str, bytes] = {}
        self.session_rows: dict[int, bytes] = {}
        self.meta: tuple[int, int, str] = (0, 0, "")
        self.odds = 3  # 1 in odds+1 draws aims at a path that may not exist or a wrong version

    # ---- drawing commands from the model's current state ----

    def _pick(self, data: st.DataObject, existing: list[str], static: list[str]) -> str:
        """Mostly an existing node, sometimes any path of the alphabet (which may not exist)."""
        if existing and data.draw(st.integers(0, self.odds)) < self.odds:
            return data.draw(st.sampled_from(existing))
        return data.draw(st.sampled_from(static))

    def _path(self, data: st.DataObject) -> str:
        return self._pick(data, sorted(p for p in self.model.nodes if p != "/"), STATIC_PATHS)

    def _version(self, data: st.DataObject, path: str, attr: str = "version") -> int:
        node = self.model.nodes.get(path)
        if node is None:
            return data.draw(st.sampled_from((-1, 0, 2)))
        actual = getattr(node, attr)
        if data.draw(st.integers(0, self.odds)) == 0:
            return actual + 1
        return data.draw(st.sampled_from((-1, actual, actual)))

    def _owner(self, data: st.DataObject) -> int:
        """Persistent half the time, else mostly an open session, sometimes one that is not."""
        return 0 if data.draw(st.booleans()) else self._session(data)

    def _create(self, data: st.DataObject) -> Create:
        ephemerals = sorted(p for p, n in self.model.nodes.items() if n.owner)
        containers = sorted(p for p, n in self.model.nodes.items() if n.container)
        aim = data.draw(st.integers(0, 5))
        if ephemerals and aim == 0:
            parent = data.draw(st.sampled_from(ephemerals))
        elif containers and aim == 1:
            parent = data.draw(st.sampled_from(containers))
        else:
            parent = self._pick(data, sorted(p for p in self.model.nodes if _depth(p) <= 2), STATIC_PARENTS)
        return Create(
            _join(parent, data.draw(st.sampled_from(CREATE_NAMES))),
            data=data.draw(st.sampled_from(DATAS)),
            session_id=self._owner(data),
            sequential=data.draw(st.sampled_from((False, False, False, True))),
            container=data.draw(st.sampled_from((False,) * 5 + (True,))),
            parents=data.draw(st.booleans()),
            acl=data.draw(st.sampled_from((OPEN_ACL_UNSAFE, OTHER_ACL))),
            time_ms=data.draw(small_time),
        )

    def _set(self, data: st.DataObject) -> SetData:
        path = self._path(data)
        return SetData(path, data.draw(st.sampled_from(DATAS)), self._version(data, path), data.draw(small_time))

    def _delete(self, data: st.DataObject) -> Delete:
        in_containers = sorted(p for p in self.model.nodes if p != "/" and self.model.nodes[_parent(p)].container)
        if in_containers and data.draw(st.booleans()):
            path = data.draw(st.sampled_from(in_containers))
        else:
            path = self._path(data)
        return Delete(path, self._version(data, path), data.draw(st.sampled_from((False, False, True))))

    def _check(self, data: st.DataObject) -> Check:
        path = self._path(data)
        return Check(path, self._version(data, path))

    # ---- running one command on both ----

    def run(self, cmd: Command) -> None:
        before = snapshot(self.sut)
        got, events = self.sut.apply(cmd)
        outcome = self.model.try_apply(cmd)
        event(f"{type(cmd).__name__}: {type(got).__name__}")
        if isinstance(outcome, ModelError):
            err = outcome
            assert isinstance(got, RegistryError), f"{cmd!r}: expected {err.kind.__name__}, got {got!r}"
            assert type(got) is err.kind, f"{cmd!r}: expected {err.kind.__name__}, got {got!r}"
            assert got.failed_index == err.index, cmd
            assert events == []
            assert snapshot(self.sut) == before, f"{cmd!r} failed but changed the state"
            dirty_nodes, dirty_sessions, meta_dirty = self.sut.take_dirty()
            assert not dirty_sessions
            assert not meta_dirty
            if not isinstance(cmd, Multi):  # a rolled-back multi may leave untouched rows marked dirty
                assert not dirty_nodes
            self._persist(dirty_nodes, dirty_sessions, meta_dirty)
            return
        assert not isinstance(got, RegistryError), f"{cmd!r}: expected success, got {got!r}"
        expected, expected_events = outcome
        assert _normal(got) == _normal(expected), cmd
        for deleted in _deleted_lists(got):
            assert _children_before_parents(deleted), deleted
        assert {e.revision for e in events} <= {self.model.revision}
        assert Counter((e.revision, e.type, e.path, e.version) for e in events) == Counter(expected_events), cmd

        dirty_nodes, dirty_sessions, meta_dirty = self.sut.take_dirty()
        old_nodes, old_sessions = before[0], before[2]
        changed = {p for p in old_nodes.keys() | self.sut.nodes.keys() if old_nodes.get(p) != self.sut.nodes.get(p)}
        assert changed <= dirty_nodes, (cmd, changed - dirty_nodes)
        changed_sessions = {
            s for s in old_sessions.keys() | self.sut.sessions.keys() if old_sessions.get(s) != self.sut.sessions.get(s)
        }
        assert changed_sessions <= dirty_sessions
        assert meta_dirty
        self._persist(dirty_nodes, dirty_sessions, meta_dirty)

    def _persist(self, dirty_nodes: set[str], dirty_sessions: set[int], meta_dirty: bool) -> None:
        for p in dirty_nodes:
            if p in self.sut.nodes:
                self.rows[p] = msgspec.msgpack.encode(self.sut.nodes[p])
            else:
                self.rows.pop(p, None)
        for sid in dirty_sessions:
            if sid in self.sut.sessions:
                self.session_rows[sid] = msgspec.msgpack.encode(self.sut.sessions[sid])
            else:
                self.session_rows.pop(sid, None)
        if meta_dirty:
            self.meta = (self.sut.revision, self.sut.term, self.sut.leader)

    # ---- rules ----

    @initialize(
        sessions=st.sets(st.sampled_from(SESSION_IDS), max_size=2),
        tree=st.lists(st.tuples(st.sampled_from(STATIC_PATHS[1:]), st.booleans()), max_size=5),
    )
    def seed(self, sessions: set[int], tree: list[tuple[str, bool]]) -> None:
        """Start most runs with open sessions and a small tree (some of it containers)."""
        for sid in sorted(sessions):
            self.run(OpenSession(sid, 1000))
        for path, container in tree:
            self.run(Create(path, b"seed", parents=True, container=container))

    @rule(data=st.data())
    def create(self, data: st.DataObject) -> None:
        self.run(self._create(data))

    @rule(path=st.sampled_from([p for p in STATIC_PATHS if _depth(p) >= 2]), container=st.booleans())
    def create_tree(self, path: str, container: bool) -> None:
        """Grow the tree faster: a deep node (maybe a container) with its missing ancestors."""
        self.run(Create(path, b"t", parents=True, container=container))

    @rule(data=st.data())
    def set_data(self, data: st.DataObject) -> None:
        self.run(self._set(data))

    @rule(data=st.data())
    def delete(self, data: st.DataObject) -> None:
        self.run(self._delete(data))

    @rule(data=st.data())
    def set_acl(self, data: st.DataObject) -> None:
        path = self._path(data)
        acl = data.draw(st.sampled_from((OPEN_ACL_UNSAFE, OTHER_ACL, ())))
        self.run(SetAcl(path, acl, self._version(data, path, "aversion")))

    @rule(data=st.data())
    def multi(self, data: st.DataObject) -> None:
        makers = (self._create, self._set, self._delete, self._check)
        count = data.draw(st.integers(1, 4))
        self.odds = data.draw(st.sampled_from((3, 12)))  # most multis should be able to succeed
        try:
            ops = tuple(data.draw(st.sampled_from(makers))(data) for _ in range(count))
        finally:
            self.odds = 3
        self.run(Multi(ops, data.draw(small_time)))

    @rule(data=st.data(), timeout=st.sampled_from((1000, 5000)), now=small_time)
    def open_session(self, data: st.DataObject, timeout: int, now: int) -> None:
        unused = [sid for sid in SESSION_IDS if sid not in self.model.sessions]
        if unused and data.draw(st.integers(0, 3)) < 3:
            sid = data.draw(st.sampled_from(unused))
        else:
            sid = data.draw(st.sampled_from((-1, 0, *SESSION_IDS)))
        self.run(OpenSession(sid, timeout, now, b"pw"))

    def _session(self, data: st.DataObject) -> int:
        open_ids = sorted(self.model.sessions)
        if open_ids and data.draw(st.integers(0, 3)) < 3:
            return data.draw(st.sampled_from(open_ids))
        return data.draw(st.sampled_from((*SESSION_IDS, 4)))

    @rule(data=st.data())
    def close_session(self, data: st.DataObject) -> None:
        self.run(CloseSession(self._session(data)))

    @rule(data=st.data(), delta=st.integers(-1, 1))
    def expire_session(self, data: st.DataObject, delta: int) -> None:
        self.run(ExpireSession(self._session(data), max(0, self.model.term + delta)))

    @rule(delta=st.integers(-1, 2), node=st.sampled_from(("n1", "n2")))
    def leader_elected(self, delta: int, node: str) -> None:
        self.run(LeaderElected(max(0, self.model.term + delta), node))

    @rule(data=st.data(), delta=st.sampled_from((0, 0, 1, -1)))
    def reap_container(self, data: st.DataObject, delta: int) -> None:
        reapable = self.model.reapable()
        containers = sorted(p for p, n in self.model.nodes.items() if n.container)
        choice = data.draw(st.integers(0, 4))
        if reapable and choice < 3:
            path = data.draw(st.sampled_from(reapable))
        elif containers and choice < 4:
            path = data.draw(st.sampled_from(containers))
        else:
            path = self._path(data)
        self.run(ReapContainer(path, max(0, self.model.term + delta)))

    @rule()
    def reload(self) -> None:
        """Rebuild the state from the rows take_dirty() named, then keep driving the rebuilt one."""
        fresh = load_rows(self.rows, self.session_rows, self.meta)
        assert observable(fresh) == observable(self.sut)
        self.sut = fresh

    @invariant()
    def matches_model(self) -> None:
        s, m = self.sut, self.model
        assert (s.revision, s.term, s.leader) == (m.revision, m.term, m.leader)
        assert set(s.nodes) == set(m.nodes)
        assert set(s.children) == set(m.nodes)
        for path, node in m.nodes.items():
            data, stat = s.get(path)
            assert data == node.data, path
            assert stat == m.stat(path), path
            assert s.nodes[path].acl == node.acl, path
            assert s.nodes[path].kind == (KIND_CONTAINER if node.container else KIND_PERSISTENT), path
            assert s.child_names(path) == m.kids(path), path
        assert {sid: (r.timeout_ms, r.created_ms, r.password) for sid, r in s.sessions.items()} == m.sessions
        assert all(r.session_id == sid for sid, r in s.sessions.items())
        # A live session whose ephemerals were all deleted may keep an empty set; an ended one keeps no entry.
        assert set(s.ephemerals) <= set(s.sessions)
        assert {sid: set(owned) for sid, owned in s.ephemerals.items() if owned} == m.owners()
        assert sorted(s.containers_to_reap()) == m.reapable()


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- unit tests --------------------------------------------------------------------------------


def ok(state: RegistryState, cmd: Command) -> tuple[Any, list[Any]]:
    rev = state.revision
    result, events = state.apply(cmd)
    assert not isinstance(result, RegistryError), f"{cmd!r} -> {result!r}"
    assert state.revision == rev + 1
    assert all(e.revision == rev + 1 for e in events)
    return result, events


def fails(state: RegistryState, cmd: Command, kind: type[RegistryError]) -> RegistryError:
    before = snapshot(state)
    state.take_dirty()
    result, events = state.apply(cmd)
    assert type(result) is kind, f"{cmd!r} -> {result!r}, expected {kind.__name__}"
    assert isinstance(result, RegistryError)
    assert events == []
    assert snapshot(state) == before
    return result


def build(*cmds: Command) -> RegistryState:
    state = RegistryState()
    for cmd in cmds:
        ok(state, cmd)
    return state


def kinds(events: list[Any]) -> set[tuple[str, str]]:
    return {(e.type, e.path) for e in events}


# create


def test_create_stat_parent_and_events() -> None:
    state = build(Create("/a", time_ms=5))
    assert state.revision == 1
    result, events = ok(state, Create("/a/b", b"xyz", time_ms=42))
    assert result == Created("/a/b", Stat(2, 2, 2, 42, 42, 0, 0, 0, 0, 3, 0))
    parent = state.stat("/a")
    assert (parent.cversion, parent.pzxid, parent.num_children) == (1, 2, 1)
    assert (parent.version, parent.mzxid, parent.mtime) == (0, 1, 5)  # the parent's data is untouched
    assert kinds(events) == {("created", "/a/b"), ("children", "/a")}
    assert state.nodes["/a/b"].acl == OPEN_ACL_UNSAFE
    assert state.nodes["/a/b"].kind == KIND_PERSISTENT


def test_create_missing_parent_is_no_node() -> None:
    fails(build(), Create("/a/b"), NoNode)


def test_create_parents_makes_empty_persistent_ancestors() -> None:
    state = build(Create("/a"))
    result, events = ok(state, Create("/a/b/c/d", b"v", parents=True, time_ms=9))
    assert result.path == "/a/b/c/d"
    for path in ("/a/b", "/a/b/c"):
        data, stat = state.get(path)
        assert data == b""
        assert stat == Stat(2, 2, 2, 9, 9, 0, 1, 0, 0, 0, 1)
    assert state.stat("/a").cversion == 1
    assert kinds(events) == {
        ("created", "/a/b"),
        ("created", "/a/b/c"),
        ("created", "/a/b/c/d"),
        ("children", "/a"),
        ("children", "/a/b"),
        ("children", "/a/b/c"),
    }


def test_create_existing_is_node_exists() -> None:
    err = fails(build(Create("/a")), Create("/a"), NodeExists)
    assert err.path == "/a"
    fails(build(Create("/a")), Create("/a", parents=True), NodeExists)


def test_create_root_is_node_exists() -> None:
    fails(build(), Create("/"), NodeExists)


def test_create_under_ephemeral_is_no_children_for_ephemerals() -> None:
    state = build(OpenSession(7, 1000), Create("/e", session_id=7))
    fails(state, Create("/e/x"), NoChildrenForEphemerals)
    fails(state, Create("/e/x", session_id=7), NoChildrenForEphemerals)
    fails(state, Create("/e/x/y", parents=True), NoChildrenForEphemerals)
    fails(state, Create("/e/s-", sequential=True), NoChildrenForEphemerals)


def test_create_ephemeral_needs_an_open_session() -> None:
    fails(build(), Create("/e", session_id=9), SessionExpired)
    state = build(OpenSession(9, 1000), CloseSession(9))
    fails(state, Create("/e", session_id=9), SessionExpired)


def test_create_ephemeral_is_owned() -> None:
    state = build(OpenSession(9, 1000))
    result, _ = ok(state, Create("/e", session_id=9))
    assert result.stat.ephemeral_owner == 9
    assert state.ephemerals[9] == {"/e"}


@pytest.mark.parametrize(
    "cmd",
    [
        Create("/c", container=True, session_id=9),
        Create("/c", container=True, sequential=True),
    ],
)
def test_create_container_cannot_be_ephemeral_or_sequential(cmd: Create) -> None:
    fails(build(OpenSession(9, 1000)), cmd, BadArguments)


@pytest.mark.parametrize("path", ["", "a", "/a/", "//a", "/a//b", "/a/.", "/a/../b", "/a\x00b", "/a\x7fb"])
def test_create_invalid_path_is_bad_arguments(path: str) -> None:
    fails(build(Create("/a")), Create(path), BadArguments)


# sequential naming


def test_sequential_names_use_parent_cversion_before_increment() -> None:
    state = build(Create("/q"))
    names = [ok(state, Create("/q/item-", sequential=True))[0].path for _ in range(3)]
    assert names == ["/q/item-0000000000", "/q/item-0000000001", "/q/item-0000000002"]
    assert state.stat("/q").cversion == 3


def test_sequential_counter_counts_deletions_and_other_children() -> None:
    state = build(Create("/q"), Create("/q/x"), Delete("/q/x"))
    assert state.stat("/q").cversion == 2
    assert ok(state, Create("/q/item-", sequential=True))[0].path == "/q/item-0000000002"
    assert ok(state, Create("/q/other-", sequential=True))[0].path == "/q/other-0000000003"


def test_sequential_at_root_and_under_new_parents() -> None:
    state = build()
    assert ok(state, Create("/s-", sequential=True))[0].path == "/s-0000000000"
    assert ok(state, Create("/p/q/s-", sequential=True, parents=True))[0].path == "/p/q/s-0000000000"
    assert ok(state, Create("/s-", sequential=True))[0].path == "/s-0000000002"


def test_sequential_collision_is_node_exists() -> None:
    state = build(Create("/q"), Create("/q/n0000000001"))
    fails(state, Create("/q/n", sequential=True), NodeExists)


def test_sequential_ephemeral() -> None:
    state = build(OpenSession(3, 1000), Create("/q"))
    result, _ = ok(state, Create("/q/lock-", session_id=3, sequential=True))
    assert result.path == "/q/lock-0000000000"
    assert state.ephemerals[3] == {"/q/lock-0000000000"}


# set data


def test_set_data() -> None:
    state = build(Create("/a", b"1", time_ms=1))
    result, events = ok(state, SetData("/a", b"22", 0, time_ms=50))
    assert result == Updated("/a", Stat(1, 2, 1, 1, 50, 1, 0, 0, 0, 2, 0))
    assert [(e.type, e.path, e.version) for e in events] == [("changed", "/a", 1)]
    ok(state, SetData("/a", b"3", -1))
    assert state.get("/a")[0] == b"3"
    assert state.stat("/a").version == 2


def test_set_data_errors() -> None:
    state = build(Create("/a"))
    fails(state, SetData("/b", b""), NoNode)
    err = fails(state, SetData("/a", b"", 1), BadVersion)
    assert err.path == "/a"
    assert err.failed_index == -1


# delete


def test_delete() -> None:
    state = build(Create("/a"), Create("/a/b"), SetData("/a/b", b"x"))
    result, events = ok(state, Delete("/a/b", 1))
    assert result == Deleted("/a/b", ("/a/b",))
    assert [(e.type, e.path, e.version) for e in events] == [("deleted", "/a/b", 1), ("children", "/a", 0)]
    stat = state.stat("/a")
    assert (stat.cversion, stat.pzxid, stat.num_children) == (2, 4, 0)


def test_delete_errors() -> None:
    state = build(Create("/a"), Create("/a/b"))
    fails(state, Delete("/nope"), NoNode)
    fails(state, Delete("/a/b", 3), BadVersion)
    fails(state, Delete("/a"), NotEmpty)
    fails(state, Delete("/a", 1, recursive=True), BadVersion)
    fails(state, Delete("/"), BadArguments)
    fails(state, Delete("/", recursive=True), BadArguments)


def test_delete_ephemeral_unowns_it() -> None:
    state = build(OpenSession(4, 1000), Create("/e", session_id=4), Delete("/e"))
    assert not state.ephemerals[4]
    result, _ = ok(state, CloseSession(4))
    assert result == SessionClosed(4, ())


TREE = ("/a", "/a/b", "/a/b/c", "/a/b/c/x", "/a/d", "/a/d/e", "/a/f")


def test_recursive_delete_removes_subtree_children_before_parents() -> None:
    state = build(Create("/z"), *(Create(p) for p in TREE))
    result, events = ok(state, Delete("/a", recursive=True))
    assert result.path == "/a"
    assert set(result.deleted) == set(TREE)
    assert result.deleted[-1] == "/a"
    assert _children_before_parents(result.deleted)
    assert state.child_names("/") == ["z"]
    assert set(state.nodes) == {"/", "/z"}
    assert {e.path for e in events if e.type == "deleted"} == set(TREE)
    assert [e.path for e in events if e.type == "deleted"] == list(result.deleted)
    assert Counter(e.path for e in events if e.type == "children") == Counter(_parent(p) for p in TREE)
    assert state.stat("/").cversion == 3  # +1 for /z, /a and the removal of /a
    assert state.stat("/").pzxid == state.revision


def test_recursive_delete_is_deepest_first() -> None:
    """Deleted.deleted (and the deleted events) are ordered deepest first (found as a bug by this suite).

    The docstrings of Delete and Deleted promise "deepest first" (ZooKeeper's deleteall removes
    the reversed breadth-first listing, so depth never grows along the list). descendants() does
    a stack walk that appends children when their parent is popped, so reversing it gives a
    children-before-parents order but not a by-depth one: with /a/b/c/x and /a/d/e the result is
    ('/a/d/e', '/a/b/c/x', '/a/b/c', '/a/b', '/a/d', '/a') - depth 3 before depth 4.
    """
    state = build(*(Create(p) for p in TREE))
    result, _ = ok(state, Delete("/a", recursive=True))
    depths = [_depth(p) for p in result.deleted]
    assert depths == sorted(depths, reverse=True), result.deleted


def test_recursive_delete_of_leaf_and_ephemerals() -> None:
    state = build(OpenSession(5, 1000), Create("/a"), Create("/a/e", session_id=5))
    result, _ = ok(state, Delete("/a", recursive=True))
    assert result.deleted == ("/a/e", "/a")
    assert not state.ephemerals[5]
    assert ok(state, CloseSession(5))[0] == SessionClosed(5, ())


# check


def test_check_outside_multi_is_bad_arguments() -> None:
    fails(build(Create("/a")), Check("/a"), BadArguments)


# multi


def test_multi_shares_one_revision() -> None:
    state = build(Create("/a"))
    result, events = ok(
        state,
        Multi(
            (
                Create("/a/b", b"1"),
                SetData("/a", b"x", 0),
                Check("/a", 1),
                Create("/a/s-", sequential=True),
                Delete("/a/b"),
            ),
            time_ms=77,
        ),
    )
    assert isinstance(result, MultiDone)
    assert [type(r) for r in result.results] == [Created, Updated, Updated, Created, Deleted]
    assert result.results[3].path == "/a/s-0000000001"  # sees the cversion bumped by the first op
    assert {e.revision for e in events} == {2}
    assert state.revision == 2
    assert state.stat("/a/s-0000000001") == Stat(2, 2, 2, 77, 77, 0, 0, 0, 0, 0, 0)
    assert state.stat("/a").mtime == 77
    assert state.stat("/a").cversion == 3
    assert ("deleted", "/a/b") in kinds(events)


def test_multi_empty_is_a_no_op_that_counts() -> None:
    state = build()
    result, events = ok(state, Multi(()))
    assert result == MultiDone(())
    assert events == []


@pytest.mark.parametrize(
    ("ops", "kind", "index"),
    [
        ((Create("/a/x"), Create("/a/x")), NodeExists, 1),
        ((Check("/a", 5),), BadVersion, 0),
        ((SetData("/a", b"z"), Create("/a/y"), Check("/a", 0)), BadVersion, 2),
        ((Delete("/a/b"), Delete("/a/b")), NoNode, 1),
        ((Create("/n/m/k", parents=True), Create("/e/x"), Delete("/a")), NoChildrenForEphemerals, 1),
        ((Delete("/a", recursive=True), Create("/a/q")), NoNode, 1),
        ((Delete("/a", recursive=True), Check("/a/b")), NoNode, 1),
        ((Delete("/e"), Create("/f", session_id=8), Create("/g", session_id=9)), SessionExpired, 2),
        ((Create("/a/s-", sequential=True), SetData("/a/b", b"", 3)), BadVersion, 1),
        ((Create("/c", container=True), Delete("/a")), NotEmpty, 1),
        ((Create("/c", container=True, sequential=True),), BadArguments, 0),
    ],
)
def test_multi_failure_rolls_back_everything(ops: tuple[Any, ...], kind: type[RegistryError], index: int) -> None:
    state = build(OpenSession(8, 1000), Create("/a"), Create("/a/b"), Create("/e", session_id=8))
    state.take_dirty()
    before_obs = observable(state)
    err = fails(state, Multi(ops, time_ms=3), kind)
    assert err.failed_index == index
    assert observable(state) == before_obs
    _, dirty_sessions, meta_dirty = state.take_dirty()
    assert not dirty_sessions
    assert not meta_dirty
    # the next command behaves as if the multi never happened
    assert ok(state, Create("/a/s-", sequential=True))[0].path == "/a/s-0000000001"


# sessions and terms


def test_sessions_open_close_expire() -> None:
    state = build()
    assert ok(state, OpenSession(1, 3000, 10, b"pw"))[0] == SessionOpened(1, 3000)
    assert state.sessions[1] == SessionRecord(1, 3000, 10, b"pw")
    fails(state, OpenSession(1, 3000), BadArguments)
    fails(state, OpenSession(0, 3000), BadArguments)
    fails(state, OpenSession(-5, 3000), BadArguments)
    fails(state, CloseSession(2), SessionExpired)
    fails(state, ExpireSession(2, 0), SessionExpired)
    ok(state, Create("/e1", session_id=1))
    ok(state, Create("/e2", session_id=1))
    result, events = ok(state, CloseSession(1))
    assert result.session_id == 1
    assert set(result.deleted) == {"/e1", "/e2"}
    assert kinds(events) == {("deleted", "/e1"), ("deleted", "/e2"), ("children", "/")}
    assert set(state.nodes) == {"/"}
    assert 1 not in state.sessions
    fails(state, CloseSession(1), SessionExpired)
    ok(state, OpenSession(1, 3000))  # an ended id may be opened again


def test_expire_session_removes_ephemerals_and_respects_terms() -> None:
    state = build(OpenSession(2, 1000), Create("/p"), Create("/p/e", session_id=2), LeaderElected(3, "n1"))
    fails(state, ExpireSession(2, 2), StaleTerm)
    result, _ = ok(state, ExpireSession(2, 3))
    assert result == SessionClosed(2, ("/p/e",))
    assert state.child_names("/p") == []
    assert state.stat("/p").cversion == 2
    ok(state, OpenSession(3, 1000))
    ok(state, ExpireSession(3, 4))  # a newer term than the last elected is not stale


def test_a_multi_with_a_term_is_fenced_once_a_newer_leader_exists() -> None:
    state = build(Create("/m"), LeaderElected(3, "n1"))
    ok(state, Multi((SetData("/m", b"a"),), 0, 3))
    ok(state, LeaderElected(4, "n2"))
    before = state.stat("/m")
    fails(state, Multi((SetData("/m", b"b"),), 0, 3), StaleTerm)
    assert state.stat("/m") == before
    assert state.nodes["/m"].data == b"a"
    ok(state, Multi((SetData("/m", b"c"),), 0, 4))
    ok(state, Multi((SetData("/m", b"d"),)))  # no term: not a leader's duty, never fenced


def test_leader_elected_terms() -> None:
    state = build()
    fails(state, LeaderElected(0, "n1"), StaleTerm)
    result, events = ok(state, LeaderElected(2, "n1"))
    assert isinstance(result, Noted)
    assert events == []
    assert (state.term, state.leader) == (2, "n1")
    fails(state, LeaderElected(2, "n2"), StaleTerm)
    fails(state, LeaderElected(1, "n2"), StaleTerm)
    ok(state, LeaderElected(5, "n2"))
    assert (state.term, state.leader) == (5, "n2")


# containers


def test_containers_to_reap_and_reap() -> None:
    state = build(
        Create("/c", container=True),
        Create("/fresh", container=True),
        Create("/p"),
        Create("/p/x"),
        Delete("/p/x"),
        Create("/c/k"),
    )
    assert state.nodes["/c"].kind == KIND_CONTAINER
    assert state.containers_to_reap() == []  # /c has a child, /fresh never had one, /p is persistent
    fails(state, ReapContainer("/c", 0), NotEmpty)
    fails(state, ReapContainer("/fresh", 0), BadArguments)
    fails(state, ReapContainer("/p", 0), BadArguments)
    fails(state, ReapContainer("/nope", 0), NoNode)
    ok(state, Delete("/c/k"))
    assert state.containers_to_reap() == ["/c"]
    ok(state, LeaderElected(4, "n1"))
    fails(state, ReapContainer("/c", 3), StaleTerm)
    result, events = ok(state, ReapContainer("/c", 4))
    assert result == Deleted("/c", ("/c",))
    assert kinds(events) == {("deleted", "/c"), ("children", "/")}
    assert "/c" not in state.nodes
    assert state.containers_to_reap() == []


def test_container_emptied_by_session_end_is_reapable() -> None:
    state = build(OpenSession(1, 1000), Create("/c", container=True), Create("/c/e", session_id=1))
    ok(state, CloseSession(1))
    assert state.containers_to_reap() == ["/c"]


def test_set_acl() -> None:
    state = build(Create("/a"))
    result, events = ok(state, SetAcl("/a", OTHER_ACL, 0))
    assert result.stat.aversion == 1
    assert result.stat.mzxid == 1  # an ACL change is not a data change
    assert events == []
    assert state.nodes["/a"].acl == OTHER_ACL
    fails(state, SetAcl("/a", OPEN_ACL_UNSAFE, 0), BadVersion)
    fails(state, SetAcl("/b", OPEN_ACL_UNSAFE), NoNode)
    fails(state, SetAcl("/a", ()), InvalidACL)
    fails(state, Create("/c", acl=()), InvalidACL)


# revision and errors


ERRORS: list[tuple[Command, type[RegistryError]]] = [
    (Create("/x/y"), NoNode),
    (Create("/a"), NodeExists),
    (Create("/"), NodeExists),
    (Create("/e/x"), NoChildrenForEphemerals),
    (Create("/z", session_id=99), SessionExpired),
    (Create("/z", container=True, session_id=1), BadArguments),
    (SetData("/x", b""), NoNode),
    (SetData("/a", b"", 9), BadVersion),
    (Delete("/x"), NoNode),
    (Delete("/a", 9), BadVersion),
    (Delete("/a"), NotEmpty),
    (Delete("/"), BadArguments),
    (Multi((SetData("/a", b"q"), Delete("/a"))), NotEmpty),
    (OpenSession(1, 10), BadArguments),
    (CloseSession(99), SessionExpired),
    (ExpireSession(1, 1), StaleTerm),
    (LeaderElected(2, "n9"), StaleTerm),
    (ReapContainer("/c", 1), StaleTerm),
    (ReapContainer("/c", 2), NotEmpty),
    (Check("/a"), BadArguments),
]


@pytest.mark.parametrize(("cmd", "kind"), ERRORS)
def test_an_error_changes_nothing(cmd: Command, kind: type[RegistryError]) -> None:
    state = build(
        OpenSession(1, 1000),
        Create("/a"),
        Create("/a/b"),
        Create("/e", session_id=1),
        Create("/c", container=True),
        Create("/c/k"),
        LeaderElected(2, "n1"),
    )
    state.take_dirty()
    revision = state.revision
    before = observable(state)
    fails(state, cmd, kind)
    assert state.revision == revision
    assert observable(state) == before
    dirty_nodes, dirty_sessions, meta_dirty = state.take_dirty()
    assert not dirty_sessions
    assert not meta_dirty
    if not isinstance(cmd, Multi):
        assert not dirty_nodes


# dirty tracking


def test_take_dirty_names_changed_rows() -> None:
    state = RegistryState()
    assert state.take_dirty() == (set(), set(), False)
    ok(state, OpenSession(1, 1000))
    assert state.take_dirty() == (set(), {1}, True)
    ok(state, Create("/a/b", parents=True, session_id=1))
    assert state.take_dirty() == ({"/", "/a", "/a/b"}, set(), True)
    assert state.take_dirty() == (set(), set(), False)
    ok(state, SetData("/a", b"x"))
    assert state.take_dirty() == ({"/a"}, set(), True)
    ok(state, CloseSession(1))
    assert state.take_dirty() == ({"/a", "/a/b"}, {1}, True)
    ok(state, LeaderElected(1, "n1"))
    assert state.take_dirty() == (set(), set(), True)


# load round trip


def _busy_state() -> RegistryState:
    return build(
        OpenSession(1, 1000, 5, b"secret"),
        OpenSession(2, 2000, 6),
        LeaderElected(3, "n2"),
        Create("/q"),
        Create("/q/item-", b"1", sequential=True, time_ms=10),
        Create("/q/item-", b"2", sequential=True, session_id=1),
        Create("/c", container=True, acl=OTHER_ACL),
        Create("/c/k"),
        Delete("/c/k"),
        Create("/x/y/z", b"deep", parents=True, session_id=2),
        SetData("/x/y", b"v", time_ms=99),
        SetAcl("/q", OTHER_ACL),
        Multi((Create("/m"), SetData("/m", b"m"), Delete("/q/item-0000000000")), time_ms=123),
    )


def _same_future(a: RegistryState, b: RegistryState) -> None:
    """Both states answer the next commands identically."""
    for cmd in (
        Create("/q/item-", sequential=True),
        Create("/s-", sequential=True),
        Create("/x/y/e", session_id=2),
        ReapContainer("/c", 3),
        Create("/x/y/z/n"),
        CloseSession(1),
        ExpireSession(2, 3),
        LeaderElected(3, "n1"),
    ):
        (ra, ea), (rb, eb) = a.apply(cmd), b.apply(cmd)
        if isinstance(ra, RegistryError):
            assert (type(ra), ra.failed_index) == (type(rb), rb.failed_index), cmd
        else:
            assert ra == rb, cmd
        assert ea == eb, cmd
        assert observable(a) == observable(b), cmd


def test_load_round_trip_through_msgpack_rows() -> None:
    state = _busy_state()
    nodes, sessions = encode_rows(state)
    fresh = load_rows(nodes, sessions, (state.revision, state.term, state.leader))
    assert observable(fresh) == observable(state)
    assert fresh.ephemerals == state.ephemerals
    assert fresh.take_dirty() == (set(), set(), False)
    _same_future(state, fresh)


def test_load_replaces_everything() -> None:
    fresh = build(Create("/old"), OpenSession(9, 10))
    state = build(Create("/new"))
    nodes, sessions = encode_rows(state)
    fresh.load(
        {p: msgspec.msgpack.decode(b, type=Znode) for p, b in nodes.items()},
        {sid: msgspec.msgpack.decode(b, type=SessionRecord) for sid, b in sessions.items()},
        state.revision,
        state.term,
        state.leader,
    )
    assert observable(fresh) == observable(state)
    assert fresh.ephemerals == {}


def test_load_nodes_minus_root_rebuilds_everything_below_the_root() -> None:
    state = _busy_state()
    nodes, sessions = encode_rows(state, with_root=False)
    fresh = load_rows(nodes, sessions, (state.revision, state.term, state.leader))
    want, got = observable(state), observable(fresh)
    (_, want_root_stat, want_root_kids), (_, got_root_stat, got_root_kids) = (
        want["nodes"].pop("/"),
        got["nodes"].pop("/"),
    )
    assert got == want
    assert got_root_kids == want_root_kids
    assert got_root_stat.num_children == want_root_stat.num_children
    assert fresh.ephemerals == state.ephemerals


def test_ending_a_session_leaves_no_ephemerals_entry() -> None:
    """Ending a session that owned ephemeral nodes leaves no `ephemerals[sid]` entry (was a bug).

    _end_session pops ephemerals[sid], then _remove_node -> _own(sid, path, False) calls
    ephemerals.setdefault(sid, set()) and puts the key back. Sequence: OpenSession(5),
    Create('/e', session_id=5), CloseSession(5) (ExpireSession likewise). Expected: 5 not in
    ephemerals (as after load(), and as for a session that owned nothing). Actual:
    ephemerals == {5: set()} - one entry leaks per ended session, forever, and the index no
    longer equals what load() rebuilds from the same rows.
    """
    state = build(OpenSession(5, 1000), Create("/e", session_id=5), CloseSession(5))
    assert 5 not in state.ephemerals, state.ephemerals
    nodes, sessions = encode_rows(state)
    assert load_rows(nodes, sessions, (state.revision, state.term, state.leader)).ephemerals == state.ephemerals


def test_sequential_name_may_end_in_slash() -> None:
    # ZooKeeper allows create("/q/", sequential) and names the child "/q/0000000000".
    state = build(Create("/q"))
    result, _ = ok(state, Create("/q/", sequential=True))
    assert result.path == "/q/0000000000"
    fails(state, Create("/q/"), BadArguments)


def test_ttl_node_is_reaped_only_when_childless_and_unmodified_for_its_ttl() -> None:

    s = RegistryState()
    s.apply(LeaderElected(1, "n1", 0))
    created, _ = s.apply(Create("/t", b"", time_ms=1_000, ttl_ms=500))
    assert isinstance(created, Created)
    assert s.containers_to_reap(1_400) == []
    assert s.containers_to_reap(0) == []  # no clock given: TTL nodes are left alone
    refused, _ = s.apply(ReapContainer("/t", 1, 1_400))
    assert isinstance(refused, BadArguments)
    s.apply(Create("/t/kid", b"", time_ms=1_000))
    assert s.containers_to_reap(5_000) == []
    s.apply(Delete("/t/kid"))
    assert s.containers_to_reap(5_000) == ["/t"]
    deleted, events = s.apply(ReapContainer("/t", 1, 5_000))
    assert isinstance(deleted, Deleted)
    assert [e.type for e in events] == ["deleted", "children"]
    for bad in (Create("/e", b"", session_id=7, ttl_ms=5), Create("/c", b"", container=True, ttl_ms=5)):
        result, _ = s.apply(bad)
        assert isinstance(result, RegistryError)


def test_store_keeps_the_newest_events_across_commits_and_restarts(tmp_path: Path) -> None:
    from app.services.registry.store import RegistryStore

    state = RegistryState()
    store = RegistryStore(tmp_path / "r.sqlite", history=5)
    revisions: list[int] = []
    for round_ in range(4):
        events: list[Event] = []
        for i in range(3):
            _, evs = state.apply(Create(f"/n{round_}-{i}", b"", time_ms=1))
            events.extend(e for e in evs if e.type == "created")
        revisions.extend(e.revision for e in events)
        store.commit(state, round_ + 1, events)
        store._trim_events()
    store.close()
    again = RegistryStore(tmp_path / "r.sqlite", history=5)
    seq, kept = again.load(RegistryState())
    assert seq == 4
    assert [e.revision for e in kept] == revisions[-5:]
    # Batches older than the five newest events are gone from the file.
    (rows,) = again.conn.execute("SELECT count(*) FROM event_batches").fetchone()
    assert rows == 2


_PATH_TEXT = st.text(
    alphabet=st.sampled_from(["/", ".", "a", "é", "\x00", "\x1f", "\x85", "\ud800", "\uf8ff", "\ufff5"])
)


@settings(max_examples=2000)
@given(path=st.one_of(_PATH_TEXT, _PATH_TEXT.map(lambda p: "/" + p), st.text()), limit=st.sampled_from([4, 16, 1024]))
def test_path_pattern_agrees_with_the_rules(path: str, limit: int) -> None:
    """validate()'s one-pattern fast check accepts exactly what the rule-by-rule check accepts."""
    outcomes = []
    for check in (lambda: paths.validate(path, limit), lambda: paths._explain(path, limit, True)):
        try:
            outcomes.append(("ok", check()))
        except BadArguments as exc:
            outcomes.append(("error", str(exc)))
    assert outcomes[0] == outcomes[1]
