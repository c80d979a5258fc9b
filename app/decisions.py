"""Trace ids for recorded decisions: the current span's, or a fresh root span for a round that decides."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from opentelemetry import context, trace
from opentelemetry.util.types import Attributes

from app.telemetry import tracer, unrecorded_span


def trace_id_of(span: trace.Span) -> str:
    """A span's trace id as 32 hex digits; "" for an invalid span."""
    ctx = span.get_span_context()
    return f"{ctx.trace_id:032x}" if ctx.is_valid else ""


def current_trace_id() -> str:
    """The trace id of the current span (an HTTP request's, a detection round's); "" outside any."""
    return trace_id_of(trace.get_current_span())


@contextlib.contextmanager
def decision_span(name: str, attributes: Attributes = None) -> Iterator[str]:
    """A root span made current for one round of leader decisions (a detection round, a recovery);
    yields its trace id, which every record and log line of the round carries.

    A root, not a child of whatever was current when the leader loop started, so each round is one
    trace of its own. With no tracer provider set up (library use, some tests) the tracer gives an
    invalid span: a fresh unrecorded one then still ties the round's records and log lines together.
    """
    span = tracer().start_span(name, context=context.Context(), attributes=attributes)
    if not span.get_span_context().is_valid:
        span = unrecorded_span()
    with trace.use_span(span, end_on_exit=True):
        yield trace_id_of(span)
