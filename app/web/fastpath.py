"""A lean path for the hottest routes (get and set of one node, the watch socket), beside Litestar.

Profiles put a third of each request in framework work (routing, parameter parsing, dependency
resolution, response building). A GET or PUT of `/api/v1/registry/nodes/<path>` in its plain form
is answered here by the same handler functions the Litestar routes call (routes/registry_nodes.py),
errors rendered as Litestar's handler renders them; anything else (other query parameters, a body
that does not decode, a missing or refused token) goes on to Litestar unchanged.
"""

from __future__ import annotations

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
from app.web.routes.registry_models import SetBody
from app.web.routes.registry_nodes import get_node, set_node
from app.web.routes.watch import WATCH_PATH, WatchSocket

PREFIX = "/api/v1/registry/nodes"
ROUTE = PREFIX + "/{path}"  # the template Litestar reports for these routes (metrics, spans)
_READ_QUERIES = {"": False, "serializable=false": False, "serializable=true": True}
_enc = msgspec.json.Encoder()
_set_dec = msgspec.json.Decoder(SetBody)


class Answer(NamedTuple):
    """A response of the lean path: status, JSON body, extra headers."""

    status: int
    body: bytes
    headers: dict[str, str] | None = None


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


def _error(exc: FleetmateError) -> Answer:
    """A FleetmateError answered as Litestar's handler answers it (app/web/errors.py)."""
    err, headers = fleetmate_error_parts(exc)
    return Answer(exc.status, _enc.encode(err), headers)
