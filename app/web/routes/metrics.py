"""REST routes of the metrics service (/api/v1/metrics): ingest points, query them downsampled, list series."""

from __future__ import annotations

from collections.abc import Generator
from typing import Annotated, Any

import msgspec
from litestar import get, post
from litestar.dto import AbstractDTO
from litestar.handlers import HTTPRouteHandler
from litestar.openapi.spec import Example
from litestar.params import Body, QueryParameter
from litestar.status_codes import HTTP_200_OK

from app.node import Node
from app.services.metrics.errors import MetricsUnavailable
from app.services.metrics.messages import (
    IngestReply,
    MetricsStats,
    PointBatch,
    PointsBody,
    QueryReply,
    SeriesList,
    decode_points_json,
)
from app.services.metrics.service import MetricsService

WAIT_S = 10.0
MAX_BODY_BYTES = 32 << 20  # room for the 200,000 points a request may carry (~120 bytes each as JSON)

POINTS_EXAMPLES = Body(
    description="A list of points, or {points: [...]}; ts in seconds since the epoch; at most 200,000 points",
    examples=[
        Example(
            summary="two points",
            value={
                "points": [
                    {"series": "db_connections", "ts": 1767225600.0, "value": 42, "labels": {"db": "orders"}},
                    {"series": "db_connections", "ts": 1767225610.5, "value": 40, "labels": {"db": "orders"}},
                ]
            },
        ),
        Example(summary="bare list", value=[{"series": "queue_depth", "ts": 1767225600, "value": 3}]),
    ],
)


class PointsDecoder(AbstractDTO[PointBatch]):
    """Decodes the points body in one msgspec pass with the service's own checks and messages.

    Litestar's default path (JSON to builtins, then convert) loses the failing point's index
    inside the list-or-object union; here a 400 names it (`$.points[3].value`). The OpenAPI
    schema is still generated from the handler's annotation.
    """

    @classmethod
    def generate_field_definitions(cls, model_type: type[Any]) -> Generator[Any, None, None]:
        yield from ()

    @classmethod
    def detect_nested_field(cls, field_definition: Any) -> bool:
        return False

    @classmethod
    def create_for_field_definition(cls, field_definition: Any, handler_id: str, backend_cls: Any = None) -> None:
        return None

    @classmethod
    def create_openapi_schema(cls, field_definition: Any, handler_id: str, schema_creator: Any) -> Any:
        return schema_creator.for_field_definition(field_definition)

    def decode_bytes(self, value: bytes) -> Any:
        return decode_points_json(value)

    def decode_builtins(self, value: Any) -> Any:
        return decode_points_json(msgspec.json.encode(value))


def metrics_routes(node: Node) -> list[HTTPRouteHandler]:
    """The handlers, closing over the node."""

    def svc() -> MetricsService:
        metrics: MetricsService | None = getattr(node, "metrics", None)
        if metrics is None or not metrics.running:
            why = "disabled (metrics.enabled = false)" if not node.cfg.metrics.enabled else "starting or stopping"
            raise MetricsUnavailable(f"the metrics service is {why}")
        return metrics

    @post(
        "/api/v1/metrics/points",
        tags=["metrics"],
        summary="Ingest points",
        status_code=HTTP_200_OK,
        dto=PointsDecoder,
        return_dto=None,
        request_max_body_size=MAX_BODY_BYTES,
    )
    async def post_points(
        data: Annotated[PointsBody, POINTS_EXAMPLES],
        wait: Annotated[
            bool, QueryParameter(description="also wait until this replica's store holds them (read your writes)")
        ] = False,
    ) -> IngestReply:
        """Publishes to the metrics stream and answers once JetStream has acknowledged (durable);
        every replica then stores them. A bad point rejects the whole request (400) and stores nothing."""
        service = svc()
        points = data if isinstance(data, list) else data.points
        reply = await service.publish(points)
        if wait and reply.seq:
            try:
                await service.wait_committed(reply.seq, WAIT_S)
            except TimeoutError:
                raise MetricsUnavailable(
                    f"the points are durable in the stream (seq {reply.seq}) but this replica has not stored "
                    f"them within {WAIT_S:g} s"
                ) from None
        return reply

    @get("/api/v1/metrics/query", tags=["metrics"], summary="Query a series, downsampled")
    async def query(
        series: Annotated[str, QueryParameter(description="series name", examples=[Example(value="host_cpu_percent")])],
        labels: Annotated[
            str | None, QueryParameter(description="label conditions: k=v,k2!=v2 (all must hold)")
        ] = None,
        start: Annotated[
            str | None,
            QueryParameter(
                name="from", description="seconds since the epoch, 'now', or relative like now-1h / -1h (default to-1h)"
            ),
        ] = None,
        end: Annotated[str | None, QueryParameter(name="to", description="like from (default now)")] = None,
        step: Annotated[
            str | None, QueryParameter(description="bucket width: seconds or 30s, 5m, 1h (default 1m)")
        ] = None,
        agg: Annotated[str, QueryParameter(description="avg, min, max, sum, count or p95")] = "avg",
    ) -> QueryReply:
        """One result per matching label set: [bucket start (s), value] pairs in time order, empty buckets
        left out. Raw points answer the recent range, rollups (rollup_step) the older one."""
        return await svc().query(series, labels, start, end, step, agg)

    @get("/api/v1/metrics/series", tags=["metrics"], summary="List series and their label sets")
    async def list_series(
        series: Annotated[str | None, QueryParameter(description="only this series name")] = None,
        labels: Annotated[str | None, QueryParameter(description="label conditions: k=v,k2!=v2")] = None,
    ) -> SeriesList:
        """Every series this replica stores (optionally filtered)."""
        return await svc().series(series, labels)

    @get("/api/v1/metrics/stats", tags=["metrics"], summary="Ingest counters of this replica's store")
    async def stats() -> MetricsStats:
        """Points, messages and batches stored, rejected messages, the last stream sequence and the lag."""
        return await svc().stats()

    handlers: list[Any] = [post_points, query, list_series, stats]
    return handlers
