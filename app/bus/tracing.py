"""Trace context across the bus: publish/request inject it into NATS headers, handlers extract it."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from nats.aio.client import Client
from nats.aio.msg import Msg
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from app.telemetry import tracer


def _headers(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    headers = dict(extra or {})
    propagate.inject(headers)
    return headers


async def publish(nc: Client, subject: str, payload: bytes, headers: Mapping[str, str] | None = None) -> None:
    """Publish with the current trace context, inside a producer span."""
    with tracer().start_as_current_span(
        f"publish {subject}", kind=SpanKind.PRODUCER, attributes={"messaging.destination.name": subject}
    ):
        await nc.publish(subject, payload, headers=_headers(headers))


async def request(
    nc: Client, subject: str, payload: bytes, timeout: float = 2.0, headers: Mapping[str, str] | None = None
) -> Msg:
    """Request/reply with the current trace context, inside a client span."""
    with tracer().start_as_current_span(
        f"request {subject}", kind=SpanKind.CLIENT, attributes={"messaging.destination.name": subject}
    ) as span:
        try:
            return await nc.request(subject, payload, timeout=timeout, headers=_headers(headers))
        except Exception as exc:
            span.set_status(Status(StatusCode.ERROR, type(exc).__name__))
            raise


@contextmanager
def handler_span(name: str, subject: str, headers: Mapping[str, str] | None) -> Iterator[trace.Span]:
    """Run a bus handler in a server span whose parent comes from the message headers."""
    ctx = propagate.extract(dict(headers or {}))
    with tracer().start_as_current_span(
        name, context=ctx, kind=SpanKind.SERVER, attributes={"messaging.destination.name": subject}
    ) as span:
        yield span
