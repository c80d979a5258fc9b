"""The one outer ASGI layer: a server span and the request figures for every HTTP request."""

from __future__ import annotations

import time

from litestar.enums import ScopeType
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from opentelemetry import context, propagate
from opentelemetry.trace import SpanKind, Status, StatusCode, set_span_in_context

from app.telemetry import tracer
from app.web.metrics import HttpMetrics


class Observe:
    """Wraps the Litestar app (outside routing, so 404s are seen too)."""

    def __init__(self, app: ASGIApp, metrics: HttpMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        method: str = scope["method"]
        carrier = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        ctx = propagate.extract(carrier)
        status = 500
        start = time.perf_counter()

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        span = tracer().start_span(f"{method} {scope['path']}", context=ctx, kind=SpanKind.SERVER)
        token = context.attach(set_span_in_context(span, ctx))
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            context.detach(token)
            route = scope.get("path_template") or "unmatched"
            span.update_name(f"{method} {route}")
            span.set_attribute("http.request.method", method)
            span.set_attribute("http.route", route)
            span.set_attribute("url.path", scope["path"])
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
            span.end()
            elapsed = time.perf_counter() - start
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(elapsed)
