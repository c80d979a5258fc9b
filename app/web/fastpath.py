"""A lean path for the hottest routes (get and set of one node or KV key, the watch socket), beside Litestar.

Profiles put a third of each request in framework work (routing, parameter parsing, dependency
resolution, response building). A GET or PUT of `/api/v1/registry/nodes/<path>` in its plain form
is answered here by the same handler functions the Litestar routes call (routes/registry_nodes.py),
and so are the KV's `/api/v1/kv/put`, `/api/v1/kv/get` and MatrixKV's `/set` and `/get` (routes/kv.py);
errors rendered as Litestar's handler renders them; anything else (other query parameters, a body
that does not decode, a missing or refused token) goes on to Litestar unchanged.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Awaitable, Callable
from typing import NamedTuple

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, Receive, Scope, Send

from app.errors import FleetmateError
from app.node import Node
from app.web.auth import TokenGuard
from app.web.errors import fleetmate_error_parts
from app.web.metrics import RequestFigures
from app.web.routes.kv import PutBody, get_item, matrix_get, matrix_set, put_key
from app.web.routes.registry_models import SetBody
from app.web.routes.registry_nodes import get_node, set_node
from app.web.routes.watch import WATCH_PATH, WatchSocket

PREFIX = "/api/v1/registry/nodes"
ROUTE = PREFIX + "/{path}"  # the template Litestar reports for these routes (metrics, spans)
_READ_QUERIES = {"": False, "serializable=false": False, "serializable=true": True}
_enc = msgspec.json.Encoder()
_set_dec = msgspec.json.Decoder(SetBody)
_put_dec = msgspec.json.Decoder(PutBody)
KV_PUT = "/api/v1/kv/put"
KV_GET = "/api/v1/kv/get"
_MATRIXKV = frozenset({"/set", "/get"})
_KV_ROUTES = frozenset({KV_PUT, KV_GET, *_MATRIXKV})


class Answer(NamedTuple):
    """A response of the lean path: status, JSON body, extra headers, the route template it stands for."""

    status: int
    body: bytes
    headers: dict[str, str] | None = None
    route: str = ROUTE


class Body:
    """A request body read at most once: the lean path reads it, Litestar gets it if the request goes on."""

    __slots__ = ("_read", "data")

    def __init__(self, read: Callable[[], Awaitable[bytes]]) -> None:
        self._read = read
        self.data: bytes | None = None

    async def read(self) -> bytes:
        if self.data is None:
            self.data = await self._read()
        return self.data


class FastPath:
    """Beside Litestar: the front tries lean() first for every HTTP request; the watch socket is here too."""

    def __init__(
        self, app: ASGIApp, node: Node, guard: TokenGuard | None, figures: RequestFigures, watch: WatchSocket
    ) -> None:
        self.app = app
        self.watch = watch
        self.node = node
        self.guard = guard
        self.figures = figures

    def _allowed(self, authorization: str | None, write: bool) -> bool:
        if self.guard is None:
            return True
        granted = self.guard.scope_of_header(authorization)
        return granted == "admin" or (granted == "read" and not write)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anything but HTTP: the watch socket, else Litestar."""
        if scope["type"] == ScopeType.WEBSOCKET and scope["path"] == WATCH_PATH:
            await self.watch(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def lean(self, method: str, path: str, query: str, authorization: str | None, body: Body) -> Answer | None:
        """Answer a plain node get or set, or None to leave the request to Litestar (with the body
        this path may have read kept in `body`)."""
        if path in _KV_ROUTES:
            return await self._kv(method, path, query, authorization, body)
        registry = self.node.registry
        if (
            registry is None
            or not path.startswith(PREFIX)
            or len(path) <= len(PREFIX) + 1
            or path[len(PREFIX)] != "/"
            or path[-1] == "/"
        ):
            return None
        node_path = path[len(PREFIX) :]
        if method == "GET":
            serializable = _READ_QUERIES.get(query)
            if serializable is not None and self._allowed(authorization, write=False):
                self.figures.fast += 1
                try:
                    return Answer(200, _enc.encode(await get_node(registry, node_path, serializable)))
                except FleetmateError as exc:
                    return _error(exc)
        elif method == "PUT" and not query and self._allowed(authorization, write=True):
            try:
                req = _set_dec.decode(await body.read())
            except msgspec.DecodeError:
                return None
            self.figures.fast += 1
            try:
                return Answer(200, _enc.encode(await set_node(registry, node_path, req)))
            except FleetmateError as exc:
                return _error(exc)
        return None

    async def _kv(self, method: str, path: str, query: str, authorization: str | None, body: Body) -> Answer | None:
        """A plain KV put or get (a key alone, or with serializable/token), or None for Litestar."""
        kv = self.node.kv
        if kv is None or (path in _MATRIXKV and not self.node.cfg.kv.matrixkv):
            return None
        write = method == "POST"
        if method != ("POST" if path in (KV_PUT, "/set") else "GET") or not self._allowed(authorization, write):
            return None
        if write:
            if query:
                return None
            raw = await body.read()
            if path == "/set":
                self.figures.fast += 1
                return Answer(200, _enc.encode(await matrix_set(kv, raw)), None, path)
            try:
                req = _put_dec.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError):
                return None  # Litestar answers it with its own 400
            self.figures.fast += 1
            try:
                return Answer(200, _enc.encode(await put_key(kv, req)), None, path)
            except FleetmateError as exc:
                return _error(exc, path)
        params = _kv_query(query, path)
        if params is None:
            return None
        self.figures.fast += 1
        if path == "/get":
            return Answer(200, _enc.encode(await matrix_get(kv, params.get("key", ""))), None, path)
        serializable = params.get("serializable", "false") == "true"
        try:
            item = await get_item(kv, params["key"], serializable, params.get("token", ""))
            return Answer(200, _enc.encode(item), None, path)
        except FleetmateError as exc:
            return _error(exc, path)


def _kv_query(query: str, path: str) -> dict[str, str] | None:
    """A KV get's parameters when they are plain (each once, the allowed names), else None."""
    try:
        pairs = urllib.parse.parse_qsl(query, keep_blank_values=True, strict_parsing=True) if query else []
    except ValueError:
        return None
    params = dict(pairs)
    allowed = {"key"} if path == "/get" else {"key", "serializable", "token"}
    if len(params) != len(pairs) or not set(params) <= allowed or (path == KV_GET and "key" not in params):
        return None
    if params.get("serializable", "false") not in ("true", "false"):
        return None
    return params


def _error(exc: FleetmateError, route: str = ROUTE) -> Answer:
    """A FleetmateError answered as Litestar's handler answers it (app/web/errors.py)."""
    err, headers = fleetmate_error_parts(exc)
    return Answer(exc.status, _enc.encode(err), headers, route)
