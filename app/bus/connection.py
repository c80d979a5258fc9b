"""The NATS connection: connect with endless reconnect, JetStream handle, health, figures, close."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext

log = logging.getLogger("fleetmate.bus")


class BusError(RuntimeError):
    """The bus could not be reached or used."""


class Bus:
    """One NATS connection per process, shared by every service."""

    def __init__(self, servers: Sequence[str], name: str) -> None:
        self.servers = list(servers)
        self.name = name
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.reconnects = 0
        self.disconnects = 0

    @property
    def nc(self) -> Client:
        """The core NATS client."""
        if self._nc is None:
            raise BusError("bus is not connected")
        return self._nc

    @property
    def js(self) -> JetStreamContext:
        """The JetStream context."""
        if self._js is None:
            raise BusError("bus is not connected")
        return self._js

    @property
    def connected(self) -> bool:
        """True while the client holds a live connection."""
        return self._nc is not None and self._nc.is_connected

    @property
    def connected_url(self) -> str:
        """The server URL currently connected to, or ''."""
        nc = self._nc
        if nc is None or nc.connected_url is None:
            return ""
        url = nc.connected_url
        return f"{url.scheme}://{url.hostname}:{url.port}"

    async def connect(self, timeout: float) -> None:
        """Connect, retrying until `timeout` seconds pass; then reconnect forever in the background."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        while loop.time() < deadline:
            try:
                # nats-py retries the initial connect by itself when reconnect is allowed: bound it.
                self._nc = await asyncio.wait_for(self._connect_once(deadline - loop.time()), deadline - loop.time())
                break
            except Exception as exc:  # nats raises several unrelated types for "cannot connect"
                last = exc
                await asyncio.sleep(0.2)
        if self._nc is None:
            reason = (str(last) or type(last).__name__) if last else "timed out"
            raise BusError(f"cannot connect to NATS at {', '.join(self.servers)}: {reason}")
        self._js = self._nc.jetstream()
        log.info("bus connected", extra={"url": self.connected_url})

    async def _connect_once(self, remaining: float) -> Client:
        async def on_error(exc: Exception) -> None:
            log.warning("nats error", extra={"error": str(exc) or type(exc).__name__})

        async def on_disconnect() -> None:
            self.disconnects += 1
            log.warning("nats disconnected")

        async def on_reconnect() -> None:
            self.reconnects += 1
            log.info("nats reconnected", extra={"url": self.connected_url})

        return await nats.connect(
            servers=self.servers,
            name=self.name,
            connect_timeout=max(0.5, min(2.0, remaining)),
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.25,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
        )

    @property
    def server_name(self) -> str:
        """The name of the NATS server this connection is on ("" before connecting)."""
        nc = self._nc
        return str(nc._server_info.get("server_name", "")) if nc is not None else ""

    def cluster_size(self) -> int:
        """How many servers the connected NATS cluster advertises (1 for a lone server)."""
        nc = self._nc
        urls = nc._server_info.get("connect_urls") if nc is not None else None
        return max(1, len(urls or ()))

    async def jetstream_ok(self, timeout: float = 2.0) -> str | None:
        """None when JetStream answers; otherwise the reason it does not."""
        if not self.connected:
            return "not connected to NATS"
        try:
            await asyncio.wait_for(self.js.account_info(), timeout)
        except TimeoutError:
            return "JetStream did not answer"
        except Exception as exc:
            return f"JetStream unavailable: {exc}"
        return None

    def stats(self) -> dict[str, Any]:
        """Client counters for /metrics."""
        if self._nc is None:
            return {}
        return dict(self._nc.stats)

    async def close(self) -> None:
        """Drain subscriptions and close the connection."""
        nc, self._nc, self._js = self._nc, None, None
        if nc is None or nc.is_closed:
            return
        try:
            await asyncio.wait_for(nc.drain(), 3.0)
        except Exception:
            await nc.close()
