"""When nothing is recorded the hot paths make their own root span: valid, fresh ids, not sampled."""

from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON

from app import telemetry


def test_recording_follows_the_global_providers_sampler(monkeypatch: pytest.MonkeyPatch) -> None:
    off, on = TracerProvider(sampler=ALWAYS_OFF), TracerProvider(sampler=ALWAYS_ON)
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: off)
    assert telemetry.recording() is False
    monkeypatch.setattr(trace, "get_tracer_provider", lambda: on)
    assert telemetry.recording() is True
    monkeypatch.setattr(trace, "get_tracer_provider", trace.NoOpTracerProvider)
    assert telemetry.recording() is False


def test_unrecorded_span_matches_what_an_always_off_tracer_gives() -> None:
    sdk = TracerProvider(sampler=ALWAYS_OFF).get_tracer("t").start_span("x")
    ours = telemetry.unrecorded_span()
    for span in (sdk, ours):
        ctx = span.get_span_context()
        assert not span.is_recording()
        assert ctx.is_valid
        assert not ctx.is_remote
        assert not ctx.trace_flags.sampled
    spans = [telemetry.unrecorded_span().get_span_context() for _ in range(100)]
    assert len({c.trace_id for c in spans}) == 100
    assert len({c.span_id for c in spans}) == 100
