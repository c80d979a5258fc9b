"""The one outer layer, served by Granian over RSGI: a server span and the request figures for every
HTTP request, the lean path tried first, everything else bridged to Litestar as ASGI."""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Collection, Mapping

import msgspec
from granian._granian import RSGIHTTPProtocol as HTTPProtocol
from granian._granian import RSGIProtocolClosed as ProtocolClosed
from granian._granian import RSGIProtocolError as ProtocolError
from granian._granian import RSGIWebsocketProtocol as WebsocketProtocol
from granian.rsgi import Scope as RsgiScope
from opentelemetry import context, propagate
from opentelemetry.trace import Span, SpanKind, Status, StatusCode, set_span_in_context

from app.telemetry import recording, tracer, unrecorded_span
from app.web.fastpath import Body, FastPath
from app.web.limits import BodyClock, BodyReader, RequestRefused, check_json_depth, drain, error_body, too_large
from app.web.metrics import HttpMetrics
from app.web.ratelimit import RateLimiter
from app.web.rsgi import HttpReceive, HttpSend, asgi_scope, serve_websocket

_OPEN = frozenset({"/api/v1/health", "/api/v1/ready"})
_JSON = ("content-type", "application/json")
_CLOSE = ("connection", "close")
CLIENT_GONE = 499  # the figures' status for a request whose client left before it was answered (nginx's)


def _client_key(authorization: str | None, client: str) -> str:
    if authorization is not None:
        return "t:" + hashlib.blake2b(authorization.encode("latin-1"), digest_size=8).hexdigest()
    return "a:" + client.rpartition(":")[0].strip("[]")


def _declared(length: str) -> int | None:
    """A Content-Length's value (the server below checked its syntax); None if it is not one number."""
    try:
        return int(length)
    except ValueError:
        return None


def _too_many(proto: HTTPProtocol, wait: float) -> None:
    body = msgspec.json.encode(
        {"error": "too_many_requests", "message": f"request rate limit exceeded; retry in {wait:.2f}s"}
    )
    proto.response_bytes(429, [_JSON, ("retry-after", str(max(1, math.ceil(wait))))], body)


class Observe:
    """The RSGI application (outside routing, so 404s are seen too); the lean path is tried first."""

    def __init__(
        self,
        fast: FastPath,
        metrics: HttpMetrics,
        limiter: RateLimiter | None = None,
        *,
        max_body: int = 8 << 20,
        max_depth: int = 64,
        body_timeout: float = 30.0,
        body_limits: Mapping[str, int] | None = None,
        typed_bodies: Collection[str] = (),
    ) -> None:
        self.fast = fast
        self.app = fast.app  # Litestar
        self.metrics = metrics
        self.figures = metrics.requests
        self.limiter = limiter if limiter is not None and limiter.enabled else None
        self.max_body = max_body
        self.max_depth = max_depth
        self.body_clock = BodyClock(body_timeout)
        self.body_limits = dict(body_limits or {})  # paths whose bodies may be larger (metrics ingest)
        self.typed_bodies = frozenset(typed_bodies)  # paths whose bodies Litestar decodes typed: not scanned
        # The header names the configured propagators read (traceparent, tracestate, baggage by default).
        self._fields = tuple(f.lower() for f in propagate.get_global_textmap().fields)

    async def __rsgi__(self, scope: RsgiScope, proto: HTTPProtocol | WebsocketProtocol) -> None:
        if isinstance(proto, HTTPProtocol):
            await self._http(scope, proto)
        else:
            await serve_websocket(self.fast, scope, proto)  # the watch socket, else Litestar

    async def _http(self, scope: RsgiScope, proto: HTTPProtocol) -> None:
        method = scope.method
        # HEAD is GET without the body (RFC 9110 9.3.2): routed as GET, same status and headers;
        # the server (hyper, under Granian) sends no body on a HEAD request's response.
        route_method = "GET" if method == "HEAD" else method
        path = scope.path
        headers = scope.headers
        authorization: str | None = headers.get("authorization")
        if self.limiter is not None and path.startswith("/api/") and path not in _OPEN:
            wait = self.limiter.check(_client_key(authorization, scope.client))
            if wait:
                self.metrics.throttled.inc()
                self.figures.record(method, "throttled", 429, 0.0)
                _too_many(proto, wait)
                return
        ctx = None
        for field in self._fields:
            if field in headers:  # a caller's trace context to continue (most requests carry none)
                ctx = propagate.extract(dict(headers.items()))
                break
        start = time.perf_counter()
        span: Span
        if ctx is None and not recording():
            span = unrecorded_span()  # nothing recorded: what start_span gives, at a fraction of its cost
        else:
            span = tracer().start_span(f"{method} {path}", context=ctx, kind=SpanKind.SERVER)
        token = context.attach(set_span_in_context(span, ctx))
        status = 500
        route = "unmatched"
        try:
            limit = self.body_limits.get(path, self.max_body) if self.body_limits else self.max_body
            length = headers.get("content-length")
            declared = _declared(length) if length is not None else None
            if declared is not None and declared > limit:
                if headers.get("expect", "").lower() != "100-continue":  # else the client waits for the answer
                    await drain(proto)
                raise too_large(limit, declared)
            reader = BodyReader(proto, limit, declared is not None, self.body_clock)
            body = Body(reader)
            answer = await self.fast.lean(route_method, path, scope.query_string, authorization, body)
            if answer is not None:
                status, route = answer.status, answer.route
                out = [_JSON]
                if answer.headers:
                    out.extend(answer.headers.items())
                proto.response_bytes(status, out, answer.body)
            else:
                # Litestar decodes bodies to builtins before converting them, recursing once per
                # level: the nesting is bounded first, here or as its read of the body ends.
                if path in self.typed_bodies:
                    pass
                elif body.data is not None:
                    check_json_depth(body.data, self.max_depth)
                else:
                    reader.depth = self.max_depth
                inner = asgi_scope(scope, "http")
                inner["method"] = route_method
                send = HttpSend(proto)
                try:
                    await self.app(inner, HttpReceive(proto, body.data, reader), send)  # type: ignore[arg-type]
                finally:
                    status = send.status or 500
                    route = inner.get("path_template") or "unmatched"
        except RequestRefused as exc:
            status = exc.status
            # A refused body may not have been read to its end (the drain is bounded): the
            # connection cannot carry another request, so the client is told not to reuse it.
            out = [_JSON, _CLOSE] if status == 413 else [_JSON]
            proto.response_bytes(status, out, error_body(exc))
        except (ProtocolError, ProtocolClosed):
            status = CLIENT_GONE  # the client went away mid-request (e.g. before its body arrived)
        finally:
            context.detach(token)
            if span.is_recording():
                span.update_name(f"{method} {route}")
                span.set_attribute("http.request.method", method)
                span.set_attribute("http.route", route)
                span.set_attribute("url.path", path)
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
                span.end()
            self.figures.record(method, route, status, time.perf_counter() - start)
