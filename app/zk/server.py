"""The ZooKeeper listener: accepts connections on the client port and serves each one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
from collections.abc import Collection
from typing import TYPE_CHECKING

from app.services.registry.messages import Event
from app.zk.connection import CONNECT_TIMEOUT_S, ZkConnection
from app.zk.fourletter import FourLetterWords
from app.zk.protocol import EVENT_TYPES, notification

if TYPE_CHECKING:
    from app.node import Node

log = logging.getLogger("fleetmate.zk")


class ZkServer:
    """One listener per process; with workers, every worker binds the same port (SO_REUSEPORT)."""

    def __init__(self, node: Node, host: str, port: int, *, reuse_port: bool = False) -> None:
        self.node = node
        self.host = host
        self.port = port
        self.reuse_port = reuse_port
        self.four_letter_words = FourLetterWords(node.cfg.zk.four_letter_words)
        # A packet may carry the largest znode data plus its path and headers (jute.maxbuffer).
        self.max_packet = node.cfg.registry.max_data_bytes + node.cfg.registry.max_path_bytes + 4096
        self.connections: set[ZkConnection] = set()
        self.received = 0
        self.sent = 0
        self._last_event: Event | None = None
        self._last_packet = b""
        self._lat_n = 0
        self._lat_sum = self._lat_min = self._lat_max = 0.0
        self._server: asyncio.Server | None = None
        self.secure_port = -1  # the TLS port once bound (ZooKeeper's secureClientPort; -1: none)
        self._secure: asyncio.Server | None = None
        self._handlers: set[asyncio.Task[None]] = set()

    @property
    def address(self) -> str:
        """host:port as bound."""
        return f"{self.host}:{self.port}"

    @property
    def secure_address(self) -> str:
        """host:port of the TLS listener as bound; "" when there is none."""
        return f"{self.host}:{self.secure_port}" if self._secure is not None else ""

    @property
    def client_port(self) -> int:
        """The plaintext port as `conf` reports it (ZooKeeper's clientPort; -1: none)."""
        return self.port if self._server is not None else -1

    async def start(self, avoid: Collection[int] = ()) -> None:
        """Bind and start accepting. With port 0, never take a port in `avoid`: the HTTP port is
        chosen before it is bound, so the kernel could otherwise hand the same number to us."""
        self._server, self.port = await self._bind(self.port, avoid, None)
        log.info("zookeeper listener ready", extra={"address": self.address})

    async def start_secure(self, port: int, context: ssl.SSLContext, avoid: Collection[int] = ()) -> None:
        """Bind the TLS listener (ZooKeeper's secureClientPort) on the same host; port 0 as in start()."""
        self._secure, self.secure_port = await self._bind(port, avoid, context)
        log.info("zookeeper TLS listener ready", extra={"address": self.secure_address})

    async def _bind(
        self, port: int, avoid: Collection[int], context: ssl.SSLContext | None
    ) -> tuple[asyncio.Server, int]:
        for _ in range(20):
            server = await asyncio.start_server(
                self._accept,
                self.host,
                port,
                reuse_port=self.reuse_port or None,
                limit=1 << 20,
                ssl=context,
                ssl_handshake_timeout=CONNECT_TIMEOUT_S if context else None,
            )
            chosen: int = server.sockets[0].getsockname()[1]
            if port or chosen not in avoid:
                break
            server.close()
            await server.wait_closed()
        return server, chosen

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = ZkConnection(self, reader, writer)
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            await conn.serve()
        finally:
            self.connections.discard(conn)
            if task is not None:
                self._handlers.discard(task)

    async def stop(self) -> None:
        """Stop accepting and close every connection (their sessions live on until they time out)."""
        for listener in (self._server, self._secure):
            if listener is not None:
                listener.close()
        for task in list(self._handlers):
            task.cancel()
        for task in list(self._handlers):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for listener in (self._server, self._secure):
            if listener is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(listener.wait_closed(), 2)

    def encoded(self, event: Event) -> bytes:
        """The notification packet for an event, encoded once for all the connections it goes to."""
        if event is not self._last_event:
            self._last_event = event
            self._last_packet = notification(event.revision, EVENT_TYPES[event.type], event.path)
        return self._last_packet

    def record(self, ms: float) -> None:
        """One request's time from dequeue to reply."""
        self._lat_n += 1
        self._lat_sum += ms
        self._lat_min = ms if self._lat_n == 1 else min(self._lat_min, ms)
        self._lat_max = max(self._lat_max, ms)

    def latency_text(self) -> str:
        """min/avg/max request latency in ms, as srvr prints it."""
        return f"{self._lat_min:.0f}/{self.latency_avg_ms():.1f}/{self._lat_max:.0f}"

    def latency_avg_ms(self) -> float:
        """Average request latency in ms."""
        return self._lat_sum / self._lat_n if self._lat_n else 0.0
