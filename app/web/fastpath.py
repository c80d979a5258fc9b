"""A lean path for the hottest routes (get and set of one node, the watch socket), beside Litestar.

Profiles put a third of each request in framework work (routing, parameter parsing, dependency
resolution, response building). A GET or PUT of `/api/v1/registry/nodes/<path>` in its plain form
is answered here with the same RegistryService calls and the same msgspec bodies; anything else
(other query parameters, a body that does not decode, a missing or refused token, a failed read)
goes on to Litestar unchanged, which answers it, errors included, as before.
"""

from __future__ import annotations

from typing import Any

import msgspec
from litestar.enums import ScopeType
from litestar.types import ASGIApp, HTTPScope, Receive, ReceiveMessage, Scope, Send

from app.errors import FleetmateError
from app.node import Node
from app.web.auth import TokenGuard
from app.web.errors import fleetmate_error_parts
from app.web.metrics import RequestFigures
from app.web.routes.registry_models import NodeView, SetBody, StatView, decode_data, encode_data
from app.web.routes.watch import WATCH_PATH, WatchSocket

PREFIX = "/api/v1/registry/nodes"
ROUTE = PREFIX + "/{path}"  # the template Litestar reports for these routes (metrics, spans)
_READ_QUERIES = {b"": False, b"serializable=false": False, b"serializable=true": True}
_JSON = (b"content-type", b"application/json")
_enc = msgspec.json.Encoder()
_set_dec = msgspec.json.Decoder(SetBody)


async def _answer(send: Send, status: int, body: bytes, extra: dict[str, str] | None = None) -> int:
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    return status


class FastPath:
    """Beside Litestar: Observe tries http() first for every HTTP request; the watch socket is here too."""

    def __init__(
        self, app: ASGIApp, node: Node, guard: TokenGuard | None, figures: RequestFigures, watch: WatchSocket
    ) -> None:
        self.app = app
        self.watch = watch
        self.node = node
        self.guard = guard
        self.figures = figures

    def _allowed(self, scope: Scope, write: bool) -> bool:
        if self.guard is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                kind, _, presented = value.decode("latin-1").partition(" ")
                if kind.lower() != "bearer":
                    return False
                granted = self.guard.scope_of(presented.strip())
                return granted == "admin" or (granted == "read" and not write)
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Anything but HTTP: the watch socket, else Litestar."""
        if scope["type"] == ScopeType.WEBSOCKET and scope["path"] == WATCH_PATH:
            await self.watch(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def http(self, scope: HTTPScope, receive: Receive, send: Send) -> tuple[int, Receive]:
        """Answer a plain node get or set: (status sent, receive). (0, receive) leaves the request to
        Litestar, with a receive that replays a body this path already read."""
        path: str = scope["path"]
        registry = self.node.registry
        if (
            registry is None
            or not path.startswith(PREFIX)
            or len(path) <= len(PREFIX) + 1
            or path[len(PREFIX)] != "/"
            or path[-1] == "/"
        ):
            return 0, receive
        node_path = path[len(PREFIX) :]
        method: str = scope["method"]
        if method == "GET":
            serializable = _READ_QUERIES.get(scope["query_string"])
            if serializable is not None and self._allowed(scope, write=False):
                try:
                    data, stat = await registry.get(node_path, linearizable=not serializable)
                except FleetmateError:
                    return 0, receive  # Litestar reads again and renders the error
                text, used = encode_data(data, None)
                scope["path_template"] = ROUTE
                self.figures.fast += 1
                return await _answer(send, 200, _enc.encode(NodeView(node_path, text, used, stat))), receive
        elif method == "PUT" and not scope["query_string"] and self._allowed(scope, write=True):
            body = await _read_body(receive)
            try:
                req = _set_dec.decode(body)
            except msgspec.DecodeError:
                return 0, _replay(body, receive)
            scope["path_template"] = ROUTE
            self.figures.fast += 1
            try:
                updated = await registry.set(node_path, decode_data(req.data, req.encoding), req.version)
            except FleetmateError as exc:
                err, headers = fleetmate_error_parts(exc)
                return await _answer(send, exc.status, _enc.encode(err), headers), receive
            return await _answer(send, 200, _enc.encode(StatView(updated.path, updated.stat))), receive
        return 0, receive


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message: Any = await receive()
        if message["type"] != "http.request":
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the already-read body once, then whatever comes next (a disconnect)."""
    sent = False

    async def again() -> ReceiveMessage:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again
