"""Granian embedded in fleetmate's event loop: bind, serve, stop."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
from pathlib import Path

from granian.constants import HTTPModes, Interfaces, SSLProtocols
from granian.http import HTTP1Settings
from granian.log import LogLevels
from granian.server.embed import Server

from app.web.observe import Observe


class PortInUse(OSError):
    """The HTTP port is taken by another process."""


def resolve_port(host: str, port: int) -> int:
    """Check the address can be bound; port 0 becomes a free port chosen now."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortInUse(f"{host}:{port} is already in use") from None
            raise
        chosen: int = sock.getsockname()[1]
        return chosen


class HttpServer:
    """Runs Granian (RSGI, see app.web.rsgi) as a task on the current loop."""

    def __init__(
        self,
        app: Observe,
        host: str,
        port: int,
        log_level: str = "info",
        tls: tuple[str, str, str] = ("", "", ""),
        *,
        header_read_timeout: float = 30.0,
        max_connections: int = 1024,
    ) -> None:
        """tls: certificate, key and client CA files (PEM, checked by app.config); a certificate
        turns on HTTPS, a client CA makes every client present a certificate it signed.
        header_read_timeout (seconds) and max_connections: http.header_read_timeout and
        http.max_connections (docs/limits.md)."""
        self.host = host
        self.port = port
        cert, key, client_ca = tls
        self.scheme = "https" if cert else "http"
        self._server = Server(
            app,
            address=host,
            port=port,
            interface=Interfaces.RSGI,
            log_enabled=True,
            # Granian's own lines at fleetmate's log_level (it sets its logger's level from this).
            log_level=LogLevels(log_level),
            # Granian applies a dictConfig; this one hands its records to fleetmate's root handler.
            log_dictconfig={
                "loggers": {
                    "_granian": {"handlers": [], "propagate": True},
                    "granian.access": {"handlers": [], "level": "WARNING", "propagate": True},
                }
            },
            log_access=False,
            backlog=1024,
            # Granian holds one permit per open connection ("backpressure"; by default the backlog,
            # 1024): past it nothing more is accepted, so this is the number of connections served.
            backpressure=max_connections,
            # A connection that has not sent a whole request header within this time is closed
            # (hyper's timer, from the moment it is accepted; it runs while a kept-alive connection
            # waits for its next request too).
            http1_settings=HTTP1Settings(header_read_timeout=max(1, round(header_read_timeout * 1000))),
            # HTTP/1.1 only. In Granian's default "auto" mode hyper first sniffs for the HTTP/2
            # preface with no timer running: a connection that sends nothing, or part of the
            # preface, was held until the client hung up, whatever the timeout (and an HTTP/2
            # connection has no header timeout at all). No fleetmate client speaks HTTP/2.
            http=HTTPModes.http1,
            ssl_cert=Path(cert).expanduser() if cert else None,
            ssl_key=Path(key).expanduser() if key else None,
            ssl_ca=Path(client_ca).expanduser() if client_ca else None,
            ssl_client_verify=bool(client_ca),
            # Granian's default minimum is TLS 1.3; 1.2 as on the ZooKeeper port (older JDKs, curl builds).
            ssl_protocol_min=SSLProtocols.tls12,
        )
        self._task: asyncio.Task[None] | None = None

    @property
    def url(self) -> str:
        """The base URL clients use: the bound address, or this host's name when bound to all interfaces."""
        host = socket.gethostname() if self.host in ("0.0.0.0", "::") else self.host
        host = f"[{host}]" if ":" in host else host
        return f"{self.scheme}://{host}:{self.port}"

    def start(self) -> asyncio.Task[None]:
        """Start serving; the returned task ends when the server stops."""
        self._task = asyncio.create_task(self._server.serve(), name="granian")
        return self._task

    async def stop(self, grace: float = 3.0) -> None:
        """Stop accepting, let in-flight requests finish (bounded), and end the task."""
        if self._task is None or self._task.done():
            return
        self._server.signal_handler_interrupt()  # type: ignore[no-untyped-call]
        try:
            await asyncio.wait_for(asyncio.shield(self._task), grace)
        except TimeoutError:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
