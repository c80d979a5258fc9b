"""Granian's RSGI interface seen as ASGI: a request's scope, receive and send, so Litestar serves it unchanged.

fleetmate is served over RSGI because the hottest routes (get and set of one node) answer on it
directly: no scope dict built per request, the body read once, the response handed over in one
synchronous call. Every other request, websockets included, goes through this bridge to the ASGI
application as it would under an ASGI server.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

from granian._granian import RSGIHTTPProtocol as HTTPProtocol
from granian._granian import RSGIProtocolClosed as ProtocolClosed
from granian._granian import RSGIProtocolError as ProtocolError
from granian._granian import RSGIWebsocketProtocol as WebsocketProtocol
from granian.rsgi import Scope as RsgiScope
from granian.rsgi import WebsocketMessageType
from litestar.types import ASGIApp

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_SAFE = "/!$&'()*+,;=:@~-._"  # characters a path keeps unescaped in raw_path
_DISCONNECT: dict[str, Any] = {"type": "http.disconnect"}


def _address(text: str) -> tuple[str, int] | None:
    """'host:port' or '[v6]:port' as ASGI's (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return None
    return host.strip("[]"), int(port)


def asgi_scope(scope: RsgiScope, kind: str) -> dict[str, Any]:
    """The ASGI scope ("http" or "websocket") of an RSGI request."""
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in scope.headers.items()]
    out: dict[str, Any] = {
        "type": kind,
        "asgi": _ASGI,
        "http_version": scope.http_version,
        "scheme": ("wss" if scope.scheme == "https" else "ws") if kind == "websocket" else scope.scheme,
        "path": scope.path,
        "raw_path": quote(scope.path, safe=_SAFE).encode("ascii"),
        "root_path": "",
        "query_string": scope.query_string.encode("latin-1"),
        "headers": headers,
        "client": _address(scope.client),
        "server": _address(scope.server),
        "extensions": {},
    }
    if kind == "http":
        out["method"] = scope.method
    else:
        offered = scope.headers.get("sec-websocket-protocol") or ""
        out["subprotocols"] = [p.strip() for p in offered.split(",") if p.strip()]
    return out


def _sent() -> asyncio.Future[None]:
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    fut.set_result(None)
    return fut


class HttpReceive:
    """ASGI receive over an RSGI request: the whole body once (or the one already read), then disconnect.

    `read` reads the body when it was not read yet (the request's own bounded reader; else the
    protocol's whole-body read); whatever it raises but a lost client reaches the application.
    """

    __slots__ = ("_body", "_proto", "_read", "_sent")

    def __init__(
        self, proto: HTTPProtocol, body: bytes | None = None, read: Callable[[], Awaitable[bytes]] | None = None
    ) -> None:
        self._proto = proto
        self._body = body
        self._read = read if read is not None else proto
        self._sent = False

    async def __call__(self) -> dict[str, Any]:
        if not self._sent:
            self._sent = True
            body = self._body
            if body is None:
                try:
                    body = await self._read()
                except (ProtocolError, ProtocolClosed, RuntimeError):
                    return _DISCONNECT
            return {"type": "http.request", "body": body, "more_body": False}
        await self._proto.client_disconnect()
        return _DISCONNECT


class HttpSend:
    """ASGI send over an RSGI request: a one-piece body as one response, more pieces as a stream."""

    __slots__ = ("_headers", "_proto", "_stream", "status")

    def __init__(self, proto: HTTPProtocol) -> None:
        self._proto = proto
        self._headers: list[tuple[str, str]] = []
        self._stream: Any = None
        self.status = 0  # the status sent, once the response started

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            if self.status:
                raise RuntimeError("the response has already started")
            self.status = message["status"]
            self._headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in message.get("headers", ())]
            if self.status == 413:  # a refused body may be unread: not for another request (as observe.py)
                self._headers.append(("connection", "close"))
        elif kind == "http.response.body":
            if not self.status:
                raise RuntimeError("a response body before its start")
            body: bytes = message.get("body", b"")
            more: bool = message.get("more_body", False)
            if self._stream is None:
                if not more:
                    self._proto.response_bytes(self.status, self._headers, body)
                    return
                self._stream = self._proto.response_stream(self.status, self._headers)
            if body:
                await self._stream.send_bytes(body)
        else:
            raise RuntimeError(f"unsupported ASGI message {kind!r}")


class WebsocketBridge:
    """ASGI receive and send over an RSGI websocket; finish() closes what the application left open."""

    __slots__ = ("_closed", "_connected", "_proto", "_transport")

    def __init__(self, proto: WebsocketProtocol) -> None:
        self._proto = proto
        self._transport: Any = None
        self._connected = False
        self._closed = False

    async def receive(self) -> dict[str, Any]:
        if not self._connected:
            self._connected = True
            return {"type": "websocket.connect"}
        if self._transport is None or self._closed:
            return {"type": "websocket.disconnect", "code": 1006}
        try:
            msg = await self._transport.receive()
        except (ProtocolError, ProtocolClosed, RuntimeError):
            return {"type": "websocket.disconnect", "code": 1006}
        if msg.kind == WebsocketMessageType.close:
            return {"type": "websocket.disconnect", "code": 1000}
        if msg.kind == WebsocketMessageType.bytes:
            return {"type": "websocket.receive", "bytes": msg.data, "text": None}
        return {"type": "websocket.receive", "bytes": None, "text": msg.data}

    def send(self, message: dict[str, Any]) -> Awaitable[None]:
        """ASGI send. Not a coroutine: a frame is on its way when this returns, and the awaitable
        (Granian's future, with done()) tells when it went out, which the watch socket relies on
        to keep many frames in flight without a task each, as it does under an ASGI server."""
        kind = message["type"]
        if kind == "websocket.send":
            if self._transport is None or self._closed:
                raise RuntimeError("websocket is not open")
            text = message.get("text")
            if text is not None:
                return self._transport.send_str(text)  # type: ignore[no-any-return]
            return self._transport.send_bytes(message.get("bytes") or b"")  # type: ignore[no-any-return]
        if kind == "websocket.accept":
            return self._accept()
        if kind == "websocket.close":
            self.finish()
            return _sent()
        raise RuntimeError(f"unsupported ASGI message {kind!r}")

    async def _accept(self) -> None:
        self._transport = await self._proto.accept()

    def finish(self) -> None:
        """Close the socket: a normal close frame once accepted (RSGI sends no close code or
        reason), else the handshake refused with HTTP 403, as ASGI servers do."""
        if not self._closed:
            self._closed = True
            self._proto.close(1000 if self._transport is not None else 403)
            # The transport holds the socket's read half: Granian closes the TCP connection when it
            # is freed. Litestar's handlers leave reference cycles (an exception's traceback) that
            # would keep it until the next collection, and the client waiting for the end.
            self._transport = None


async def serve_websocket(app: ASGIApp, scope: RsgiScope, proto: WebsocketProtocol) -> None:
    """Run an ASGI application for one RSGI websocket."""
    bridge = WebsocketBridge(proto)
    try:
        await app(asgi_scope(scope, "websocket"), bridge.receive, bridge.send)  # type: ignore[arg-type]
    finally:
        bridge.finish()
