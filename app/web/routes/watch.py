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
  (Granian's RSGI sends a plain close frame, without a code: the message says why). A missing
  or refused token refuses the handshake (403).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from typing import Any, Literal, cast
from urllib.parse import parse_qsl

import msgspec
from litestar.types import Receive, Scope, Send

from app.aio import Mailbox
from app.errors import FleetmateError
from app.node import Node
from app.services.registry import paths
from app.services.registry.errors import BadArguments
from app.services.registry.messages import Event, SessionId
from app.services.registry.view import OneShotKind
from app.supervise import supervisor
from app.web.auth import TokenGuard

WATCH_PATH = "/api/v1/watch"
_enc = msgspec.json.Encoder()
_CLIENT_GONE = object()
_KINDS = ("data", "exists", "children")
DRAIN_TIMEOUT_S = 5.0  # how long a closing watch waits for its started sends before the last frame


class ClientMessage(msgspec.Struct, frozen=True):
    """What a watcher may send: {"op": "keepalive", "session_id": N}."""

    op: Literal["keepalive"]
    session_id: SessionId


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


class _Pusher:
    """One persistent watcher's sending side, fed by the shared fan-out instead of a task of its own.

    A send starts when it is called (app.web.rsgi hands the frame to Granian at once) and returns
    an awaitable that completes once the frame is written; the fan-out calls send() and keeps the
    awaitables, oldest first, to tell a watcher that stopped reading (too many sends not written
    yet) from one that keeps up.
    """

    __slots__ = ("_buffer", "_limit", "_pending", "_send", "_wake", "failure")

    def __init__(self, send: Send, wake: asyncio.Future[None], limit: int) -> None:
        self._send = send
        self._limit = limit
        self._pending: deque[Any] = deque()
        self._buffer: list[Any] | None = []  # events before "ready" went out
        self.failure: tuple[str, str] | None = None
        self._wake = wake

    def push(self, message: Any) -> None:
        """Start sending one event now (called by the fan-out, in event order)."""
        if self.failure is not None or self._wake.done():
            return
        if self._buffer is not None:
            self._buffer.append(message)
            return
        pending = self._pending
        while pending and pending[0].done():
            pending.popleft()
        if len(pending) >= self._limit:
            self.fail("slow_consumer", f"watcher fell {self._limit} events behind; resume with since")
            return
        try:
            pending.append(self._send(message))
        except Exception as exc:  # the client went away: the reader sees the disconnect too
            self.fail("send_failed", str(exc))

    def go_live(self) -> None:
        """Send what arrived before "ready", then send events as they come."""
        buffered, self._buffer = self._buffer or [], None
        for message in buffered:
            self.push(message)

    def fail(self, code: str, message: str) -> None:
        if self.failure is None:
            self.failure = (code, message)
        self.stop()

    def stop(self) -> None:
        if not self._wake.done():
            self._wake.set_result(None)

    async def drain(self) -> None:
        """Wait for the sends already started (before a close frame goes out)."""
        for fut in self._pending:
            with contextlib.suppress(Exception):
                await fut
        self._pending.clear()


class _FanOut:
    """Hands each applied event to every matching watcher from one task, in order.

    The log applier only appends to a list (cheap, so writes do not wait for 10,000 sends);
    this task then starts the sends back to back, yielding to the loop every few hundred so
    requests keep being served. Per watcher, events keep their order: one queue, one consumer.
    """

    YIELD_EVERY = 512

    def __init__(self) -> None:
        self._queue: deque[tuple[_Pusher, Event]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None

    def callback(self, pusher: _Pusher) -> Callable[[Event], None]:
        """The watch-hub callback of one watcher."""
        queue = self._queue

        def on_event(event: Event) -> None:
            queue.append((pusher, event))
            wake = self._wake
            if wake is not None and not wake.done():
                wake.set_result(None)

        if self._task is None or self._task.done():
            self._task = supervisor.watch(
                asyncio.get_running_loop().create_task(self._run(), name="watch-fanout"), "the watch fan-out"
            )
        return on_event

    async def _run(self) -> None:
        queue = self._queue
        loop = asyncio.get_running_loop()
        while True:
            if not queue:
                self._wake = loop.create_future()
                await self._wake
                self._wake = None
            n = 0
            while queue:
                pusher, event = queue.popleft()
                pusher.push(_event_message(event))
                n += 1
                if n % self.YIELD_EVERY == 0:
                    await asyncio.sleep(0)


class WatchSocket:
    """Serves /api/v1/watch connections for one node."""

    def __init__(self, node: Node, guard: TokenGuard | None) -> None:
        self.node = node
        self.guard = guard
        self._fanout = _FanOut()

    def _allowed(self, scope: Scope) -> bool:
        if self.guard is None:
            return True
        for name, value in scope["headers"]:
            if name == b"authorization":
                return self.guard.scope_of_header(value.decode("latin-1")) is not None
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
        except FleetmateError as exc:
            await _fail(send, exc.code, exc.message)
            return
        if query.once:
            await self._once(query, receive, send)
            return
        wake: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        pusher = _Pusher(send, wake, self.node.cfg.registry.watch_max_pending)
        try:
            sub = registry.subscribe(query.path, query.recursive, query.since, self._fanout.callback(pusher))
        except FleetmateError as exc:
            await _fail(send, exc.code, exc.message)
            return
        reader = asyncio.create_task(self._read_client(receive, send))
        reader.add_done_callback(lambda _: pusher.stop())
        try:
            await send(_text({"type": "ready", "revision": registry.revision}))
            pusher.go_live()
            await wake
        except OSError:  # the client went away mid-send
            return
        finally:
            sub.close()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(pusher.drain(), DRAIN_TIMEOUT_S)
        if pusher.failure is not None and pusher.failure[0] != "send_failed":
            await _fail(send, *pusher.failure)

    async def _once(self, query: WatchQuery, receive: Receive, send: Send) -> None:
        """A one-shot watch: ready, at most one event, then a normal close."""
        registry = self.node.registry
        assert registry is not None
        queue: Mailbox[Any] = Mailbox()
        registry.watch_once(query.path, query.kind, queue.put_nowait)
        await send(_text({"type": "ready", "revision": registry.revision}))
        reader = asyncio.create_task(self._read_client(receive, send))
        reader.add_done_callback(lambda _: queue.put_nowait(_CLIENT_GONE))
        try:
            item = await queue.get()
            if item is _CLIENT_GONE:
                return
            await send(_event_message(item))
        except OSError:
            return
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
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
        await send({"type": "websocket.close", "code": 1000, "reason": ""})
