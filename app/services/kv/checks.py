"""Edge validation of KV requests with the same bounds apply relies on: sizes, UTF-8, ranges, batch shapes."""

from __future__ import annotations

from app.config import KvConfig
from app.services.kv.errors import BadKvRequest
from app.services.kv.wire import KvRequest

MAX_BATCH = 128  # writes and checks in one batch
MAX_BATCH_BYTES = 4 << 20  # keys and values of one batch (a log entry is at most 8 MiB)
MAX_SCAN = 10_000
MAX_TTL_MS = 10 * 365 * 86400 * 1000


def utf8_len(text: str, what: str) -> int:
    """The UTF-8 length of a text (BadKvRequest when it holds a lone surrogate, which UTF-8 cannot carry)."""
    try:
        return len(text.encode())
    except UnicodeEncodeError:
        raise BadKvRequest(f"{what} is not valid UTF-8 text") from None


def key(text: str, cfg: KvConfig, what: str = "key") -> None:
    """A key: non-empty, valid UTF-8, at most kv.max_key_bytes."""
    if not text:
        raise BadKvRequest(f"{what} is empty")
    n = utf8_len(text, what)
    if n > cfg.max_key_bytes:
        raise BadKvRequest(f"{what} is {n} bytes; the most is {cfg.max_key_bytes} (kv.max_key_bytes)")


def value(text: str, cfg: KvConfig) -> None:
    """A value: non-empty, valid UTF-8, at most kv.max_value_bytes."""
    if not text:
        raise BadKvRequest("value is empty")
    n = utf8_len(text, "value")
    if n > cfg.max_value_bytes:
        raise BadKvRequest(f"value is {n} bytes; the most is {cfg.max_value_bytes} (kv.max_value_bytes)")


def revision(rev: int) -> None:
    """A compare-and-set revision: -1 (none), 0 (absent) or a revision, within int64."""
    if not -1 <= rev < 1 << 63:
        raise BadKvRequest(f"if_revision {rev} is out of range (-1, 0 or a key's revision)")


def scan(start: str, end: str, limit: int, cfg: KvConfig) -> None:
    """A scan's range and limit."""
    if start:
        key(start, cfg, "start")
    if end:
        key(end, cfg, "end")
    if end and start >= end:
        raise BadKvRequest(f"start {start!r} is not before end {end!r}")
    if not 0 <= limit <= MAX_SCAN:
        raise BadKvRequest(f"limit {limit} is out of range (0 to {MAX_SCAN})")


def request(req: KvRequest, cfg: KvConfig) -> None:
    """Any request, before it is routed (BadKvRequest naming what is wrong)."""
    revision(req.if_revision)
    match req.op:
        case "put":
            key(req.key, cfg)
            value(req.value, cfg)
            if not 0 <= req.ttl_ms <= MAX_TTL_MS:
                raise BadKvRequest(f"ttl is out of range (0 to {MAX_TTL_MS // 1000} seconds)")
            if not 0 <= req.session < 1 << 63:
                raise BadKvRequest(f"session {req.session} is out of range")
        case "get" | "delete":
            key(req.key, cfg)
        case "scan":
            scan(req.key, req.end, req.limit, cfg)
        case "batch":
            if not req.ops:
                raise BadKvRequest("a batch needs at least one write")
            if len(req.ops) + len(req.checks) > MAX_BATCH:
                raise BadKvRequest(f"a batch takes at most {MAX_BATCH} writes and checks")
            total = 0
            for op in req.ops:
                key(op.key, cfg)
                if not op.delete:
                    value(op.value, cfg)
                total += utf8_len(op.key, "key") + (0 if op.delete else utf8_len(op.value, "value"))
            if total > MAX_BATCH_BYTES:
                raise BadKvRequest(f"a batch's keys and values are {total} bytes; the most is {MAX_BATCH_BYTES}")
            for c in req.checks:
                key(c.key, cfg, "check key")
                if not 0 <= c.revision < 1 << 63:
                    raise BadKvRequest(f"check revision {c.revision} is out of range")
            if req.key != req.ops[0].key:
                raise BadKvRequest("a batch is routed by its first write's key")
