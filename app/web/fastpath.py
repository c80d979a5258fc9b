"""A lean ASGI path for the hottest routes (get and set of one node, the watch socket), beside Litestar.

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
from litestar.types import ASGIApp, Receive, ReceiveMessage, Scope, Send
from prometheus_client import Counter

from app.errors import FleetmateError
from app.node import Node
from app.web.auth import TokenGuard
from app.web.errors import fleetmate_error_parts
from app.web.routes.registry_models import NodeView, SetBody, StatView, decode_data, encode_data
from app.web.routes.watch import WATCH_PATH, WatchSocket

PREFIX = "/api/v1/registry/nodes"
ROUTE = PREFIX + "/{path}"  # the template Litestar reports for these routes (metrics, spans)
_READ_QUERIES = {b"": False, b"serializable=false": False, b"serializable=true": True}
_JSON = (b"content-type", b"application/json")
_enc = msgspec.json.Encoder()
_set_dec = msgspec.json.Decoder(SetBody)


async def _answer(send: Send, status: int, body: bytes, extra: dict[str, str] | None = None) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend((k.lower().encode(), v.encode()) for k, v in extra.items())
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class FastPath:
    """Sits between the Observe layer and Litestar."""

    def __init__(self, app: ASGIApp, node: Node, guard: TokenGuard | None, hits: Counter, watch: WatchSocket) -> None:
        self.app = app
        self.watch = watch
        self.node = node
        self.guard = guard
        self.hits = hits

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
        if scope["type"] == ScopeType.WEBSOCKET and scope["path"] == WATCH_PATH:
            await self.watch(scope, receive, send)
            return
        if scope["type"] == ScopeType.HTTP:
            path: str = scope["path"]
            method: str = scope["method"]
            registry = self.node.registry
            if (
                registry is not None
                and path.startswith(PREFIX)
                and len(path) > len(PREFIX) + 1
                and path[len(PREFIX)] == "/"
                and path[-1] != "/"
            ):
                node_path = path[len(PREFIX) :]
                if method == "GET":
                    serializable = _READ_QUERIES.get(scope["query_string"])
                    if serializable is not None and self._allowed(scope, write=False):
                        try:
                            data, stat = await registry.get(node_path, linearizable=not serializable)
                        except FleetmateError:
                            pass  # Litestar reads again and renders the error
                        else:
                            text, used = encode_data(data, None)
                            scope["path_template"] = ROUTE
                            self.hits.inc()
                            await _answer(send, 200, _enc.encode(NodeView(node_path, text, used, stat)))
                            return
                elif method == "PUT" and not scope["query_string"] and self._allowed(scope, write=True):
                    body = await _read_body(receive)
                    try:
                        req = _set_dec.decode(body)
                    except msgspec.DecodeError:
                        req = None
                    if req is not None:
                        scope["path_template"] = ROUTE
                        self.hits.inc()
                        try:
                            updated = await registry.set(node_path, decode_data(req.data, req.encoding), req.version)
                        except FleetmateError as exc:
                            err, headers = fleetmate_error_parts(exc)
                            await _answer(send, exc.status, _enc.encode(err), headers)
                            return
                        await _answer(send, 200, _enc.encode(StatView(updated.path, updated.stat)))
                        return
                    receive = _replay(body, receive)
        await self.app(scope, receive, send)


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
