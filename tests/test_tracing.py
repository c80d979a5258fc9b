"""One trace crosses the gateway, the bus and the handler (in-memory exporter, real nats-server)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from app import config
from app.node import Node
from app.web.app import create_app
from app.web.server import HttpServer, resolve_port
from tests.harness import NatsServer

EXPORTER = InMemorySpanExporter()
_provider = TracerProvider()
_provider.add_span_processor(SimpleSpanProcessor(EXPORTER))
trace.set_tracer_provider(_provider)


@pytest.fixture
async def node(tmp_path: Path, nats_server: NatsServer) -> AsyncIterator[Node]:
    """A started replica on a real nats-server."""
    cfg = config.load(
        None, {"FLEETMATE_DATA_DIR": str(tmp_path), "FLEETMATE_NATS_URL": nats_server.url, "FLEETMATE_NODE_ID": "tr"}
    )
    started = Node(cfg)
    await started.start()
    try:
        yield started
    finally:
        await started.stop()


@pytest.fixture
async def client(node: Node) -> AsyncIterator[httpx.AsyncClient]:
    """The replica's gateway served by Granian in this process (the spans land in this exporter)."""
    server = HttpServer(create_app(node), "127.0.0.1", resolve_port("127.0.0.1", 0))
    server.start()
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=10, trust_env=False) as http:
            for _ in range(100):  # Granian binds in its own task
                try:
                    await http.get("/api/v1/health")
                    break
                except httpx.TransportError:
                    await asyncio.sleep(0.05)
            yield http
    finally:
        await server.stop()


async def test_trace_spans_gateway_bus_and_handler(client: httpx.AsyncClient) -> None:
    EXPORTER.clear()
    r = await client.get("/api/v1/cluster/replicas/tr", headers={"traceparent": _PARENT})
    assert r.status_code == 200
    assert r.json()["node_id"] == "tr"

    spans = {s.name: s for s in EXPORTER.get_finished_spans()}
    http = spans["GET /api/v1/cluster/replicas/{node_id}"]
    bus = spans["request fleetmate.system.tr.info"]
    handler = spans["handle info"]
    assert http.kind == SpanKind.SERVER
    assert bus.kind == SpanKind.CLIENT
    assert handler.kind == SpanKind.SERVER
    # One trace id, continuing the caller's traceparent.
    assert {http.context.trace_id, bus.context.trace_id, handler.context.trace_id} == {int(_TRACE, 16)}
    # Parent links: caller -> gateway -> bus request -> handler.
    assert http.parent is not None
    assert http.parent.span_id == int(_CALLER_SPAN, 16)
    assert bus.parent is not None
    assert bus.parent.span_id == http.context.span_id
    assert handler.parent is not None
    assert handler.parent.span_id == bus.context.span_id
    assert http.attributes is not None
    assert http.attributes["http.response.status_code"] == 200


async def test_trace_without_incoming_context_starts_a_root(client: httpx.AsyncClient) -> None:
    EXPORTER.clear()
    assert (await client.get("/api/v1/cluster/replicas/tr")).status_code == 200
    missing = await client.get("/api/v1/cluster/replicas/ghost")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "message": "replica 'ghost' did not answer"}
    spans = EXPORTER.get_finished_spans()
    roots = [s for s in spans if s.parent is None]
    assert sorted(s.name for s in roots) == ["GET /api/v1/cluster/replicas/{node_id}"] * 2
    assert len({s.context.trace_id for s in spans}) == 2


_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
_CALLER_SPAN = "00f067aa0ba902b7"
_PARENT = f"00-{_TRACE}-{_CALLER_SPAN}-01"
