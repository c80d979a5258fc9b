"""What the Litestar WebSocket routes share: an error frame and close, draining a client, streaming changes."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect

from app.services.registry.messages import Event
from app.services.registry.view import Watchable

_enc = msgspec.json.Encoder()


async def drain(socket: WebSocket[Any, Any, Any]) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    with contextlib.suppress(WebSocketDisconnect, OSError):
        while True:
            await socket.receive_data("text")


async def fail(socket: WebSocket[Any, Any, Any], code: str, message: str) -> None:
    """Send {"type": "error", "error": code, "message": ...}, then close (RSGI sends no close code)."""
    with contextlib.suppress(Exception):
        await socket.send_text(_enc.encode({"type": "error", "error": code, "message": message}).decode())
        await socket.close()


async def stream_changes(
    socket: WebSocket[Any, Any, Any],
    registry: Watchable,
    root: str,
    ready: Callable[[], Awaitable[dict[str, Any]]],
    change: Callable[[Event], Any],
) -> None:
    """Watch root recursively, send ready() first, then change(event) for each event (None: skipped),
    until the client goes away. Subscribing first means no change between the two is missed."""
    queue: asyncio.Queue[Event | None] = asyncio.Queue()
    sub = registry.subscribe(root, recursive=True, callback=queue.put_nowait)
    reader = asyncio.create_task(drain(socket))
    reader.add_done_callback(lambda _: queue.put_nowait(None))
    try:
        await socket.send_text(_enc.encode(await ready()).decode())
        while True:
            event = await queue.get()
            if event is None:
                return
            message = change(event)
            if message is not None:
                await socket.send_text(_enc.encode(message).decode())
    except (WebSocketDisconnect, OSError):
        return
    finally:
        sub.close()
        reader.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reader
