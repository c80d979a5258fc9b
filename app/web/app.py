"""Build the Litestar application for one Node: routes, errors, tokens, OpenAPI, /metrics, tracing."""

from __future__ import annotations

from typing import Any

from litestar import Litestar, Request, Response, get
from litestar.datastructures import State
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin, SwaggerRenderPlugin

from app import __version__
from app.config import parse_tokens
from app.node import Node
from app.web.auth import TokenGuard
from app.web.errors import HANDLERS
from app.web.fastpath import FastPath
from app.web.metrics import HttpMetrics
from app.web.observe import Observe
from app.web.ratelimit import RateLimiter
from app.web.routes.audit import audit_routes
from app.web.routes.ha import ha_routes
from app.web.routes.kv import kv_routes
from app.web.routes.metrics import MAX_BODY_BYTES as POINTS_MAX_BODY_BYTES
from app.web.routes.metrics import metrics_routes
from app.web.routes.nodes import node_routes
from app.web.routes.registry import registry_routes
from app.web.routes.scheduler import scheduler_routes
from app.web.routes.system import SystemController
from app.web.routes.watch import WatchSocket

POINTS_PATH = "/api/v1/metrics/points"


def create_app(node: Node) -> Observe:
    """The RSGI application served by Granian: the lean path and Litestar, wrapped in the tracing/metrics layer."""
    metrics = HttpMetrics(node)

    @get("/metrics", opt={"public": True}, include_in_schema=False, sync_to_thread=False)
    def prometheus(request: Request[Any, Any, Any]) -> Response[bytes]:
        body, content_type = metrics.exposition(request.headers.get("accept"))
        # As a header, not media_type: Litestar would append a second charset to a text/ type.
        return Response(body, headers={"content-type": content_type})

    tokens = parse_tokens(node.cfg)
    guard = TokenGuard(tokens) if tokens else None
    guards: list[Any] = [guard] if guard else []
    litestar = Litestar(
        route_handlers=[
            SystemController,
            prometheus,
            *registry_routes(node),
            *node_routes(node),
            *metrics_routes(node),
            *ha_routes(node),
            *scheduler_routes(node),
            *kv_routes(node),
            *audit_routes(node),
        ],
        state=State({"node": node}),
        exception_handlers=HANDLERS,
        guards=guards,
        openapi_config=OpenAPIConfig(
            title="fleetmate",
            version=__version__,
            description="Control plane for fleets of databases.",
            path="/schema",
            render_plugins=[ScalarRenderPlugin(path="/"), SwaggerRenderPlugin(path="/swagger")],
        ),
        debug=False,
        request_max_body_size=node.cfg.http.max_body_bytes,  # Observe refuses longer bodies first
        logging_config=None,  # fleetmate's own structured logging handles every record
    )
    limiter = RateLimiter(node.cfg.registry.rate_limit_total, node.cfg.registry.rate_limit_per_client)
    metrics.limits.labels("total").set(node.cfg.registry.rate_limit_total)
    metrics.limits.labels("per_client").set(node.cfg.registry.rate_limit_per_client)
    return Observe(
        FastPath(litestar, node, guard, metrics.requests, WatchSocket(node, guard)),
        metrics,
        limiter,
        max_body=node.cfg.http.max_body_bytes,
        max_depth=node.cfg.http.max_json_depth,
        body_timeout=node.cfg.http.body_read_timeout,
        # The ingest route takes a batch of up to 200,000 points: its own limit, whatever the general
        # one; its decoder is typed (a nested value fails at its first bracket), so it is not scanned.
        body_limits={POINTS_PATH: POINTS_MAX_BODY_BYTES},
        typed_bodies={POINTS_PATH},
    )
