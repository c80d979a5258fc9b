"""OpenTelemetry set-up: one tracer provider per process, exporter chosen by config."""

from __future__ import annotations

import functools
import logging
import random

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags

from app import __version__
from app.config import TelemetryConfig

log = logging.getLogger("fleetmate.telemetry")
TRACER_NAME = "fleetmate"
_sampling: tuple[object, bool] = (None, False)  # (the global provider, whether its spans can be recorded)


def _exporter(cfg: TelemetryConfig) -> SpanExporter | None:
    if cfg.exporter == "console":
        return ConsoleSpanExporter()
    if cfg.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=cfg.endpoint)
    return None


def setup(cfg: TelemetryConfig, node_id: str, exporter: SpanExporter | None = None) -> TracerProvider:
    """Install the global tracer provider; `exporter` overrides the configured one (tests)."""
    resource = Resource.create(
        {"service.name": cfg.service_name, "service.version": __version__, "service.instance.id": node_id}
    )
    chosen = exporter or _exporter(cfg)
    # With nowhere to export, spans are not recorded: they still carry trace ids (for logs and
    # for propagation over NATS) but cost a fraction of a recorded span on every request.
    sampler = ParentBased(TraceIdRatioBased(cfg.sample_ratio)) if chosen is not None else ALWAYS_OFF
    provider = TracerProvider(resource=resource, sampler=sampler)
    if chosen is not None:
        provider.add_span_processor(BatchSpanProcessor(chosen))
    trace.set_tracer_provider(provider)
    log.debug("tracing configured", extra={"exporter": cfg.exporter})
    return provider


@functools.cache
def tracer() -> trace.Tracer:
    """fleetmate's tracer (a proxy until the global provider is set, which OpenTelemetry allows once)."""
    return trace.get_tracer(TRACER_NAME, __version__)


def recording() -> bool:
    """Whether the global tracer provider may record spans (not when its sampler drops them all)."""
    global _sampling
    provider = trace.get_tracer_provider()
    if _sampling[0] is not provider:
        _sampling = (provider, isinstance(provider, TracerProvider) and provider.sampler is not ALWAYS_OFF)
    return _sampling[1]


def unrecorded_span() -> NonRecordingSpan:
    """A root span as the tracer makes one when nothing is recorded (fresh ids, not sampled), for the
    hottest paths: the same ids for logs and propagation, without the sampler and span machinery."""
    trace_id = random.getrandbits(128) or 1
    span_id = random.getrandbits(64) or 1
    return NonRecordingSpan(SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(0)))
