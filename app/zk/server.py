"""The ZooKeeper listener: accepts connections on the client port and serves each one."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from collections.abc import Collection
from typing import TYPE_CHECKING

from app.services.registry.messages import Event
from app.zk.connection import CONNECT_TIMEOUT_S, ZkConnection
from app.zk.fourletter import FourLetterWords
from app.zk.protocol import EVENT_TYPES, notification

if TYPE_CHECKING:
    from app.node import Node
    from app.web.ratelimit import RateLimiter

log = logging.getLogger("fleetmate.zk")

REFUSAL_LOG_EVERY_S = 10.0  # one line per address this often, however many connections it opens
REAP_EVERY_S = 1.0  # how often connections whose session has ended are looked for
# Connections the kernel completes before they are accepted (asyncio's default is 100): under a
# flood of connections from one client, a short queue drops everyone's SYNs (each retried after 1 s+).
LISTEN_BACKLOG = 1024


class ZkServer:
    """One listener per process; with workers, every worker binds the same port (SO_REUSEPORT)."""

    def __init__(
        self, node: Node, host: str, port: int, *, reuse_port: bool = False, limiter: RateLimiter | None = None
    ) -> None:
        """limiter: the rate limit shared with the HTTP gateway (requests per client address)."""
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
        # Limits a client meets (docs/limits.md): connections per address, requests per second.
        self.max_client_cnxns = node.cfg.zk.max_client_cnxns
        self.per_address: dict[str, int] = {}  # open connections by client address
        self.refused = 0  # connections closed at once: their address held max_client_cnxns
        self._refusals: dict[str, tuple[float, int]] = {}  # address -> (last logged, refused since)
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.throttled = 0  # requests that waited for the rate limit
        self._reaper: asyncio.Task[None] | None = None

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
                backlog=LISTEN_BACKLOG,
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
        peer = writer.get_extra_info("peername")
        address = str(peer[0]) if peer else "?"
        held = self.per_address.get(address, 0)
        if self.max_client_cnxns and held >= self.max_client_cnxns:
            self._refuse(address, writer)
            return
        self.per_address[address] = held + 1
        if self._reaper is None:
            self._reaper = asyncio.get_running_loop().create_task(self._reap(), name="zk-reaper")
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
            left = self.per_address[address] - 1
            if left:
                self.per_address[address] = left
            else:
                del self.per_address[address]

    def _refuse(self, address: str, writer: asyncio.StreamWriter) -> None:
        """Close a connection over max_client_cnxns at once, as ZooKeeper does ("Too many
        connections from /IP - max is 60"), logging each address at most every few seconds."""
        writer.close()
        self.refused += 1
        now = time.monotonic()
        last, count = self._refusals.get(address, (0.0, 0))
        count += 1
        if now - last < REFUSAL_LOG_EVERY_S:
            self._refusals[address] = (last, count)
            return
        if len(self._refusals) >= 10_000:
            self._refusals.clear()  # forget old addresses rather than grow without bound
        self._refusals[address] = (now, 0)
        log.warning(
            "too many connections from one address; closed",
            extra={"address": address, "max_client_cnxns": self.max_client_cnxns, "refused": count},
        )

    async def _reap(self) -> None:
        """Close the connections whose session has ended (the leader expired it), as ZooKeeper
        does: a client that fell silent, or stopped halfway through a request, holds its
        connection no longer than its session timeout. A connection active in the last moments is
        left to find out itself (its next request is refused; a closeSession is being answered)."""
        while True:
            await asyncio.sleep(REAP_EVERY_S)
            registry = self.node.registry
            if registry is None:
                continue
            quiet_since = time.monotonic() - REAP_EVERY_S
            for conn in [c for c in self.connections if not registry.has_session(c.session_id)]:
                if conn._last_activity < quiet_since:
                    conn.writer.close()

    async def stop(self) -> None:
        """Stop accepting and close every connection (their sessions live on until they time out)."""
        if self._reaper is not None:
            self._reaper.cancel()
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

    def four_letter(self, word: bytes) -> bytes | None:
        """The answer to a four-letter word (ruok, srvr, ...); None when `word` is not one."""
        if word not in self.four_letter_words.known:
            return None
        return self.four_letter_words.answer(word.decode(), self)

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
