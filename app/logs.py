"""Structured logging: one line per event (JSON or text), trace ids attached, secrets redacted."""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec
from opentelemetry import trace

_STD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_encoder = msgspec.json.Encoder(enc_hook=repr)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STD_ATTRS and not k.startswith("_")}


def _trace_ids() -> tuple[str, str] | None:
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


class _Formatter(logging.Formatter):
    """Base formatter that redacts secrets from the final line."""

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def redact(self, line: str) -> str:
        for secret in self.secrets:
            line = line.replace(secret, "***")
        return line


class JsonFormatter(_Formatter):
    """One JSON object per line: ts, level, logger, msg, trace ids and any extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        ids = _trace_ids()
        if ids:
            entry["trace_id"], entry["span_id"] = ids
        entry.update(_extras(record))
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return self.redact(_encoder.encode(entry).decode("utf-8", "replace"))


class TextFormatter(_Formatter):
    """One human-readable line: time level logger: message key=value ..."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%H:%M:%S", time.localtime(record.created)) + f".{int(record.msecs):03d}"
        extras = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = f"{stamp} {record.levelname:<7} {record.name}: {record.getMessage()}"
        if extras:
            line += " " + extras
        ids = _trace_ids()
        if ids:
            line += f" trace_id={ids[0]}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return self.redact(line)


def announce(logger: logging.Logger, msg: str, extra: dict[str, Any]) -> None:
    """Log msg at info level whatever the configured level: a line every deployment needs (the
    "fleetmate ready" line with the listening addresses), even one that logs errors only."""
    fn, lno, func, _ = logger.findCaller(stacklevel=2)
    logger.handle(logger.makeRecord(logger.name, logging.INFO, fn, lno, msg, (), None, func, extra))


def setup(level: str, fmt: str, secrets: Iterable[str] = ()) -> None:
    """Route every logger (fleetmate's, granian's, nats') to stderr in the chosen format."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(secrets) if fmt == "json" else TextFormatter(secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(_LEVELS[level])
    for name in ("_granian", "granian", "granian.access"):
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
