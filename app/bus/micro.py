"""The only module that touches nats.micro: services announce themselves for $SRV.PING/INFO/STATS."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service, ServiceError  # type: ignore[attr-defined]
from opentelemetry.trace import Status, StatusCode

from app.bus import tracing
from app.bus.tracing import handler_span

log = logging.getLogger("fleetmate.bus")

Handler = Callable[[bytes], Awaitable[bytes]]
_ERROR_HEADER = "Nats-Service-Error"
_ERROR_CODE_HEADER = "Nats-Service-Error-Code"


class HandlerError(Exception):
    """A typed error a handler returns to its caller (code and description go in the reply headers)."""

    def __init__(self, code: str, description: str) -> None:
        super().__init__(description)
        self.code = code
        self.description = description


@dataclass(frozen=True)
class Endpoint:
    """One request/reply endpoint: a name, its subject and an async bytes -> bytes handler."""

    name: str
    subject: str
    handler: Handler
    queue_group: str | None = None


def _wrap(ep: Endpoint) -> Callable[[Request], Awaitable[None]]:
    async def run(req: Request) -> None:
        with handler_span(f"handle {ep.name}", req.subject, req.headers) as span:
            try:
                reply = await ep.handler(req.data)
            except HandlerError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.code))
                raise ServiceError(exc.code, exc.description) from exc
            except Exception as exc:
                span.record_exception(exc)
                span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
                log.exception("bus handler failed", extra={"endpoint": ep.name})
                raise ServiceError("500", "internal error") from exc
            await req.respond(reply)

    return run


async def serve_every_subscriber(nc: Client, name: str, subject: str, handler: Handler) -> Subscription:
    """A request/reply endpoint *without* a queue group: every subscriber gets each request and
    the caller takes the first reply. For leader-only endpoints: a paused ex-leader still
    subscribed cannot swallow requests that the new leader answers. Replies use the same
    error headers as nats.micro, so `call()` reads both."""

    async def run(msg: Msg) -> None:
        with handler_span(f"handle {name}", msg.subject, msg.headers) as span:
            headers: dict[str, str] | None = None
            try:
                reply = await handler(msg.data)
            except HandlerError as exc:
                span.set_status(Status(StatusCode.ERROR, exc.code))
                reply, headers = b"", {_ERROR_HEADER: exc.description, _ERROR_CODE_HEADER: exc.code}
            except Exception as exc:
                span.record_exception(exc)
                log.exception("bus handler failed", extra={"endpoint": name})
                reply, headers = b"", {_ERROR_HEADER: "internal error", _ERROR_CODE_HEADER: "500"}
            if msg.reply:
                await nc.publish(msg.reply, reply, headers=headers)

    sub: Subscription = await nc.subscribe(subject, cb=run)
    return sub


async def start_service(
    nc: Client,
    *,
    name: str,
    version: str,
    description: str,
    endpoints: list[Endpoint],
    metadata: dict[str, str],
) -> Service:
    """Register a nats.micro service with its endpoints, each handler run in a traced span."""
    service = await add_service(nc, name=name, version=version, description=description, metadata=metadata)
    for ep in endpoints:
        await service.add_endpoint(name=ep.name, subject=ep.subject, handler=_wrap(ep), queue_group=ep.queue_group)
    return service


async def call(nc: Client, subject: str, payload: bytes, timeout: float = 2.0) -> bytes:
    """Request a service endpoint; a typed error reply is raised as HandlerError."""
    msg = await tracing.request(nc, subject, payload, timeout)
    headers = msg.headers or {}
    if _ERROR_HEADER in headers:
        raise HandlerError(headers.get(_ERROR_CODE_HEADER, "500"), headers[_ERROR_HEADER])
    return bytes(msg.data)


async def ping(nc: Client, name: str, wait: float = 1.0) -> list[dict[str, object]]:
    """Every running instance of service `name` ($SRV.PING.<name>): the replies gathered within `wait` seconds."""
    inbox = nc.new_inbox()
    replies: list[dict[str, object]] = []

    async def heard(msg: Msg) -> None:
        with contextlib.suppress(ValueError):
            body = json.loads(msg.data)
            if isinstance(body, dict):
                replies.append(body)

    sub = await nc.subscribe(inbox, cb=heard)
    try:
        await nc.publish(f"$SRV.PING.{name}", b"", reply=inbox)
        await nc.flush()
        await asyncio.sleep(wait)
    finally:
        await sub.unsubscribe()
    return replies
