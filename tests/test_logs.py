"""Structured logging: one line per event, trace ids attached, secrets never printed."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest
from opentelemetry import trace

from app import logs


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """logs.setup() points the root logger at capsys's stream; put the old handlers back after."""
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in handlers:
        root.addHandler(handler)
    root.setLevel(level)


def _capture(capsys: pytest.CaptureFixture[str], fmt: str, secrets: tuple[str, ...] = ()) -> logging.Logger:
    logs.setup("debug", fmt, secrets)
    return logging.getLogger("fleetmate.test")


def test_json_lines_with_extras_and_trace(capsys: pytest.CaptureFixture[str]) -> None:
    log = _capture(capsys, "json")
    tracer = trace.get_tracer("test")
    with tracer.start_as_current_span("op") as span:
        log.info("hello %s", "world", extra={"key": "http.port", "n": 3, "obj": object()})
    log.warning("multi\nline")
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2  # one line per event, even with a newline inside
    first = json.loads(lines[0])
    assert first["msg"] == "hello world"
    assert first["level"] == "info"
    assert first["logger"] == "fleetmate.test"
    assert first["key"] == "http.port"
    assert first["n"] == 3
    assert first["obj"].startswith("<object")
    ctx = span.get_span_context()
    if ctx.is_valid:  # a real SDK provider is installed in this test session
        assert first["trace_id"] == format(ctx.trace_id, "032x")
    assert json.loads(lines[1])["msg"] == "multi\nline"


def test_secrets_are_redacted(capsys: pytest.CaptureFixture[str]) -> None:
    log = _capture(capsys, "json", ("sup3rsecret",))
    log.error("token sup3rsecret leaked", extra={"header": "Bearer sup3rsecret"})
    out = capsys.readouterr().err
    assert "sup3rsecret" not in out
    assert "***" in out


def test_text_format(capsys: pytest.CaptureFixture[str]) -> None:
    log = _capture(capsys, "text", ("hunter2hunter2",))
    log.info("ready", extra={"url": "http://x", "pw": "hunter2hunter2"})
    out = capsys.readouterr().err.strip()
    assert "INFO" in out
    assert "fleetmate.test: ready url=http://x pw=***" in out
