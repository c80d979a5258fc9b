"""REST routes of the registry (/api/v1/registry), sessions (/api/v1/sessions) and recipes."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import unquote

from litestar import delete, get, post, put
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import Example
from litestar.params import Body, Parameter, QueryParameter
from litestar.status_codes import HTTP_200_OK, HTTP_201_CREATED
from litestar.types import Scope

from app.errors import Unavailable
from app.node import Node
from app.services.registry import recipes
from app.services.registry.errors import BadArguments
from app.services.registry.messages import (
    INT32_MAX,
    INT64_MAX,
    Check,
    Create,
    Created,
    Delete,
    Deleted,
    SetData,
    Updated,
)
from app.services.registry.service import RegistryService
from app.web.routes import registry_nodes as nodes
from app.web.routes.registry_models import (
    AclBody,
    AclEntry,
    AclView,
    CheckBody,
    ChildrenView,
    ChildView,
    CreateBody,
    DeletedView,
    ElectionBody,
    ElectionView,
    Encoding,
    LockBody,
    LockView,
    MultiBody,
    MultiView,
    NodeView,
    OpCheck,
    OpCreate,
    OpDelete,
    OpResult,
    OpSet,
    RegistryStatus,
    SessionBody,
    SessionView,
    SetBody,
    StatView,
    decode_data,
)


def _examples(**named: object) -> Any:
    return Body(examples=[Example(summary=name.replace("_", " "), value=value) for name, value in named.items()])


CREATE_EXAMPLES = _examples(
    persistent={"data": "10.0.0.5:3306"},
    ephemeral_sequential={"data": "db-7", "ephemeral": True, "session_id": 4242, "sequential": True},
    with_parents={"data": "primary", "parents": True},
    binary={"data": "AAEC/w==", "encoding": "base64"},
)
SET_EXAMPLES = _examples(any_version={"data": "10.0.0.6:3306"}, compare_and_set={"data": "v2", "version": 3})
MULTI_EXAMPLES = _examples(
    move_primary={
        "ops": [
            {"op": "check", "path": "/clusters/c1/primary", "version": 4},
            {"op": "set", "path": "/clusters/c1/primary", "data": "db-2", "version": 4},
            {"op": "create", "path": "/clusters/c1/history/failover-", "sequential": True, "data": "db-1 -> db-2"},
        ]
    }
)
SESSION_EXAMPLES = _examples(ten_seconds={"timeout_ms": 10000})
LOCK_EXAMPLES = _examples(wait_five_seconds={"path": "/locks/schema", "session_id": 4242, "wait_ms": 5000})

NODES, CHILDREN, STAT, ACL = (f"/api/v1/registry/{name}" for name in ("nodes", "children", "stat", "acl"))
NODE_PATHS = [NODES, NODES + "/{path:path}"]
QueryVersion = Annotated[
    int, QueryParameter(ge=-1, le=INT32_MAX, description="expected version (ZooKeeper's int32); -1: any")
]
PathSession = Annotated[int, Parameter(ge=1, le=INT64_MAX, description="a session id (ZooKeeper's int64)")]
Serializable = Annotated[
    bool, QueryParameter(name="serializable", description="answer from local state without the read barrier")
]


def _node_path(scope: Scope, route: str) -> str:
    """The node path exactly as the client sent it after `route`. Litestar's routing folds '//' and
    a trailing '/' away, which would name another node (PUT .../nodes/a//b set /a/b): the raw path
    keeps what the registry must refuse, or, for a sequential create under 'parent/', take."""
    try:
        raw = unquote(scope["raw_path"].decode("ascii"), errors="strict")
    except (UnicodeDecodeError, KeyError):
        raise BadArguments("the request path is not valid percent-encoded UTF-8") from None
    return raw[len(route) :] or "/" if raw.startswith(route) else "/"


def _owner(ephemeral: bool, session_id: int) -> int:
    if ephemeral and not session_id:
        raise BadArguments("an ephemeral node needs a session_id (POST /api/v1/sessions)")
    if session_id and not ephemeral:
        raise BadArguments("session_id is only meaningful with ephemeral=true")
    return session_id


_OP_NAMES: dict[type, str] = {OpCreate: "create", OpSet: "set", OpDelete: "delete", OpCheck: "check"}


def registry_routes(node: Node) -> list[HTTPRouteHandler]:
    """The handlers, closing over the node so hot paths skip dependency injection."""

    def reg() -> RegistryService:
        registry = node.registry
        if registry is None:
            raise Unavailable("the registry is starting")
        return registry

    @get(NODE_PATHS, tags=["registry"], summary="Get a node's data and stat")
    async def get_node(
        scope: Scope,
        encoding: Encoding | None = None,
        serializable: Serializable = False,
    ) -> NodeView:
        """Data in UTF-8 when it is valid UTF-8 (or asked), else base64; `encoding` says which."""
        return await nodes.get_node(reg(), _node_path(scope, NODES), serializable, encoding)

    @post(NODE_PATHS, tags=["registry"], summary="Create a node", status_code=HTTP_201_CREATED)
    async def create_node(data: Annotated[CreateBody, CREATE_EXAMPLES], scope: Scope) -> StatView:
        """Create; the answer's path differs from the request's for sequential nodes."""
        path = _node_path(scope, NODES)
        created = await reg().create(
            path,
            decode_data(data.data, data.encoding),
            session_id=_owner(data.ephemeral, data.session_id),
            sequential=data.sequential,
            container=data.container,
            parents=data.parents,
            acl=tuple(a.to_acl() for a in data.acl) if data.acl is not None else None,
            ttl_ms=data.ttl_ms,
        )
        return StatView(created.path, created.stat)

    @put(NODE_PATHS, tags=["registry"], summary="Set a node's data (compare-and-set with version)")
    async def set_node(data: Annotated[SetBody, SET_EXAMPLES], scope: Scope) -> StatView:
        """Replace data when the version matches (-1: any); 412 BadVersion otherwise."""
        return await nodes.set_node(reg(), _node_path(scope, NODES), data)

    @delete(NODE_PATHS, tags=["registry"], summary="Delete a node", status_code=HTTP_200_OK)
    async def delete_node(scope: Scope, version: QueryVersion = -1, recursive: bool = False) -> DeletedView:
        """Refuses a node with children (409 NotEmpty) unless recursive=true."""
        deleted = await reg().delete(_node_path(scope, NODES), version, recursive)
        return DeletedView(deleted.path, list(deleted.deleted))

    @get(
        [CHILDREN, CHILDREN + "/{path:path}"],
        tags=["registry"],
        summary="List a node's children",
    )
    async def children(scope: Scope, stat: bool = False, serializable: Serializable = False) -> ChildrenView:
        """Sorted names; with stat=true each child's stat too."""
        path = _node_path(scope, CHILDREN)
        registry = reg()
        names, own = await registry.children(path, linearizable=not serializable)
        if not stat:
            return ChildrenView(path, list(names), own)
        prefix = "" if path == "/" else path
        views: list[str | ChildView] = [ChildView(n, registry.stat_of(f"{prefix}/{n}")) for n in names]
        return ChildrenView(path, views, own)

    @get(
        [STAT, STAT + "/{path:path}"],
        tags=["registry"],
        summary="A node's stat (exists)",
    )
    async def stat_node(scope: Scope, serializable: Serializable = False) -> StatView:
        """404 NoNode when the node does not exist."""
        path = _node_path(scope, STAT)
        return StatView(path, await reg().stat(path, linearizable=not serializable))

    @get(
        [ACL, ACL + "/{path:path}"],
        tags=["registry"],
        summary="A node's ACL",
    )
    async def get_acl(scope: Scope, serializable: Serializable = False) -> AclView:
        """ACL entries and the node's stat (aversion counts ACL changes)."""
        path = _node_path(scope, ACL)
        acl, stat = await reg().get_acl(path, linearizable=not serializable)
        return AclView(path, [AclEntry(a.perms, a.scheme, a.id) for a in acl], stat)

    @put(
        [ACL, ACL + "/{path:path}"],
        tags=["registry"],
        summary="Replace a node's ACL",
    )
    async def set_acl(data: AclBody, scope: Scope) -> StatView:
        """Compare-and-set on aversion."""
        updated = await reg().set_acl(_node_path(scope, ACL), tuple(a.to_acl() for a in data.acl), data.version)
        return StatView(updated.path, updated.stat)

    @post("/api/v1/registry/check", tags=["registry"], summary="Check a node's version", status_code=HTTP_200_OK)
    async def check(data: CheckBody, serializable: Serializable = False) -> StatView:
        """200 with the stat when the version matches; 412 BadVersion or 404 NoNode otherwise."""
        return StatView(data.path, await reg().check(data.path, data.version, linearizable=not serializable))

    @post("/api/v1/registry/multi", tags=["registry"], summary="Atomic multi-operation", status_code=HTTP_200_OK)
    async def multi(data: Annotated[MultiBody, MULTI_EXAMPLES]) -> MultiView:
        """All ops or none. On failure the error names the failing op (detail.failed_index)."""
        ops: list[Create | SetData | Delete | Check] = []
        for op in data.ops:
            match op:
                case OpCreate():
                    ops.append(
                        Create(
                            op.path,
                            decode_data(op.data, op.encoding),
                            _owner(op.ephemeral, op.session_id),
                            op.sequential,
                            op.container,
                            op.parents,
                        )
                    )
                case OpSet():
                    ops.append(SetData(op.path, decode_data(op.data, op.encoding), op.version))
                case OpDelete():
                    ops.append(Delete(op.path, op.version, op.recursive))
                case OpCheck():
                    ops.append(Check(op.path, op.version))
        registry = reg()
        done = await registry.multi(ops)
        results = []
        for op, res in zip(data.ops, done.results, strict=True):
            match res:
                case Created() | Updated():
                    results.append(OpResult(_OP_NAMES[type(op)], res.path, stat=res.stat))
                case Deleted():
                    results.append(OpResult(_OP_NAMES[type(op)], res.path, deleted=list(res.deleted)))
        revision = results[0].stat.mzxid if results and results[0].stat else registry.revision
        return MultiView(revision, results)

    @get("/api/v1/registry", tags=["registry"], summary="Registry status: revision and counts")
    async def status(serializable: Serializable = False) -> RegistryStatus:
        """The applied revision, node, session and watch counts, and the log position."""
        registry = reg()
        if not serializable:
            await registry.sync()
        figures = registry.stats()
        return RegistryStatus(
            revision=figures.revision,
            nodes=figures.nodes,
            sessions=figures.sessions,
            term=figures.term,
            leader=figures.leader,
            applied_seq=figures.applied_seq,
            watches=figures.watches,
            oldest_resumable_revision=figures.oldest_resumable_revision,
        )

    # ---- sessions -------------------------------------------------------------------------------

    @post("/api/v1/sessions", tags=["sessions"], summary="Open a session", status_code=HTTP_201_CREATED)
    async def open_session(data: Annotated[SessionBody, SESSION_EXAMPLES]) -> SessionView:
        """Keep it alive with PUT /api/v1/sessions/{id}/keepalive (or over the watch WebSocket)."""
        opened = await reg().open_session(data.timeout_ms)
        return SessionView(opened.session_id, opened.timeout_ms)

    @put("/api/v1/sessions/{session_id:int}/keepalive", tags=["sessions"], summary="Keep a session alive")
    async def keepalive(session_id: PathSession) -> SessionView:
        """404 SessionExpired when it is gone."""
        timeout = await reg().keepalive(session_id)
        return SessionView(session_id, timeout)

    @delete("/api/v1/sessions/{session_id:int}", tags=["sessions"], summary="Close a session", status_code=200)
    async def close_session(session_id: PathSession) -> DeletedView:
        """Its ephemeral nodes are deleted at once."""
        closed = await reg().close_session(session_id)
        return DeletedView(f"0x{session_id:x}", list(closed.deleted))

    @get("/api/v1/sessions", tags=["sessions"], summary="List sessions")
    async def list_sessions() -> list[SessionView]:
        """Every open session on the registry."""
        return [SessionView(r.session_id, r.timeout_ms, r.created_ms) for r in reg().sessions()]

    @get("/api/v1/sessions/{session_id:int}", tags=["sessions"], summary="One session and its ephemeral nodes")
    async def one_session(session_id: PathSession) -> SessionView:
        """404 SessionExpired when it is gone."""
        record, owned = reg().session(session_id)
        return SessionView(record.session_id, record.timeout_ms, record.created_ms, owned)

    # ---- recipes --------------------------------------------------------------------------------

    @post("/api/v1/recipes/lock", tags=["recipes"], summary="Take a lock", status_code=HTTP_200_OK)
    async def take_lock(data: Annotated[LockBody, LOCK_EXAMPLES]) -> LockView:
        """Held while the session lives or until the node is deleted; 409 LockTimeout after wait_ms."""
        node_path = await recipes.lock(reg(), data.path, data.session_id, data.owner, data.wait_ms / 1000)
        return LockView(data.path, node_path, data.owner)

    @delete("/api/v1/recipes/lock", tags=["recipes"], summary="Release a lock", status_code=HTTP_200_OK)
    async def release_lock(node_path: Annotated[str, QueryParameter(name="node")]) -> DeletedView:
        """Delete the lock node returned by POST."""
        deleted = await reg().delete(node_path)
        return DeletedView(deleted.path, list(deleted.deleted))

    @post("/api/v1/recipes/election", tags=["recipes"], summary="Join an election", status_code=HTTP_200_OK)
    async def join(data: ElectionBody) -> ElectionView:
        """Become a candidate; with wait_ms, wait that long to be elected."""
        registry = reg()
        node_path, elected = await recipes.join_election(
            registry, data.path, data.session_id, data.candidate, data.wait_ms / 1000
        )
        leader, leader_node, names = recipes.election_state(registry, data.path)
        return ElectionView(data.path, leader, leader_node, names, node_path, elected)

    @get("/api/v1/recipes/election", tags=["recipes"], summary="Who leads an election")
    async def election(path: str, serializable: Serializable = False) -> ElectionView:
        """The lowest candidate leads."""
        registry = reg()
        await registry.stat(path, linearizable=not serializable)
        leader, leader_node, names = recipes.election_state(registry, path)
        return ElectionView(path, leader, leader_node, names)

    return [
        status,
        get_node,
        create_node,
        set_node,
        delete_node,
        children,
        stat_node,
        get_acl,
        set_acl,
        check,
        multi,
        open_session,
        keepalive,
        close_session,
        list_sessions,
        one_session,
        take_lock,
        release_lock,
        join,
        election,
    ]
