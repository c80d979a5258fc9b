"""The watch WebSocket (/api/v1/watch) as a plain ASGI handler: a persistent or one-shot watch streamed as JSON.

It runs below the framework: with 10,000 watchers every event is 10,000 sends, and each layer
between the event and the server's send costs that many times over. The protocol:

- query: `path` (default /), `recursive` (true/false), `since` (resume from a revision),
  `once` + `kind` (data, exists, children: a one-shot watch);
- the server sends {"type": "ready", "revision": N}, then one JSON object per event:
  {"type": created|deleted|changed|children, "path", "revision", "version"};
- the client may send {"op": "keepalive", "session_id": N} to keep a session alive over the
  socket; the answer is {"type": "keepalive", "session_id", "timeout_ms"};
- errors come as {"type": "error", "error": code, "message"} before the server closes the socket
  (code 4000, or 4001 for Compacted). A missing or refused token closes the handshake (403).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

import msgspec
from litestar.types import Receive, Scope, Send

from app.errors import FleetmateError
from app.node import Node
from app.services.registry import paths
from app.services.registry.errors import BadArguments
from app.services.registry.messages import Event
from app.services.registry.watches import Mailbox, OneShotKind, WatchOverflow
from app.web.auth import TokenGuard

WATCH_PATH = "/api/v1/watch"
_enc = msgspec.json.Encoder()
_CLIENT_GONE = object()
_KINDS = ("data", "exists", "children")


class ClientMessage(msgspec.Struct, frozen=True):
    """What a watcher may send: {"op": "keepalive", "session_id": N}."""

    op: Literal["keepalive"]
    session_id: int


class WatchQuery(msgspec.Struct, frozen=True):
    """The query parameters, checked."""

    path: str = "/"
    recursive: bool = False
    since: int | None = None
    once: bool = False
    kind: OneShotKind = "exists"


_client_dec = msgspec.json.Decoder(ClientMessage)


class _LastEvent:
    """The ASGI send message of the event being fanned out, built once for all its watchers.

    Every watcher receives the same Event object one after the other, so an identity check
    is enough (hashing the event for a cache lookup cost more at 10,000 watchers). Servers do
    not change the messages they are given.
    """

    event: Event | None = None
    message: Any = None


def _event_message(e: Event) -> Any:
    if e is not _LastEvent.event:
        text = _enc.encode({"type": e.type, "path": e.path, "revision": e.revision, "version": e.version}).decode()
        _LastEvent.event, _LastEvent.message = e, {"type": "websocket.send", "bytes": None, "text": text}
    return _LastEvent.message


def _text(obj: object) -> Any:
    return {"type": "websocket.send", "bytes": None, "text": _enc.encode(obj).decode()}


def _flag(name: str, raw: str) -> bool:
    low = raw.lower()
    if low in ("true", "1"):
        return True
    if low in ("false", "0"):
        return False
    raise BadArguments(f"{name} must be true or false, not {raw!r}")


def parse_query(query_string: bytes) -> WatchQuery:
    """The watch's parameters; BadArguments naming the one that is wrong."""
    raw = dict(parse_qsl(query_string.decode("latin-1"), keep_blank_values=True))
    unknown = set(raw) - set(WatchQuery.__struct_fields__)
    if unknown:
        raise BadArguments(f"unknown parameter(s): {', '.join(sorted(unknown))}")
    since = None
    if "since" in raw:
        try:
            since = int(raw["since"])
        except ValueError:
            raise BadArguments(f"since must be an integer, not {raw['since']!r}") from None
        if since < 0:
            raise BadArguments("since must be >= 0")
    kind = raw.get("kind", "exists")
    if kind not in _KINDS:
        raise BadArguments(f"kind must be one of {', '.join(_KINDS)}, not {kind!r}")
    return WatchQuery(
        path=raw.get("path", "/"),
        recursive=_flag("recursive", raw.get("recursive", "false")),
        since=since,
        once=_flag("once", raw.get("once", "false")),
        kind=cast(OneShotKind, kind),
    )


class WatchSocket:
    """Serves /api/v1/watch connections for one node."""

    def __init__(self, node: Node, guard: TokenGuard | None) -> None:
        self.node = node
        self.guard = guard

    def _allowed(self, scope: Scope) -> bool:
        if self.guard is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                kind, _, presented = value.decode("latin-1").partition(" ")
                return kind.lower() == "bearer" and self.guard.scope_of(presented.strip()) is not None
        return False

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        first = await receive()
        if first["type"] != "websocket.connect":
            return
        if not self._allowed(scope):
            await send({"type": "websocket.close", "code": 1008, "reason": ""})  # refused handshake: 403
            return
        await send({"type": "websocket.accept", "subprotocol": None, "headers": []})
        registry = self.node.registry
        if registry is None:
            await _fail(send, "unavailable", "the registry is starting")
            return
        try:
            query = parse_query(scope["query_string"])
            paths.validate(query.path, registry.cfg.max_path_bytes)
            await registry.sync()
            sub = None
            queue: Mailbox[Any] = Mailbox()
            if query.once:
                registry.watches.watch_once(query.path, query.kind, queue.put_nowait)
            else:
                sub = registry.watches.subscribe(query.path, query.recursive, query.since)
                queue = cast(Mailbox[Any], sub.queue)
        except FleetmateError as exc:
            await _fail(send, exc.code, exc.message)
            return
        await send(_text({"type": "ready", "revision": registry.revision}))
        # One waiting coroutine per watcher and no task per event: with 10,000 watchers every
        # event wakes 10,000 of these loops, so each wake-up must be cheap.
        reader = asyncio.create_task(self._read_client(receive, send))
        reader.add_done_callback(lambda _: queue.put_nowait(_CLIENT_GONE))
        failure: tuple[str, str] | None = None
        try:
            while True:
                item = await queue.get()
                if item is _CLIENT_GONE:
                    return
                if isinstance(item, WatchOverflow):
                    failure = ("slow_consumer", str(item))
                    break
                await send(_event_message(item))
                if query.once:
                    break
        except OSError:  # the client went away mid-send
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if sub is not None:
                sub.close()
        if failure is not None:
            await _fail(send, *failure)
        else:
            with contextlib.suppress(Exception):
                await send({"type": "websocket.close", "code": 1000, "reason": ""})

    async def _read_client(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] != "websocket.receive":
                return  # websocket.disconnect
            raw = message.get("text") or message.get("bytes") or b""
            try:
                msg = _client_dec.decode(raw)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                await send(_text({"type": "error", "error": "bad_request", "message": str(exc)}))
                continue
            registry = self.node.registry
            if registry is None:
                continue
            try:
                timeout = await registry.keepalive(msg.session_id)
                reply: dict[str, Any] = {"type": "keepalive", "session_id": msg.session_id, "timeout_ms": timeout}
            except FleetmateError as exc:
                reply = {"type": "error", "error": exc.code, "message": exc.message}
            await send(_text(reply))


async def _fail(send: Send, code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await send(_text({"type": "error", "error": code, "message": message}))
        await send({"type": "websocket.close", "code": 4000 + (1 if code == "Compacted" else 0), "reason": ""})
