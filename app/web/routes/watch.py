"""The watch WebSocket: a persistent (or one-shot) watch streamed as JSON, with session keepalives."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from typing import Any, Literal

import msgspec
from litestar import WebSocket, websocket
from litestar.exceptions import WebSocketDisconnect
from litestar.handlers import WebsocketRouteHandler

from app.errors import FleetmateError
from app.node import Node
from app.services.registry import paths
from app.services.registry.errors import BadArguments
from app.services.registry.messages import Event
from app.services.registry.watches import Mailbox, WatchOverflow

_enc = msgspec.json.Encoder()


class ClientMessage(msgspec.Struct, frozen=True):
    """What a watcher may send: {"op": "keepalive", "session_id": N}."""

    op: Literal["keepalive"]
    session_id: int


_CLIENT_GONE = object()


@functools.lru_cache(maxsize=4096)
def _event_message(e: Event) -> Any:
    """An event's ASGI send message, built once however many watchers receive it (servers do not
    change the messages they are given)."""
    text = _enc.encode({"type": e.type, "path": e.path, "revision": e.revision, "version": e.version}).decode()
    return {"type": "websocket.send", "bytes": None, "text": text}


def watch_routes(node: Node) -> list[WebsocketRouteHandler]:
    """The /api/v1/watch handler."""

    @websocket("/api/v1/watch")
    async def watch(
        socket: WebSocket[Any, Any, Any],
        path: str = "/",
        recursive: bool = False,
        since: int | None = None,
        once: bool = False,
        kind: Literal["data", "exists", "children"] = "exists",
    ) -> None:
        """Query: path, recursive, since (resume from a revision), once+kind (a one-shot watch).

        Sends {"type": "ready", "revision": N} first, then one JSON object per event:
        {"type": created|deleted|changed|children, "path", "revision", "version"}.
        Errors come as {"type": "error", "error": code, "message"} before the socket closes.
        """
        await socket.accept()
        registry = node.registry
        if registry is None:
            await _fail(socket, "unavailable", "the registry is starting")
            return
        try:
            paths.validate(path, registry.cfg.max_path_bytes)
            if since is not None and since < 0:
                raise BadArguments("since must be >= 0")
            await registry.sync()
            sub = None
            if once:
                queue: Mailbox[object] = Mailbox()
                registry.watches.watch_once(path, kind, queue.put_nowait)
            else:
                sub = registry.watches.subscribe(path, recursive, since)
                queue = sub.queue  # type: ignore[assignment]  # Event | WatchOverflow items
        except FleetmateError as exc:
            await _fail(socket, exc.code, exc.message)
            return
        await socket.send_bytes(_enc.encode({"type": "ready", "revision": registry.revision}))
        # One waiting coroutine per watcher and no task per event: with 10,000 watchers every
        # event wakes 10,000 of these loops, so each wake-up must be cheap.
        reader = asyncio.create_task(_read_client(socket, node))
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
                assert isinstance(item, Event)
                await socket.send(_event_message(item))  # one layer less than send_text
                if once:
                    break
        except WebSocketDisconnect:
            return
        finally:
            # Stop the reader before closing: a pending receive would hold the close back.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            if sub is not None:
                sub.close()
        if failure is not None:
            await _fail(socket, *failure)
        else:
            with contextlib.suppress(Exception):
                await socket.close()

    return [watch]


async def _read_client(socket: WebSocket[Any, Any, Any], node: Node) -> None:
    dec = msgspec.json.Decoder(ClientMessage)
    while True:
        raw = await socket.receive_data(mode="text")
        try:
            msg = dec.decode(raw)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            await socket.send_text(_enc.encode({"type": "error", "error": "bad_request", "message": str(exc)}).decode())
            continue
        registry = node.registry
        if registry is None:
            continue
        try:
            timeout = await registry.keepalive(msg.session_id)
            reply = {"type": "keepalive", "session_id": msg.session_id, "timeout_ms": timeout}
        except FleetmateError as exc:
            reply = {"type": "error", "error": exc.code, "message": exc.message}
        await socket.send_text(_enc.encode(reply).decode())


async def _fail(socket: WebSocket[Any, Any, Any], code: str, message: str) -> None:
    with contextlib.suppress(Exception):
        await socket.send_text(_enc.encode({"type": "error", "error": code, "message": message}).decode())
        await socket.close(code=4000 + (1 if code == "Compacted" else 0))
