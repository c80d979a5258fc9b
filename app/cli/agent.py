"""`fleetmate agent`: run the per-host agent against a control plane's NATS until SIGTERM or Ctrl-C.

Imports stay lean on purpose (no web server, no databases): the agent runs on every database
host and its footprint is a target (<= 60 MB RSS, <= 1 % of a core at a 5 s heartbeat).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import ssl
import sys

from app import telemetry
from app.bus.connection import Bus, BusAuthError, BusError, CredentialError, client_token, tls_context
from app.config import Config
from app.services.agent.messages import Target
from app.services.agent.service import AgentService, parse_peer

log = logging.getLogger("fleetmate.agent")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_CONFIG = 2

# They would clash with the subjects fleetmate.agent.heartbeat.* / facts.*, or the route /api/v1/nodes/watch.
RESERVED_NODE_IDS = frozenset({"heartbeat", "facts", "watch"})
CONNECT_BACKOFF_S = (1.0, 30.0)  # first pause between start-up connection attempts, and the longest
RECONNECT_WAIT_S = (0.5, 10.0)  # the same once connected (nats-py reconnects, with these pauses)


class _Settings:
    """What the agent needs beyond Config, checked before anything starts."""

    def __init__(self, token: str | None, tls: ssl.SSLContext | None, peers: tuple[Target, ...]) -> None:
        self.token = token
        self.tls = tls
        self.peers = peers


def _config_error(key: str, problem: str) -> int:
    print(f"fleetmate: config error: {key}: {problem}", file=sys.stderr)
    return EXIT_CONFIG


def _settings(cfg: Config) -> _Settings | tuple[str, str]:
    """The token, TLS context and peers; or (key, problem) for the first bad setting."""
    if not cfg.nats.url:
        return (
            "nats.url",
            "required for `fleetmate agent`: the control plane's NATS, e.g. nats://cp.example:21520 "
            "(set FLEETMATE_NATS_URL or nats.url in the config file)",
        )
    if cfg.node_id in RESERVED_NODE_IDS:
        return "node_id", f"{cfg.node_id!r} is reserved on the agent's subjects; choose another"
    peers: list[Target] = []
    for i, text in enumerate(cfg.agent.peers):
        try:
            peers.append(parse_peer(text))
        except ValueError as exc:
            return f"agent.peers[{i}]", str(exc)
    try:
        token = client_token(cfg.nats.token, cfg.nats.token_file)
        tls = tls_context(cfg.nats.tls_ca, cfg.nats.tls_cert, cfg.nats.tls_key)
    except CredentialError as exc:
        return exc.key, exc.problem
    return _Settings(token, tls, tuple(peers))


async def _connect(bus: Bus, cfg: Config, stop: asyncio.Event) -> int | None:
    """Connect, retrying with backoff until it works (None), the token is refused (2) or a stop comes (0)."""
    pause, longest = CONNECT_BACKOFF_S
    attempt = 0
    while not stop.is_set():
        attempt += 1
        connecting = asyncio.ensure_future(bus.connect(cfg.nats.connect_timeout))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({connecting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        if not connecting.done():  # a stop signal while connecting
            connecting.cancel()
            await asyncio.wait({connecting})
            return EXIT_OK
        try:
            connecting.result()
            return None
        except BusAuthError:
            if bus.token:
                log.error("NATS refused the agent's token (nats.token / nats.token_file)", extra={"nats": bus.servers})
            else:
                log.error(
                    "NATS requires a token and the agent has none: set nats.token or nats.token_file "
                    "(the control plane keeps it in data_dir/nats.token)",
                    extra={"nats": bus.servers},
                )
            return EXIT_CONFIG
        except BusError as exc:
            log.warning(
                "cannot reach the control plane's NATS; retrying",
                extra={"attempt": attempt, "retry_in_s": pause, "error": str(exc)},
            )
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), pause)
        pause = min(longest, pause * 2)
    return EXIT_OK


async def agent(cfg: Config, settings: _Settings) -> int:
    """Connect, run the agent service until a stop signal, and shut down cleanly."""
    provider = telemetry.setup(cfg.telemetry, cfg.node_id)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    bus = Bus(
        cfg.nats.url,
        name=f"fleetmate-agent-{cfg.node_id}",
        token=settings.token,
        tls=settings.tls,
        reconnect_wait=RECONNECT_WAIT_S[0],
        reconnect_wait_max=RECONNECT_WAIT_S[1],
    )
    service: AgentService | None = None
    try:
        code = await _connect(bus, cfg, stop)
        if code is not None:
            return code
        service = AgentService(bus, cfg, settings.peers)
        await service.start()
        gc.freeze()  # start-up objects live as long as the process: keep them out of collections
        await stop.wait()
        log.info("stop requested; shutting down")
        return EXIT_OK
    except BusError as exc:
        log.error("agent failed", extra={"error": str(exc)})
        return EXIT_FAILED
    finally:
        if service is not None:
            await service.stop()
        await bus.close()
        provider.shutdown()


def run(cfg: Config) -> int:
    """Check the agent's settings (exit 2 naming the key), then run until stopped."""
    settings = _settings(cfg)
    if isinstance(settings, tuple):
        return _config_error(*settings)
    try:
        return asyncio.run(agent(cfg, settings))
    finally:
        sys.stderr.flush()
