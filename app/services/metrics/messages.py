"""Metrics messages: points and their validation, the stream's wire format, query and ingest replies.

Timestamps in the API are float seconds since the epoch (the Unix convention; millisecond precision is
kept). Inside the stream and the store they are integer milliseconds.
"""

from __future__ import annotations

import math
import re
import sys
from array import array
from collections.abc import Iterable, Mapping
from typing import Annotated

import msgspec

from app.services.agent.messages import HostInfo
from app.services.metrics.errors import BadPoints

# ---- names and limits -----------------------------------------------------------------------------

STREAM = "FLEETMATE_METRICS"
# Every message on these subjects lands in the stream; the last token names the source (a node id, an app).
POINTS_SUBJECTS = "fleetmate.metrics.points.>"
# Request/reply: a JSON PointBatch in, an IngestReply (or a typed error) out, after the stream's ack.
INGEST_SUBJECT = "fleetmate.metrics.ingest"
SERVICE_NAME = "fleetmate-metrics"

SERIES_PATTERN = r"^[A-Za-z_:][A-Za-z0-9_:.]{0,199}$"
LABEL_KEY_PATTERN = r"^[A-Za-z_][A-Za-z0-9_]{0,63}$"
MAX_LABELS = 16
MAX_LABEL_VALUE = 256
MAX_POINTS_PER_REQUEST = 200_000
TS_MAX_S = 4102444800.0  # 2100-01-01: anything later is a unit mistake (ms or ns given as seconds)
TS_MAX_MS = int(TS_MAX_S * 1000)
_FLOAT_MAX = sys.float_info.max

SeriesName = Annotated[
    str,
    msgspec.Meta(
        pattern=SERIES_PATTERN,
        description="letters, digits, '_', ':' and '.', starting with a letter, '_' or ':'; at most 200",
        examples=["host_cpu_percent"],
    ),
]
LabelKey = Annotated[str, msgspec.Meta(pattern=LABEL_KEY_PATTERN)]
LabelValue = Annotated[str, msgspec.Meta(max_length=MAX_LABEL_VALUE)]
Labels = Annotated[
    dict[LabelKey, LabelValue],
    msgspec.Meta(max_length=MAX_LABELS, description=f"at most {MAX_LABELS} labels; values up to 256 characters"),
]
Timestamp = Annotated[
    float, msgspec.Meta(ge=0, le=TS_MAX_S, description="seconds since the epoch (millisecond precision)")
]
# The bounds reject inf and NaN (NaN fails every comparison) while decoding, at C speed.
Value = Annotated[float, msgspec.Meta(ge=-_FLOAT_MAX, le=_FLOAT_MAX, description="a finite number")]


def subject_for(source: str) -> str:
    """The stream subject a source (node id, application name) publishes its points on."""
    return f"fleetmate.metrics.points.{source}"


# ---- points -----------------------------------------------------------------------------------------


class Point(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One sample: a series name, its labels, a time in seconds since the epoch and a finite value."""

    series: SeriesName
    ts: Timestamp
    value: Value
    labels: Labels = msgspec.field(default_factory=dict)


class PointBatch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Points to ingest (the body of POST /api/v1/metrics/points, or of a NATS message)."""

    points: Annotated[list[Point], msgspec.Meta(max_length=MAX_POINTS_PER_REQUEST)]


PointsBody = PointBatch | Annotated[list[Point], msgspec.Meta(max_length=MAX_POINTS_PER_REQUEST)]


class PointFrame(msgspec.Struct, frozen=True, array_like=True):
    """The stream's wire format: one message's points, grouped by series, columns packed little-endian.

    keys[i] names a series (see series_key); its counts[i] points come right after those of
    keys[i-1] in ts (int64 milliseconds) and values (float64). Packing keeps the consumer free of
    per-point Python objects (a frame goes into DuckDB as two buffers), and a series key is one
    string to look up, checked only the first time it is seen.
    """

    keys: list[str]
    counts: list[Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)]]
    ts: bytes
    values: bytes

    def __len__(self) -> int:
        return len(self.ts) // 8


class IngestReply(msgspec.Struct, frozen=True):
    """Points accepted: how many, and the stream sequence of the last message holding them."""

    count: int
    seq: int
    messages: int = 1


class SeriesInfo(msgspec.Struct, frozen=True):
    """One stored series: its name and label set."""

    series: str
    labels: dict[str, str]


class SeriesList(msgspec.Struct, frozen=True):
    """Series known to this replica's store."""

    series: list[SeriesInfo]


class QueryResult(msgspec.Struct, frozen=True):
    """One series, downsampled: [bucket start in seconds, value] pairs in time order, ready to chart."""

    series: str
    labels: dict[str, str]
    step: float
    agg: str
    points: list[tuple[float, float]]


class QueryReply(msgspec.Struct, frozen=True):
    """The answer to a query: one result per matching label set."""

    series: str
    agg: str
    step: float
    start: float = msgspec.field(name="from")
    end: float = msgspec.field(name="to")
    results: list[QueryResult] = msgspec.field(default_factory=list)


class MetricsStats(msgspec.Struct, frozen=True):
    """Ingest counters of this replica's store; lag is stream messages not yet committed here."""

    enabled: bool
    points: int
    messages: int
    batches: int
    rejected_messages: int
    dropped_points: int
    last_seq: int
    lag: int
    series: int
    raw_rows: int
    rollup_rows: int
    rolled_through: float
    raw_floor: float
    error: str | None = None  # why the last DuckDB append failed, while it is being retried


# ---- encoding and decoding --------------------------------------------------------------------------

_LITTLE = sys.byteorder == "little"
_frame_encoder = msgspec.msgpack.Encoder()
_frame_decoder = msgspec.msgpack.Decoder(PointFrame)
_json_decoder = msgspec.json.Decoder(PointsBody)
_labels_decoder = msgspec.json.Decoder(Labels)
_labels_encoder = msgspec.json.Encoder()
_series_re = re.compile(SERIES_PATTERN)
MAX_KEY_CHARS = 8192
EMPTY_FRAME = PointFrame([], [], b"", b"")


def series_key(series: str, labels: Mapping[str, str]) -> str:
    """A series' key: its name, then (when it has labels) the labels as compact JSON with sorted keys."""
    if not labels:
        return series
    return series + _labels_encoder.encode(dict(sorted(labels.items()))).decode()


def parse_key(key: str) -> tuple[str, dict[str, str]]:
    """Name and labels of a series key, checked like a Point's; BadPoints names what is wrong."""
    if len(key) > MAX_KEY_CHARS:
        raise BadPoints(f"series key longer than {MAX_KEY_CHARS} characters")
    name, brace, rest = key.partition("{")
    if not _series_re.match(name):
        raise BadPoints(f"series {name!r} does not match {SERIES_PATTERN}")
    if not brace:
        return name, {}
    try:
        labels = _labels_decoder.decode(brace + rest)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadPoints(f"series {name}: bad labels: {exc}") from None
    return name, labels


# Keys already checked, mapped to their canonical form (bounded: cleared when it grows too large).
_checked_keys: dict[str, str] = {}
_CHECKED_MAX = 1_000_000


def canonical_key(key: str) -> str:
    """The canonical form of a valid series key (cached); BadPoints when it is not valid."""
    found = _checked_keys.get(key)
    if found is None:
        found = series_key(*parse_key(key))
        if len(_checked_keys) >= _CHECKED_MAX:
            _checked_keys.clear()
        _checked_keys[key] = found
    return found


def _packed(kind: str, values: Iterable[float] | Iterable[int]) -> bytes:
    arr = array(kind, values)
    if not _LITTLE:
        arr.byteswap()
    return arr.tobytes()


def _unpacked(kind: str, data: bytes) -> array[float] | array[int]:
    arr: array[float] | array[int] = array(kind)
    arr.frombytes(data)
    if not _LITTLE:
        arr.byteswap()
    return arr


def frames_from_points(points: Iterable[Point], max_points: int = 1 << 62) -> list[PointFrame]:
    """Points grouped by series into frames of at most max_points points (a series may span frames)."""
    groups: dict[str, tuple[list[int], list[float]]] = {}
    keys_seen: dict[tuple[str, ...], str] = {}  # (name, *labels) as given -> key: skips sorting and JSON
    for p in points:
        ident = (p.series, *p.labels.keys(), *p.labels.values())
        key = keys_seen.get(ident)
        if key is None:
            key = keys_seen[ident] = series_key(p.series, p.labels)
        cols = groups.get(key)
        if cols is None:
            cols = groups[key] = ([], [])
        cols[0].append(round(p.ts * 1000))
        cols[1].append(p.value)
    frames: list[PointFrame] = []
    keys: list[str] = []
    counts: list[int] = []
    ts: list[int] = []
    values: list[float] = []
    for key, (key_ts, key_values) in groups.items():
        start = 0
        while start < len(key_ts):
            take = min(max_points - len(ts), len(key_ts) - start)
            keys.append(key)
            counts.append(take)
            ts.extend(key_ts[start : start + take])
            values.extend(key_values[start : start + take])
            start += take
            if len(ts) == max_points:
                frames.append(PointFrame(keys, counts, _packed("q", ts), _packed("d", values)))
                keys, counts, ts, values = [], [], [], []
    if ts:
        frames.append(PointFrame(keys, counts, _packed("q", ts), _packed("d", values)))
    return frames


def encode_frame(frame: PointFrame) -> bytes:
    """One stream message payload (MessagePack)."""
    return _frame_encoder.encode(frame)


def encode_points(points: Iterable[Point]) -> bytes:
    """One stream message payload holding points (what an agent publishes on subject_for(node_id))."""
    frames = frames_from_points(points)
    return encode_frame(frames[0] if frames else EMPTY_FRAME)


def decode_points_json(data: bytes) -> list[Point]:
    """Points from a JSON body ({"points": [...]} or a bare list); BadPoints names what is wrong."""
    try:
        body = _json_decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise BadPoints(_explain(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise BadPoints(f"the body is not valid JSON: {exc}") from None
    return body.points if isinstance(body, PointBatch) else body


def _explain(text: str) -> str:
    """msgspec's message, with the two that read oddly (non-finite values, bad ts) said plainly."""
    if "`float` >= -1.79" in text or "`float` <= 1.79" in text or text.startswith("Number out of range"):
        return text.replace(text.split(" - at ", maxsplit=1)[0], "value must be a finite number (not NaN or infinity)")
    if "`float` <= 4102444800" in text or "`float` >= 0" in text:
        return text.replace(
            text.split(" - at ", maxsplit=1)[0],
            "ts must be seconds since the epoch between 0 and 4102444800 (year 2100)",
        )
    return text


def _surely_in_range(ts: bytes, n: int) -> bool:
    """True when every int64 LE in ts lies in [0, 3 * 2**40) ms (until 2074): its top bytes are zero.

    Byte slices and counts run in C; min()/max() over the unpacked array made an int per point.
    """
    if not _LITTLE:
        return False
    return ts[7::8].count(0) == n and ts[6::8].count(0) == n and max(ts[5::8]) < 3


def check_frame(frame: PointFrame) -> PointFrame:
    """The frame with canonical keys, once its columns and keys are checked; BadPoints otherwise."""
    n = len(frame.ts) // 8
    if len(frame.ts) % 8 or len(frame.ts) != len(frame.values):
        raise BadPoints("ts and values must be packed 8-byte columns of equal length")
    if len(frame.keys) != len(frame.counts) or sum(frame.counts) != n:
        raise BadPoints(f"counts must give one number per key, adding up to the {n} points")
    if n:
        values = _unpacked("d", frame.values)
        # A sum is finite only if every term is: one pass in C for the usual, all-finite case.
        if not math.isfinite(sum(values)) and not all(map(math.isfinite, values)):
            raise BadPoints("every value must be a finite number")
        if not _surely_in_range(frame.ts, n):
            ts = _unpacked("q", frame.ts)
            if min(ts) < 0 or max(ts) > TS_MAX_MS:
                raise BadPoints(f"ts must be milliseconds between 0 and {TS_MAX_MS}")
    keys = [canonical_key(k) for k in frame.keys]
    if keys != frame.keys:
        return PointFrame(keys, frame.counts, frame.ts, frame.values)
    return frame


def decode_stream_payload(data: bytes) -> PointFrame:
    """The checked frame of a stream message: MessagePack, or JSON points sent by a plain NATS client."""
    if data[:1] in (b"{", b"[", b" ", b"\n", b"\r", b"\t"):
        frames = frames_from_points(decode_points_json(data))
        return frames[0] if frames else EMPTY_FRAME
    try:
        frame = _frame_decoder.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise BadPoints(f"not a point frame: {exc}") from None
    return check_frame(frame)


def frame_points(frame: PointFrame) -> list[tuple[str, int, float]]:
    """(series key, ts ms, value) for every point of a frame (for tests and small tools)."""
    ts, values = _unpacked("q", frame.ts), _unpacked("d", frame.values)
    keys = [k for k, c in zip(frame.keys, frame.counts, strict=True) for _ in range(c)]
    return list(zip(keys, ts, values, strict=True))  # type: ignore[arg-type]


# ---- host figures -------------------------------------------------------------------------------------


def points_from_host(node_id: str, labels: Mapping[str, str], host: HostInfo, ts: float) -> list[Point]:
    """A heartbeat's host figures as points labelled node=<node_id> plus the given (non-empty) labels.

    Series: host_cpu_percent, host_memory_used_bytes, host_memory_percent, host_disk_used_bytes and
    host_disk_percent (label mount), host_load1/5/15, host_uptime_seconds.
    """
    base = {k: v for k, v in labels.items() if v}
    base["node"] = node_id
    figures: list[tuple[str, float, dict[str, str]]] = [
        ("host_cpu_percent", host.cpu_percent, base),
        ("host_memory_used_bytes", float(host.memory_used), base),
        ("host_memory_percent", host.memory_percent, base),
        ("host_load1", host.load1, base),
        ("host_load5", host.load5, base),
        ("host_load15", host.load15, base),
        ("host_uptime_seconds", host.uptime, base),
    ]
    for disk in host.disks:
        mounted = {**base, "mount": disk.mount[:MAX_LABEL_VALUE]}
        figures.append(("host_disk_used_bytes", float(disk.used), mounted))
        figures.append(("host_disk_percent", disk.percent, mounted))
    return [Point(name, ts, value, dict(lbl)) for name, value, lbl in figures if math.isfinite(value)]
