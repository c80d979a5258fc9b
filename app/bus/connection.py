"""The NATS connection: connect with endless reconnect, JetStream handle, health, figures, close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import nats
from nats.aio.client import Client, Server
from nats.js import JetStreamContext

log = logging.getLogger("fleetmate.bus")

# What nats-server says (in -ERR) to a client whose token, user or password it does not accept.
_AUTH_REFUSED = "authorization violation"


class BusError(RuntimeError):
    """The bus could not be reached or used."""


class BusAuthError(BusError):
    """The NATS server refused this client's credentials (token); retrying will not help."""


class CredentialError(BusError):
    """A NATS client credential (token file, TLS file) that cannot be used; `key` names the setting."""

    def __init__(self, key: str, problem: str) -> None:
        super().__init__(f"{key}: {problem}")
        self.key = key
        self.problem = problem


def read_token_file(path: str, key: str = "nats.token_file") -> str:
    """The token in the first line of a file; CredentialError naming `key` if unreadable or empty."""
    try:
        lines = Path(path).expanduser().read_text().splitlines()
    except OSError as exc:
        raise CredentialError(key, f"cannot read {path}: {exc.strerror or exc}") from None
    token = lines[0].strip() if lines else ""
    if not token:
        raise CredentialError(key, f"{path} holds no token (its first line is empty)")
    return token


def client_token(token: str, token_file: str) -> str | None:
    """The token a client presents: `token` if set, else the first line of `token_file`, else None."""
    if token:
        return token
    if token_file:
        return read_token_file(token_file)
    return None


def tls_context(ca: str, cert: str, key: str) -> ssl.SSLContext | None:
    """A client TLS context trusting `ca` (else the system store) with an optional client certificate.

    None when no TLS file is configured (a tls:// URL still gets nats-py's default context).
    """
    if not ca and not cert:
        return None
    try:
        ctx = ssl.create_default_context(cafile=str(Path(ca).expanduser()) if ca else None)
    except (OSError, ssl.SSLError) as exc:
        raise CredentialError("nats.tls_ca", f"cannot load {ca}: {exc}") from None
    if cert:
        try:
            ctx.load_cert_chain(str(Path(cert).expanduser()), str(Path(key).expanduser()) if key else None)
        except (OSError, ssl.SSLError) as exc:
            raise CredentialError("nats.tls_cert", f"cannot load {cert} with key {key}: {exc}") from None
    return ctx


class Bus:
    """One NATS connection per process, shared by every service.

    token and tls are presented on every (re)connect. reconnect_wait is the pause between
    attempts; with reconnect_wait_max set, the pause doubles per failed attempt up to that
    (with jitter), for clients such as agents that may wait a long time for a server.
    """

    def __init__(
        self,
        servers: Sequence[str],
        name: str,
        *,
        token: str | None = None,
        tls: ssl.SSLContext | None = None,
        reconnect_wait: float = 0.25,
        reconnect_wait_max: float | None = None,
    ) -> None:
        self.servers = list(servers)
        self.name = name
        self.token = token or None
        self.tls = tls
        self.reconnect_wait = reconnect_wait
        self.reconnect_wait_max = reconnect_wait_max
        self._nc: Client | None = None
        self._js: JetStreamContext | None = None
        self.reconnects = 0
        self.disconnects = 0
        self.last_error = ""
        self._refused: asyncio.Event | None = None
        self._closing = False

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
        """Connect, retrying until `timeout` seconds pass; then reconnect forever in the background.

        Raises BusAuthError at once when the server refuses the credentials, BusError when
        no server answered in time.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last: Exception | None = None
        self._refused = asyncio.Event()
        while loop.time() < deadline and not self._refused.is_set():
            # Our own Client object, so that an attempt cut short is closed rather than leaked.
            nc = Client()
            attempt = asyncio.ensure_future(self._connect_once(nc, deadline - loop.time()))
            refused = asyncio.ensure_future(self._refused.wait())
            try:
                # nats-py retries the initial connect by itself when reconnect is allowed: bound it.
                await asyncio.wait(
                    {attempt, refused}, timeout=deadline - loop.time(), return_when=asyncio.FIRST_COMPLETED
                )
                if attempt.done():
                    attempt.result()  # raises what the attempt raised
                    self._nc = nc
                    break
            except Exception as exc:  # nats raises several unrelated types for "cannot connect"
                last = exc
                await asyncio.sleep(0.2)
            finally:
                refused.cancel()
                if not attempt.done():
                    attempt.cancel()
                    await asyncio.wait({attempt})
                if self._nc is not nc:
                    with contextlib.suppress(Exception):
                        await nc.close()
        if self._refused.is_set():
            raise BusAuthError(f"NATS at {', '.join(self.servers)} refused the credentials: {self.last_error}")
        if self._nc is None:
            reason = self.last_error or ((str(last) or type(last).__name__) if last else "timed out")
            raise BusError(f"cannot connect to NATS at {', '.join(self.servers)}: {reason}")
        self._js = self._nc.jetstream()
        log.info("bus connected", extra={"url": self.connected_url})

    def _backoff(self, servers: list[Server], _info: dict[str, Any]) -> tuple[Server | None, float]:
        """Reconnect pause that doubles with each failed attempt on the same server, up to the maximum."""
        tries = min((s.reconnects for s in servers), default=0)
        cap = self.reconnect_wait_max or self.reconnect_wait
        pause = min(cap, self.reconnect_wait * 2 ** min(tries, 16))
        return None, pause * random.uniform(0.8, 1.0)  # jitter: a fleet of agents does not return in step

    async def _connect_once(self, nc: Client, remaining: float) -> None:
        async def on_error(exc: Exception) -> None:
            text = str(exc) or type(exc).__name__
            self.last_error = text
            if _AUTH_REFUSED in text.lower() or isinstance(exc, nats.errors.AuthorizationError):
                self.last_error = "Authorization Violation"
                if self._refused is not None:
                    self._refused.set()
            # While connect() runs it reports the last error itself; one line per retry is noise.
            log.log(logging.DEBUG if self._nc is None else logging.WARNING, "nats error", extra={"error": text})

        async def on_disconnect() -> None:
            self.disconnects += 1
            if not self._closing:
                log.warning("nats disconnected")

        async def on_reconnect() -> None:
            self.reconnects += 1
            log.info("nats reconnected", extra={"url": self.connected_url})

        # nats-py annotates these two as int; it takes seconds as floats (nats.connect passes them on untyped).
        waits: dict[str, Any] = {
            "connect_timeout": max(0.5, min(2.0, remaining)),
            "reconnect_time_wait": self.reconnect_wait,
        }
        await nc.connect(
            servers=self.servers,
            name=self.name,
            allow_reconnect=True,
            max_reconnect_attempts=-1,
            **waits,
            reconnect_to_server_handler=self._backoff if self.reconnect_wait_max else None,
            ping_interval=5,
            max_outstanding_pings=3,
            error_cb=on_error,
            disconnected_cb=on_disconnect,
            reconnected_cb=on_reconnect,
            token=self.token,
            tls=self.tls,
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
        self._closing = True
        try:
            await asyncio.wait_for(nc.drain(), 3.0)
        except Exception:
            await nc.close()
