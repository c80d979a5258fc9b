"""Helpers the Litestar WebSocket routes share: an error frame and close, and draining what a client sends."""

from __future__ import annotations

import contextlib
from typing import Any

import msgspec
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect

_enc = msgspec.json.Encoder()


async def drain(socket: WebSocket[Any, Any, Any]) -> None:
    """Read (and ignore) what the client sends until it goes away."""
    with contextlib.suppress(WebSocketDisconnect, OSError):
        while True:
            await socket.receive_data("text")


async def fail(socket: WebSocket[Any, Any, Any], code: str, message: str) -> None:
    """Send {"type": "error", "error": code, "message": ...} and close with 4000."""
    with contextlib.suppress(Exception):
        await socket.send_text(_enc.encode({"type": "error", "error": code, "message": message}).decode())
        await socket.close(code=4000)
