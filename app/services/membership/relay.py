"""Requests relayed to a node's agent over NATS request/reply, with the agent's errors mapped to API errors."""

from __future__ import annotations

from typing import Any

import msgspec
from nats.aio.client import Client
from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeout

from app.bus import subjects
from app.bus.micro import HandlerError, call
from app.errors import Unavailable
from app.services.membership.errors import AgentFailed, AgentTimeout, BadNodeRequest, NoSuchNode
from app.services.membership.messages import AgentRequest

RELAY_TIMEOUT_S = 5.0  # how long a request relayed to an agent (or a facts request) waits
_enc = msgspec.json.Encoder()


async def ask_agent(nc: Client, node_id: str, request: AgentRequest, body: Any, timeout: float) -> Any:
    """Send `body` (JSON; {} when None) to fleetmate.agent.<node_id>.<request>; the decoded answer."""
    subject = subjects.agent_request(node_id, request)
    payload = _enc.encode(body) if body is not None else b"{}"
    try:
        reply = await call(nc, subject, payload, timeout)
    except NoRespondersError:
        raise AgentTimeout(f"the agent of {node_id!r} is not listening on {subject} (is it running?)") from None
    except (NatsTimeout, TimeoutError):
        raise AgentTimeout(f"the agent of {node_id!r} did not answer {request} within {timeout:g}s") from None
    except HandlerError as exc:
        if exc.code == "404":
            raise NoSuchNode(f"the agent of {node_id!r}: {exc.description}") from None
        if exc.code.startswith("4"):
            raise BadNodeRequest(f"the agent of {node_id!r} refused {request}: {exc.description}") from None
        if exc.code == "503":
            raise Unavailable(f"the agent of {node_id!r} is not ready: {exc.description}") from None
        raise AgentFailed(f"the agent of {node_id!r} failed {request}: {exc.description}") from None
    try:
        return msgspec.json.decode(reply) if reply else None
    except msgspec.DecodeError:
        raise AgentFailed(f"the agent of {node_id!r} answered {request} with something that is not JSON") from None
