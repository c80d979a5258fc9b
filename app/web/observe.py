"""The one outer ASGI layer: a server span and the request figures for every HTTP request."""

from __future__ import annotations

import hashlib
import math
import time

import msgspec
from litestar.enums import ScopeType
from litestar.types import HTTPResponseBodyEvent, HTTPResponseStartEvent, Message, Receive, Scope, Send
from opentelemetry import context, propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from app.telemetry import recording, tracer, unrecorded_span
from app.web.fastpath import FastPath
from app.web.metrics import HttpMetrics
from app.web.ratelimit import RateLimiter

_OPEN = frozenset({"/api/v1/health", "/api/v1/ready"})


def _client_key(scope: Scope) -> str:
    for name, value in scope["headers"]:
        if name == b"authorization":
            return "t:" + hashlib.blake2b(value, digest_size=8).hexdigest()
    client = scope.get("client")
    return "a:" + (client[0] if client else "?")


async def _too_many(send: Send, wait: float) -> None:
    body = msgspec.json.encode(
        {"error": "too_many_requests", "message": f"request rate limit exceeded; retry in {wait:.2f}s"}
    )
    start: HTTPResponseStartEvent = {
        "type": "http.response.start",
        "status": 429,
        "headers": [
            (b"content-type", b"application/json"),
            (b"retry-after", str(max(1, math.ceil(wait))).encode()),
            (b"content-length", str(len(body)).encode()),
        ],
    }
    await send(start)
    end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": body, "more_body": False}
    await send(end)


class Observe:
    """Wraps the app (outside routing, so 404s are seen too); the lean path is tried first."""

    def __init__(self, fast: FastPath, metrics: HttpMetrics, limiter: RateLimiter | None = None) -> None:
        self.fast = fast
        self.app = fast.app  # Litestar
        self.metrics = metrics
        self.figures = metrics.requests
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        # The header names the configured propagators read (traceparent, tracestate, baggage by default).
        self._fields = frozenset(f.lower().encode("latin-1") for f in propagate.get_global_textmap().fields)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.fast(scope, receive, send)  # the watch socket, else Litestar
            return
        method: str = scope["method"]
        if self.limiter is not None and scope["path"].startswith("/api/") and scope["path"] not in _OPEN:
            wait = self.limiter.check(_client_key(scope))
            if wait:
                self.metrics.throttled.inc()
                self.figures.record(method, "throttled", 429, 0.0)
                await _too_many(send, wait)
                return
        ctx = None
        fields = self._fields
        for name, _ in scope["headers"]:
            if name in fields:  # a caller's trace context to continue (most requests carry none)
                carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
                ctx = propagate.extract(carrier)
                break
        start = time.perf_counter()
        span: Span
        if ctx is None and not recording():
            span = unrecorded_span()  # nothing recorded: what start_span gives, at a fraction of its cost
        else:
            span = tracer().start_span(f"{method} {scope['path']}", context=ctx, kind=SpanKind.SERVER)
        token = context.attach(set_span_in_context(span, ctx))
        status = 500
        try:
            answered, receive = await self.fast.http(scope, receive, send)
            if answered:
                status = answered
            else:
                started: list[int] = []

                async def send_wrapper(message: Message) -> None:
                    if message["type"] == "http.response.start":
                        started.append(message["status"])
                    await send(message)

                try:
                    await self.app(scope, receive, send_wrapper)
                finally:
                    if started:
                        status = started[0]
        finally:
            context.detach(token)
            route = scope.get("path_template") or "unmatched"
            if span.is_recording():
                span.update_name(f"{method} {route}")
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", route)
                span.set_attribute("url.path", scope["path"])
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            self.figures.record(method, route, status, time.perf_counter() - start)
