"""The shell's client: registry REST calls and the watch WebSocket, failing over across addresses."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Callable
from typing import Any, TypeVar
from urllib.parse import quote, urlencode

import httpx
import msgspec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from app.cli.api import tls_hint
from app.services.registry.messages import Stat
from app.web.routes.audit_models import AuditEntry
from app.web.routes.registry_models import (
    ChildView,
    DeletedView,
    ElectionView,
    LockView,
    MultiView,
    NodeView,
    SessionView,
    StatView,
)

T = TypeVar("T")

API = "/api/v1"
CONNECTION_LOSS = "ConnectionLoss"  # ZooKeeper's name for "no server answered"


class ShellError(Exception):
    """A failed command: a ZooKeeper-style code (NoNode, BadVersion, ConnectionLoss, ...) and a message."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ChildrenView(msgspec.Struct, frozen=True):
    """GET children: names only."""

    path: str
    children: list[str]
    stat: Stat


class ChildrenStatView(msgspec.Struct, frozen=True):
    """GET children?stat=true: names with their stats."""

    path: str
    children: list[ChildView]
    stat: Stat


class WatchMessage(msgspec.Struct, frozen=True):
    """One message of the watch WebSocket: ready, an event, or an error."""

    type: str
    path: str = ""
    revision: int = 0
    version: int = 0
    error: str = ""
    message: str = ""


def registry_url(kind: str, path: str) -> str:
    """`/api/v1/registry/<kind><path>`, percent-encoded; the root is the bare collection."""
    return f"{API}/registry/{kind}" + ("" if path == "/" else quote(path, safe="/"))


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "no answer"
    return (str(exc) or type(exc).__name__) + tls_hint(exc)


# The server's codes for bodiless answers (a refused WebSocket handshake has no JSON body).
_STATUS_CODES = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 503: "unavailable"}


def _error_of(status: int, body: bytes, reason: str = "") -> ShellError:
    """The ShellError an HTTP error answer carries ({"error", "message"}), or one made from its status."""
    try:
        decoded = msgspec.json.decode(body)
        return ShellError(str(decoded["error"]), str(decoded.get("message", "")))
    except (msgspec.DecodeError, KeyError, TypeError, AttributeError):
        text = body.decode("utf-8", "replace").strip()[:200]
        return ShellError(_STATUS_CODES.get(status, f"http_{status}"), text or reason or f"HTTP {status}")


class RegistryClient:
    """REST and WebSocket calls on the first address that answers; the one that worked is kept."""

    def __init__(
        self,
        addrs: list[str],
        token: str | None = None,
        timeout: float = 30.0,
        connect_timeout: float = 3.0,
        tls: ssl.SSLContext | bool = True,
    ) -> None:
        """tls: the context for https:// and wss:// addresses (True: the system's CA store)."""
        if not addrs:
            raise ValueError("at least one address is needed")
        self.addrs = addrs
        self.current = 0
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.connect_timeout = connect_timeout
        self._ssl = tls if isinstance(tls, ssl.SSLContext) else None  # None: websockets' default for wss://
        self._http = httpx.AsyncClient(
            headers=self.headers, timeout=httpx.Timeout(timeout, connect=connect_timeout), verify=tls
        )

    @property
    def addr(self) -> str:
        """The address in use."""
        return self.addrs[self.current]

    async def aclose(self) -> None:
        """Close the connection pool."""
        await self._http.aclose()

    def _order(self) -> list[int]:
        n = len(self.addrs)
        return [(self.current + step) % n for step in range(n)]

    async def request(
        self,
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> bytes:
        """Send one request; move to the next address only when it cannot have been applied."""
        last: BaseException | None = None
        for idx in self._order():
            try:
                resp = await self._http.request(
                    method,
                    self.addrs[idx] + url,
                    json=body,
                    params=params,
                    timeout=httpx.USE_CLIENT_DEFAULT if timeout is None else timeout,
                )
            except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
                last = exc
                continue
            except httpx.TransportError as exc:
                # The request was sent: a write may have been applied, so only reads are repeated elsewhere.
                if method == "GET":
                    last = exc
                    continue
                raise ShellError(CONNECTION_LOSS, f"{self.addrs[idx]}: {_describe(exc)}") from None
            error = _error_of(resp.status_code, resp.content, resp.reason_phrase) if resp.status_code >= 400 else None
            if error is not None and error.code == "unavailable":
                # A replica that is starting or stopping refused before doing anything: try another.
                last = error
                continue
            self.current = idx
            if error is not None:
                raise error
            return resp.content
        raise ShellError(CONNECTION_LOSS, f"no address answers ({', '.join(self.addrs)}); last: {_describe(last)}")

    async def _call(
        self,
        typ: type[T],
        method: str,
        url: str,
        *,
        body: dict[str, Any] | None = None,
        params: dict[str, str] | None = None,
        timeout: float | None = None,
    ) -> T:
        raw = await self.request(method, url, body=body, params=params, timeout=timeout)
        try:
            return msgspec.json.decode(raw, type=typ)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise ShellError("MarshallingError", f"unexpected answer from {self.addr}: {exc}") from None

    # ---- registry -------------------------------------------------------------------------------

    async def get(self, path: str) -> NodeView:
        """A node's data and stat."""
        return await self._call(NodeView, "GET", registry_url("nodes", path))

    async def children(self, path: str) -> ChildrenView:
        """A node's children, sorted."""
        return await self._call(ChildrenView, "GET", registry_url("children", path))

    async def children_stat(self, path: str) -> ChildrenStatView:
        """A node's children with their stats."""
        return await self._call(ChildrenStatView, "GET", registry_url("children", path), params={"stat": "true"})

    async def stat(self, path: str) -> StatView:
        """A node's stat."""
        return await self._call(StatView, "GET", registry_url("stat", path))

    async def create(
        self,
        path: str,
        data: str,
        *,
        session_id: int = 0,
        sequential: bool = False,
        parents: bool = False,
    ) -> StatView:
        """Create a node (ephemeral when session_id is given); the answer has the created path."""
        body: dict[str, Any] = {"data": data, "sequential": sequential, "parents": parents}
        if session_id:
            body.update(ephemeral=True, session_id=session_id)
        if path.endswith("/") and path != "/":
            # A sequential node named by its counter alone (`create -s /parent/`): a URL's trailing
            # slash is not kept by routing, so the path goes in the body of a one-op transaction.
            multi = await self._call(
                MultiView, "POST", f"{API}/registry/multi", body={"ops": [{"op": "create", "path": path, **body}]}
            )
            (result,) = multi.results
            assert result.stat is not None
            return StatView(result.path, result.stat)
        return await self._call(StatView, "POST", registry_url("nodes", path), body=body)

    async def set(self, path: str, data: str, version: int = -1) -> StatView:
        """Replace a node's data when its version matches (-1: any)."""
        body = {"data": data, "version": version}
        return await self._call(StatView, "PUT", registry_url("nodes", path), body=body)

    async def delete(self, path: str, version: int = -1, recursive: bool = False) -> DeletedView:
        """Delete a node (and, recursively, its descendants)."""
        params = {"version": str(version), "recursive": "true" if recursive else "false"}
        return await self._call(DeletedView, "DELETE", registry_url("nodes", path), params=params)

    # ---- sessions -------------------------------------------------------------------------------

    async def open_session(self, timeout_ms: int) -> SessionView:
        """A new session; the server may clamp the timeout."""
        return await self._call(SessionView, "POST", f"{API}/sessions", body={"timeout_ms": timeout_ms})

    async def keepalive(self, session_id: int) -> SessionView:
        """Renew a session."""
        return await self._call(SessionView, "PUT", f"{API}/sessions/{session_id}/keepalive")

    async def close_session(self, session_id: int) -> DeletedView:
        """Close a session: its ephemeral nodes go at once."""
        return await self._call(DeletedView, "DELETE", f"{API}/sessions/{session_id}")

    async def sync(self) -> int:
        """A linearizable read point on the current server; returns its applied revision."""
        raw = await self.request("GET", f"{API}/registry")
        revision: int = msgspec.json.decode(raw)["revision"]
        return revision

    # ---- audit ----------------------------------------------------------------------------------

    async def audit(self, params: dict[str, str]) -> list[AuditEntry]:
        """Recorded decisions, newest first (params: trace_id, source, subject, since, limit)."""
        return await self._call(list[AuditEntry], "GET", f"{API}/audit", params=params)

    # ---- recipes --------------------------------------------------------------------------------

    async def lock(self, path: str, session_id: int, wait_ms: int, owner: str) -> LockView:
        """Take the lock at path for the session, waiting up to wait_ms."""
        body = {"path": path, "session_id": session_id, "wait_ms": wait_ms, "owner": owner}
        return await self._call(LockView, "POST", f"{API}/recipes/lock", body=body, timeout=wait_ms / 1000 + 10)

    async def unlock(self, node: str) -> DeletedView:
        """Release a lock by deleting its node."""
        return await self._call(DeletedView, "DELETE", f"{API}/recipes/lock", params={"node": node})

    async def elect(self, path: str, session_id: int, candidate: str, wait_ms: int) -> ElectionView:
        """Join the election at path as candidate, waiting up to wait_ms to lead."""
        body = {"path": path, "session_id": session_id, "candidate": candidate, "wait_ms": wait_ms}
        return await self._call(ElectionView, "POST", f"{API}/recipes/election", body=body, timeout=wait_ms / 1000 + 10)

    async def election(self, path: str) -> ElectionView:
        """Who leads the election at path."""
        return await self._call(ElectionView, "GET", f"{API}/recipes/election", params={"path": path})

    # ---- watch ----------------------------------------------------------------------------------

    async def _connect(self, url: str) -> ClientConnection:
        last: BaseException | None = None
        for idx in self._order():
            base = self.addrs[idx]
            ws_url = "ws" + base.removeprefix("http") + url  # http -> ws, https -> wss
            try:
                tls: dict[str, Any] = {"ssl": self._ssl} if self._ssl is not None and ws_url.startswith("wss:") else {}
                ws = await connect(ws_url, additional_headers=self.headers, open_timeout=self.connect_timeout, **tls)
            except InvalidStatus as exc:
                status = exc.response.status_code
                reason = f"the watch WebSocket was refused with HTTP {status}"
                if status in (401, 403):
                    reason += " (is the token missing or invalid?)"
                raise _error_of(status, bytes(exc.response.body or b""), reason) from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                last = exc
                continue
            self.current = idx
            return ws
        raise ShellError(CONNECTION_LOSS, f"no address answers ({', '.join(self.addrs)}); last: {_describe(last)}")

    async def watch(self, path: str, recursive: bool, on_message: Callable[[WatchMessage], None]) -> None:
        """Stream a persistent watch into on_message (the ready message first) until cancelled or closed."""
        query = urlencode({"path": path, "recursive": "true" if recursive else "false"})
        ws = await self._connect(f"{API}/watch?{query}")
        decoder = msgspec.json.Decoder(WatchMessage)
        try:
            while True:
                try:
                    raw = await ws.recv()
                except ConnectionClosed as exc:
                    raise ShellError(CONNECTION_LOSS, f"the watch on {self.addr} was closed ({exc})") from None
                try:
                    msg = decoder.decode(raw)
                except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                    raise ShellError("MarshallingError", f"unexpected watch message: {exc}") from None
                if msg.type == "error":
                    raise ShellError(msg.error or "SystemError", msg.message)
                on_message(msg)
        finally:
            with contextlib.suppress(Exception):
                await ws.close()


class Session:
    """The shell's session: opened on first use, renewed every timeout/3 in the background, closed on exit."""

    def __init__(self, client: RegistryClient, timeout_ms: int, warn: Callable[[str], None]) -> None:
        self.client = client
        self.requested_ms = timeout_ms
        self.warn = warn
        self.id = 0
        self.timeout_ms = 0
        self._task: asyncio.Task[None] | None = None

    async def ensure(self) -> int:
        """The session id, opening the session if there is none."""
        if not self.id:
            opened = await self.client.open_session(self.requested_ms)
            self.id, self.timeout_ms = opened.session_id, opened.timeout_ms
            self._task = asyncio.create_task(self._keep(opened.session_id, opened.timeout_ms / 3000))
        return self.id

    async def _keep(self, session_id: int, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.client.keepalive(session_id)
            except ShellError as exc:
                if exc.code == "SessionExpired":
                    self.warn(f"session 0x{session_id:x} expired: its ephemeral nodes are gone")
                    if self.id == session_id:
                        self.id = 0
                    return
                self.warn(f"keepalive of session 0x{session_id:x} failed: {exc.code}: {exc.message}")
            except Exception as exc:  # keep renewing: losing the session would delete the ephemeral nodes
                self.warn(f"keepalive of session 0x{session_id:x} failed: {type(exc).__name__}: {exc}")

    async def close(self) -> None:
        """Stop renewing and close the session, so its ephemeral nodes are deleted now."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        session_id, self.id = self.id, 0
        if session_id:
            try:
                await self.client.close_session(session_id)
            except ShellError as exc:
                if exc.code != "SessionExpired":
                    self.warn(f"closing session 0x{session_id:x} failed: {exc.code}: {exc.message}")
