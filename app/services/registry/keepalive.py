"""Session keepalives over the bus: a replica asks the registry leader, the leader answers.

Keepalives are not log commands (ARCHITECTURE: sessions follow ZooKeeper and etcd leases): they
refresh the leader's SessionKeeper, reached over core NATS from any replica.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from nats.aio.client import Client as NatsClient
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from app.bus import codec, subjects
from app.bus.micro import HandlerError, call
from app.services.registry.errors import OperationTimeout, SessionExpired
from app.services.registry.messages import KeepaliveReply, KeepaliveRequest
from app.services.registry.sessions import SessionKeeper


async def ask_leader(nc: NatsClient, session_id: int, last_active: float) -> int:
    """Refresh a session at the leader for activity at `last_active` (time.monotonic()); returns
    its timeout. Raises SessionExpired, or OperationTimeout when no leader answers."""
    # A few short tries: a leader that was just paused or replaced may still hold the
    # subscription for a moment, and the next try reaches the one that answers.
    for attempt in range(4):
        idle_ms = min(2**31 - 1, max(0, int((time.monotonic() - last_active) * 1000)))
        payload = codec.encode(KeepaliveRequest(session_id, idle_ms))
        try:
            reply = await call(nc, subjects.REGISTRY_KEEPALIVE, payload, timeout=0.5)
            return codec.decode(reply, KeepaliveReply).timeout_ms
        except HandlerError as exc:
            if exc.code == "404":
                raise SessionExpired(exc.description) from None
            raise OperationTimeout(f"keepalive failed: {exc.description}") from None
        except (TimeoutError, NoRespondersError, NatsTimeout):
            await asyncio.sleep(0.1 * attempt)
    raise OperationTimeout("no registry leader answered the keepalive")


def answer(keeper: SessionKeeper, data: bytes) -> bytes:
    """The leader's reply to a KeepaliveRequest; HandlerError 400 (bad request) or 404 (no session)."""
    try:
        req = codec.decode(data, KeepaliveRequest)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise HandlerError("400", f"bad KeepaliveRequest: {exc}") from None
    timeout = keeper.touch(req.session_id, req.idle_ms / 1000)
    if timeout is None:
        raise HandlerError("404", f"session 0x{req.session_id:x} does not exist")
    return codec.encode(KeepaliveReply(req.session_id, timeout))
