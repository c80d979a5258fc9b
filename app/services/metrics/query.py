"""Metrics queries: parse and check parameters, and build the downsampling SQL over raw points and rollups.

Buckets are aligned to multiples of the step since the epoch (like time_bucket with its default
origin, computed as integer `ts // step * step` on millisecond timestamps, which is what makes a
10-million-point scan fast). A point belongs to [from, to). Raw points answer every bucket from the
raw floor on (the oldest time raw data is complete for, a multiple of rollup_step); older buckets
come from the rollups, so there the resolution is rollup_step at best. A bucket of the rollup range
holds each rollup_step bucket whose start lies in it.

p95 is exact over raw points (quantile_cont). Each rollup stores the exact p95 of its rollup_step
bucket; a query bucket made of several rollups reports the highest of their p95s, an upper estimate
(a bucket straddling the raw floor likewise takes the higher of its two parts).
"""

from __future__ import annotations

import math
import re
from typing import Literal, get_args

import msgspec

from app.services.metrics.errors import BadQuery
from app.services.metrics.messages import LABEL_KEY_PATTERN, SERIES_PATTERN, TS_MAX_S

Agg = Literal["avg", "min", "max", "sum", "count", "p95"]
AGGS: tuple[str, ...] = get_args(Agg)
MAX_BUCKETS = 11_000  # per series, as Prometheus caps a range query's points
MAX_SERIES = 1_000  # label sets one query may return
DEFAULT_RANGE_S = 3600.0

_DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h|d|w)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0, None: 1.0}
_SERIES_RE = re.compile(SERIES_PATTERN)
_LABEL_KEY_RE = re.compile(LABEL_KEY_PATTERN)


class LabelMatch(msgspec.Struct, frozen=True):
    """One label condition: key equals (or, with negate, differs from) value; a missing label is ''."""

    key: str
    value: str
    negate: bool = False


class Query(msgspec.Struct, frozen=True):
    """A checked query: times in seconds, [start, end), step > 0 seconds."""

    series: str
    labels: tuple[LabelMatch, ...]
    start: float
    end: float
    step: float
    agg: Agg


def parse_duration(text: str, what: str) -> float:
    """Seconds from '90', '1.5', '500ms', '30s', '5m', '2h', '1d' or '1w'."""
    m = _DURATION_RE.match(text.strip())
    if not m:
        raise BadQuery(f"{what}: {text!r} is not a duration (a number of seconds, or like 30s, 5m, 1h, 1d)")
    return float(m.group(1)) * _UNITS[m.group(2)]


def parse_time(text: str | None, now: float, default: float, what: str) -> float:
    """Seconds since the epoch from a number, 'now', 'now-1h' or '-1h' (relative to now)."""
    if text is None or text.strip() == "":
        return default
    raw = text.strip()
    if raw == "now":
        return now
    if raw.startswith(("now-", "-")):
        return now - parse_duration(raw.removeprefix("now").removeprefix("-"), what)
    try:
        value = float(raw)
    except ValueError:
        raise BadQuery(f"{what}: {text!r} is not a time (seconds since the epoch, 'now', or like now-1h)") from None
    if not math.isfinite(value) or value < 0 or value > TS_MAX_S:
        raise BadQuery(f"{what}: {text!r} must be seconds since the epoch between 0 and {TS_MAX_S:.0f}")
    return value


def parse_labels(text: str | None) -> tuple[LabelMatch, ...]:
    """Conditions from 'k=v,k2!=v2' (no spaces around the names; values may not contain ',')."""
    if not text:
        return ()
    out = []
    for part in text.split(","):
        if not part:
            continue
        negate = "!=" in part
        key, sep, value = part.partition("!=" if negate else "=")
        if not sep or not _LABEL_KEY_RE.match(key):
            raise BadQuery(f"labels: {part!r} is not key=value or key!=value with a valid label name")
        out.append(LabelMatch(key, value, negate))
    return tuple(out)


def make_query(
    series: str,
    labels: str | None,
    start: str | None,
    end: str | None,
    step: str | None,
    agg: str,
    now: float,
) -> Query:
    """Check every parameter and return the Query; BadQuery names the first bad one."""
    if not _SERIES_RE.match(series or ""):
        raise BadQuery(f"series: {series!r} is not a series name (letters, digits, '_', ':', '.')")
    if agg not in AGGS:
        raise BadQuery(f"agg: {agg!r} is not one of {', '.join(AGGS)}")
    t_end = parse_time(end, now, now, "to")
    t_start = parse_time(start, now, t_end - DEFAULT_RANGE_S, "from")
    if t_start > t_end:
        raise BadQuery(f"from ({t_start}) is after to ({t_end})")
    t_step = parse_duration(step, "step") if step else 60.0
    if t_step < 0.001:
        raise BadQuery("step must be at least 1 ms")
    buckets = math.floor(t_end / t_step) - math.floor(t_start / t_step) + 1
    if buckets > MAX_BUCKETS:
        raise BadQuery(
            f"{buckets} buckets of {t_step:g} s between from and to: at most {MAX_BUCKETS}; use a larger step"
        )
    return Query(series, parse_labels(labels), t_start, t_end, t_step, agg)  # type: ignore[arg-type]


def matches(labels: dict[str, str], conditions: tuple[LabelMatch, ...]) -> bool:
    """True when a label set meets every condition."""
    return all((labels.get(c.key, "") == c.value) != c.negate for c in conditions)


# ---- SQL ------------------------------------------------------------------------------------------------

_DIRECT = {
    "avg": "avg(value)",
    "min": "min(value)",
    "max": "max(value)",
    "sum": "sum(value)",
    "count": "count(*)::DOUBLE",
    "p95": "quantile_cont(value, 0.95)",
}
# Partial aggregates of each source, then how they combine, per agg.
_RAW_PARTS = {
    "avg": "sum(value) AS s, count(*) AS n",
    "sum": "sum(value) AS s",
    "count": "count(*) AS n",
    "min": "min(value) AS x",
    "max": "max(value) AS x",
    "p95": "quantile_cont(value, 0.95) AS x",
}
_ROLLUP_PARTS = {
    "avg": "sum(sum) AS s, sum(count) AS n",
    "sum": "sum(sum) AS s",
    "count": "sum(count) AS n",
    "min": "min(min) AS x",
    "max": "max(max) AS x",
    "p95": "max(p95) AS x",
}
_COMBINE = {
    "avg": "sum(s) / sum(n)",
    "sum": "sum(s)",
    "count": "sum(n)::DOUBLE",
    "min": "min(x)",
    "max": "max(x)",
    "p95": "max(x)",
}


def build_sql(agg: str, ids: list[int], start_ms: int, end_ms: int, step_ms: int, raw_floor_ms: int) -> str:
    """SQL returning (series_id, bucket index, value) rows in series and time order; a bucket starts at
    index * step_ms.

    Every value spliced in is an int this module computed (ids come from the store's own table). With
    one series the grouping key is the bucket index alone: ~25% faster over 10M points than grouping by
    (series_id, bucket).
    """
    one = len(ids) == 1
    where_ids = f"series_id = {ids[0]}" if one else f"series_id IN ({', '.join(map(str, ids))})"
    select_id, group = (f"{ids[0]} AS series_id", "b") if one else ("series_id", "series_id, b")
    if start_ms >= raw_floor_ms:
        return (
            f"SELECT {select_id}, ts // {step_ms} AS b, {_DIRECT[agg]} FROM raw "
            f"WHERE {where_ids} AND ts >= {start_ms} AND ts < {end_ms} GROUP BY {group} ORDER BY {group}"
        )
    parts = [
        f"SELECT {select_id}, bucket // {step_ms} AS b, {_ROLLUP_PARTS[agg]} FROM rollup "
        f"WHERE {where_ids} AND bucket >= {start_ms} AND bucket < {min(end_ms, raw_floor_ms)} GROUP BY {group}"
    ]
    if end_ms > raw_floor_ms:
        parts.append(
            f"SELECT {select_id}, ts // {step_ms} AS b, {_RAW_PARTS[agg]} FROM raw "
            f"WHERE {where_ids} AND ts >= {raw_floor_ms} AND ts < {end_ms} GROUP BY {group}"
        )
    union = " UNION ALL ".join(parts)
    return f"SELECT series_id, b, {_COMBINE[agg]} FROM ({union}) GROUP BY series_id, b ORDER BY series_id, b"
