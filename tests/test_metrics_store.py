"""The DuckDB metrics store and its queries, checked against a pure-Python model of the same rules."""

from __future__ import annotations

import math
import random
import struct
from collections import defaultdict
from pathlib import Path

import duckdb
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from app.config import MetricsConfig
from app.services.agent.messages import DiskUsage, HostInfo
from app.services.metrics.errors import BadPoints, BadQuery
from app.services.metrics.messages import (
    Point,
    PointFrame,
    check_frame,
    decode_points_json,
    decode_stream_payload,
    encode_frame,
    encode_points,
    frame_points,
    frames_from_points,
    points_from_host,
    series_key,
)
from app.services.metrics.query import AGGS, MAX_BUCKETS, make_query, parse_labels
from app.services.metrics.store import MetricsStore

NOW = 1_800_000_000.0  # a fixed "now" (2027-01-15), so every test is reproducible
Sample = tuple[str, dict[str, str], int, float]  # series, labels, ts ms, value


# ---- the model ------------------------------------------------------------------------------------------


def quantile_cont(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (DuckDB's quantile_cont)."""
    xs = sorted(values)
    pos = (len(xs) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def aggregate(agg: str, values: list[float]) -> float:
    if agg == "avg":
        return math.fsum(values) / len(values)
    if agg == "sum":
        return math.fsum(values)
    if agg == "count":
        return float(len(values))
    if agg == "min":
        return min(values)
    if agg == "max":
        return max(values)
    return quantile_cont(values, 0.95)


def model(
    samples: list[Sample],
    series: str,
    labels: str,
    start: float,
    end: float,
    step: float,
    agg: str,
    floor_ms: int = 0,
    rollup_ms: int = 60_000,
) -> dict[tuple[tuple[str, str], ...], list[tuple[float, float]]]:
    """The documented answer: label set -> [(bucket start s, value)] over [start, end).

    A point older than floor_ms exists only inside its rollup bucket, so it counts at that bucket's
    start; p95 is then the highest of the per-rollup p95s and of the raw part's p95.
    """
    conditions = parse_labels(labels)
    lo, hi, step_ms = round(start * 1000), round(end * 1000), round(step * 1000)
    rolled = lo < floor_ms
    groups: dict[tuple[tuple[str, str], ...], dict[int, dict[int | None, list[float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(list))
    )
    for name, lbl, ts, value in samples:
        if name != series or not all((lbl.get(c.key, "") == c.value) != c.negate for c in conditions):
            continue
        minute = ts // rollup_ms * rollup_ms if rolled and ts < floor_ms else None
        at = ts if minute is None else minute
        if lo <= at < hi:
            groups[tuple(sorted(lbl.items()))][at // step_ms * step_ms][minute].append(value)
    out = {}
    for key, per in groups.items():
        rows = []
        for b, parts in sorted(per.items()):
            values = [v for part in parts.values() for v in part]
            value = max(quantile_cont(p, 0.95) for p in parts.values()) if agg == "p95" else aggregate(agg, values)
            rows.append((b / 1000, value))
        out[key] = rows
    return out


def answer(store: MetricsStore, series: str, labels: str, start: float, end: float, step: float, agg: str) -> dict:
    q = make_query(series, labels, str(start), str(end), f"{step}", agg, NOW)
    return {tuple(sorted(r.labels.items())): r.points for r in store.query(q)}


def assert_same(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for key, points in want.items():
        assert [b for b, _ in got[key]] == [b for b, _ in points], key
        for (_, g), (_, w) in zip(got[key], points, strict=True):
            assert g == pytest.approx(w, rel=1e-9, abs=1e-6), key


def to_samples(points: list[Point]) -> list[Sample]:
    return [(p.series, p.labels, round(p.ts * 1000), p.value) for p in points]


# ---- fixtures ---------------------------------------------------------------------------------------------


def open_store(path: Path | str, **cfg: float) -> MetricsStore:
    store = MetricsStore(Path(path), MetricsConfig(**cfg))  # type: ignore[arg-type]
    store.open()
    return store


@pytest.fixture
def store(tmp_path: Path) -> MetricsStore:
    s = open_store(tmp_path / "m.duckdb")
    yield s
    s.close()


def sample_points(n: int, seed: int = 7, span_s: float = 7200.0) -> list[Point]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        labels = {"host": rng.choice(["a", "b", "c"])}
        if rng.random() < 0.5:
            labels["zone"] = rng.choice(["z1", "z2"])
        ts = round(NOW - span_s + rng.random() * span_s, 3)
        out.append(Point(rng.choice(["cpu", "mem"]), ts, round(rng.uniform(-50, 150), 2), labels))
    return out


# ---- validation and wire format -------------------------------------------------------------------------


def test_bad_points_are_named_clearly() -> None:
    cases = {
        b'[{"series": "9cpu", "ts": 1, "value": 1}]': "$[0].series",
        b'{"points": [{"series": "cpu", "ts": 1, "value": 1}, {"series": "cpu", "ts": 1, "value": 1e999}]}': (
            "finite number"
        ),
        b'[{"series": "cpu", "ts": 1e12, "value": 1}]': "seconds since the epoch",
        b'[{"series": "cpu", "ts": -1, "value": 1}]': "seconds since the epoch",
        b'[{"series": "cpu", "ts": 1, "value": 1, "labels": {"a b": "x"}}]': "$[0].labels",
        b'[{"series": "cpu", "ts": 1, "value": 1, "labels": {"k": "' + b"x" * 300 + b'"}}]': "$[0].labels",
        b'[{"series": "cpu", "ts": 1, "value": "high"}]': "$[0].value",
        b'[{"series": "cpu", "ts": 1}]': "value",
        b'[{"series": "cpu", "ts": 1, "value": 1, "extra": 2}]': "extra",
        b"{nope": "not valid JSON",
    }
    for body, fragment in cases.items():
        with pytest.raises(BadPoints) as info:
            decode_points_json(body)
        assert fragment in info.value.message, (body, info.value.message)
    assert decode_points_json(b'[{"series": "a.b:c_d", "ts": 1.5, "value": -2}]') == [Point("a.b:c_d", 1.5, -2.0)]


def test_frames_round_trip_and_checks() -> None:
    points = sample_points(500)
    want = sorted((series_key(p.series, p.labels), round(p.ts * 1000), p.value) for p in points)
    (frame,) = frames_from_points(points)
    assert sorted(frame_points(decode_stream_payload(encode_frame(frame)))) == want
    # Splitting into messages keeps every point, at most max_points each; a series may span frames.
    frames = frames_from_points(points, 37)
    assert all(len(f) <= 37 for f in frames)
    assert sorted(p for f in frames for p in frame_points(decode_stream_payload(encode_frame(f)))) == want
    # The JSON form a plain NATS client sends is understood too.
    assert frame_points(decode_stream_payload(b'{"points":[{"series":"x","ts":1,"value":2}]}')) == [("x", 1000, 2.0)]
    # Keys come out canonical (labels sorted), whatever order the sender used.
    odd = PointFrame(['cpu{"z":"1","a":"2"}'], [1], struct.pack("<q", 5), struct.pack("<d", 1.0))
    assert decode_stream_payload(encode_frame(odd)).keys == ['cpu{"a":"2","z":"1"}']
    one = (struct.pack("<2q", 1000, 2000), struct.pack("<2d", 1.0, 2.0))
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(BadPoints, match="finite"):
            check_frame(PointFrame(["x"], [2], one[0], struct.pack("<2d", 1.0, bad)))
    bad_frames = {
        "milliseconds": PointFrame(["x"], [1], struct.pack("<q", -1), struct.pack("<d", 1.0)),
        "equal length": PointFrame(["x"], [2], one[0], one[1][:8]),
        "adding up": PointFrame(["x"], [1], *one),
        "one number per key": PointFrame(["x", "y"], [2], *one),
        "does not match": PointFrame(["9x"], [2], *one),
        "bad labels": PointFrame(['x{"bad key":"v"}'], [2], *one),
    }
    for fragment, frame in bad_frames.items():
        with pytest.raises(BadPoints, match=fragment):
            check_frame(frame)
    with pytest.raises(BadPoints, match="not a point frame"):
        decode_stream_payload(b"\x93\x01\x02")


def test_points_from_host() -> None:
    host = HostInfo(
        hostname="db1", time=NOW, cpu_percent=12.5, cpu_cores=4, cpu_physical_cores=2,
        memory_total=8 << 30, memory_available=6 << 30, memory_used=2 << 30, memory_percent=25.0,
        swap_total=0, swap_used=0, swap_percent=0.0, load1=0.5, load5=0.25, load15=0.1,
        boot_time=NOW - 3600, uptime=3600.0,
        disks=(DiskUsage("/", "/dev/sda1", "ext4", 100, 40, 60, 40.0),
               DiskUsage("/var/lib/mysql", "/dev/sdb1", "xfs", 1000, 10, 990, 1.0)),
    )  # fmt: skip
    points = points_from_host("db1", {"zone": "z1", "rack": ""}, host, NOW)
    by = {(p.series, p.labels.get("mount")): p for p in points}
    assert by[("host_cpu_percent", None)].value == 12.5
    assert by[("host_memory_used_bytes", None)].value == float(2 << 30)
    assert by[("host_disk_used_bytes", "/var/lib/mysql")].value == 10.0
    assert by[("host_disk_percent", "/")].value == 40.0
    assert {p.series for p in points} >= {"host_load1", "host_load5", "host_load15", "host_uptime_seconds"}
    assert all(p.labels["node"] == "db1" and p.labels["zone"] == "z1" and "rack" not in p.labels for p in points)
    # What the agent publishes passes the consumer's checks.
    assert len(decode_stream_payload(encode_points(points))) == len(points)


# ---- queries over raw points -------------------------------------------------------------------------------


@pytest.mark.parametrize("agg", AGGS)
def test_each_agg_matches_the_model(store: MetricsStore, agg: str) -> None:
    points = sample_points(3000)
    store.append(frames_from_points(points), 1)
    samples = to_samples(points)
    for series, labels, step in (("cpu", "", 300), ("cpu", "host=a", 60), ("mem", "zone=z1,host!=b", 900)):
        want = model(samples, series, labels, NOW - 7200, NOW, step, agg)
        assert want, "the data must cover the query"
        assert_same(answer(store, series, labels, NOW - 7200, NOW, step, agg), want)


def test_buckets_align_to_the_step_and_bounds_are_half_open(store: MetricsStore) -> None:
    t0 = 1_799_999_940.0  # a multiple of 60
    points = [Point("x", t0 + i, float(i)) for i in range(180)]  # 3 minutes, one point a second
    store.append(frames_from_points(points), 1)
    got = answer(store, "x", "", t0 + 30, t0 + 150, 60, "count")[()]
    # [t0+30, t0+60) holds 30 points, [t0+60, t0+120) 60, [t0+120, t0+150) 30; the bucket at t0 starts before from.
    assert got == [(t0, 30.0), (t0 + 60, 60.0), (t0 + 120, 30.0)]
    assert answer(store, "x", "", t0, t0 + 60, 20, "sum")[()] == [
        (t0, float(sum(range(20)))),
        (t0 + 20, float(sum(range(20, 40)))),
        (t0 + 40, float(sum(range(40, 60)))),
    ]
    assert answer(store, "x", "", t0 + 1000, t0 + 2000, 60, "avg") == {}
    assert answer(store, "nothing", "", t0, t0 + 60, 60, "avg") == {}


def test_label_filters(store: MetricsStore) -> None:
    points = [
        Point("up", NOW - 10, 1.0, {"host": "a", "role": "primary"}),
        Point("up", NOW - 10, 2.0, {"host": "b", "role": "replica"}),
        Point("up", NOW - 10, 3.0, {"host": "c"}),
    ]
    store.append(frames_from_points(points), 1)

    def hosts(labels: str) -> set[str]:
        return {dict(k)["host"] for k in answer(store, "up", labels, NOW - 60, NOW, 60, "max")}

    assert hosts("") == {"a", "b", "c"}
    assert hosts("role=primary") == {"a"}
    assert hosts("role!=primary") == {"b", "c"}
    assert hosts("role=") == {"c"}  # a missing label matches the empty value
    assert hosts("host=b,role=replica") == {"b"}
    assert hosts("host=zzz") == set()
    assert [i.labels["host"] for i in store.series("up", parse_labels("role!=replica"))] == ["a", "c"]


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"agg": "median"}, "agg"),
        ({"start": "200", "end": "100"}, "after"),
        ({"step": "0"}, "at least 1 ms"),
        ({"step": "-5"}, "not a duration"),
        ({"step": "fast"}, "not a duration"),
        ({"start": "0", "end": str(NOW), "step": "1s"}, f"at most {MAX_BUCKETS}"),
        ({"start": "yesterday"}, "not a time"),
        ({"end": "1e20"}, "between 0"),
        ({"labels": "host"}, "key=value"),
        ({"labels": "a b=c"}, "key=value"),
        ({"series": "9x"}, "series"),
    ],
)
def test_bad_query_parameters(params: dict[str, str], fragment: str) -> None:
    args = {"series": "cpu", "labels": None, "start": None, "end": None, "step": None, "agg": "avg", **params}
    with pytest.raises(BadQuery) as info:
        make_query(args["series"], args["labels"], args["start"], args["end"], args["step"], args["agg"], NOW)
    assert fragment in info.value.message


def test_relative_times_and_durations() -> None:
    q = make_query("cpu", None, "now-2h", "-30m", "5m", "avg", NOW)
    assert (q.start, q.end, q.step) == (NOW - 7200, NOW - 1800, 300)
    q = make_query("cpu", None, None, None, None, "p95", NOW)
    assert (q.start, q.end, q.step) == (NOW - 3600, NOW, 60)


# ---- rollups, retention, restart --------------------------------------------------------------------------


def test_rollups_answer_once_raw_is_gone(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m.duckdb", raw_retention=1800, rollup_step=60, rollup_retention=86400)
    points = sample_points(4000, seed=3, span_s=7200)
    store.append(frames_from_points(points), 1)
    samples = to_samples(points)
    done = store.maintain(NOW)
    assert done["rolled"] > 0
    assert done["raw_deleted"] > 0
    floor_s = store.raw_floor / 1000
    assert floor_s % 60 == 0
    assert NOW - 1800 - 60 < floor_s <= NOW - 1800
    raw_left = store.con.execute("SELECT count(*), min(ts) FROM raw").fetchone()
    assert raw_left is not None
    assert raw_left[1] >= store.raw_floor
    assert raw_left[0] == sum(1 for s in samples if s[2] >= store.raw_floor)
    # Steps that are multiples of rollup_step: count, sum, avg, min and max come out exactly as from raw.
    for agg in ("count", "sum", "avg", "min", "max"):
        for step in (60, 600):
            want = model(samples, "cpu", "host=a", NOW - 7200, NOW, step, agg)
            assert_same(answer(store, "cpu", "host=a", NOW - 7200, NOW, step, agg), want)
    # p95 at rollup_step is exact; coarser, the rollup range reports the highest per-minute p95.
    assert_same(
        answer(store, "cpu", "", NOW - 7200, NOW, 60, "p95"),
        model(samples, "cpu", "", NOW - 7200, NOW, 60, "p95"),
    )
    coarse = answer(store, "cpu", "host=b", NOW - 7200, floor_s, 600, "p95")
    minute = answer(store, "cpu", "host=b", NOW - 7200, floor_s, 60, "p95")
    for key, buckets in coarse.items():
        for b, v in buckets:
            assert v == max(m for t, m in minute[key] if b <= t < b + 600)
    # Reopening keeps the positions and the answers.
    before = answer(store, "mem", "", NOW - 7200, NOW, 300, "avg")
    store.close()
    again = open_store(tmp_path / "m.duckdb", raw_retention=1800, rollup_step=60, rollup_retention=86400)
    assert (again.last_seq, again.raw_floor) == (1, round(floor_s * 1000))
    assert_same(answer(again, "mem", "", NOW - 7200, NOW, 300, "avg"), before)
    again.close()


def test_rollup_retention_and_closed_buckets(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m.duckdb", raw_retention=600, rollup_step=60, rollup_retention=3600)
    t0 = NOW - 7200
    store.append(frames_from_points([Point("x", t0 + i * 10, 1.0) for i in range(720)]), 1)
    store.maintain(NOW)
    buckets = [b for (b,) in store.con.execute("SELECT bucket FROM rollup ORDER BY 1").fetchall()]
    # Rollups older than an hour are gone; the newest rolled bucket ended at least a step before now.
    assert min(buckets) >= (NOW - 3600) * 1000
    assert max(buckets) + 60_000 <= (NOW - 60) * 1000
    assert store.rolled_through == max(buckets) + 60_000
    # Once every point and rollup of a series has expired, the series is forgotten.
    store.append(frames_from_points([Point("y", NOW + 5000, 1.0)]), 2)
    assert [i.series for i in store.series()] == ["x", "y"]
    done = store.maintain(NOW + 5400)
    assert done["series_deleted"] == 1
    assert [i.series for i in store.series()] == ["y"]
    store.close()
    assert [i.series for i in open_store(tmp_path / "m.duckdb").series()] == ["y"]


def test_late_points_redo_their_rollup_and_too_old_ones_are_dropped(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m.duckdb", raw_retention=1800, rollup_step=60, rollup_retention=86400)
    t0 = 1_799_996_400.0  # NOW - 3600, a multiple of 60
    store.append(frames_from_points([Point("x", t0 + i, 1.0) for i in range(3600)]), 1)
    store.maintain(NOW)
    late_bucket = NOW - 600  # rolled already (before rolled_through), still in raw
    assert late_bucket * 1000 < store.rolled_through
    assert late_bucket * 1000 >= store.raw_floor
    result = store.append(
        frames_from_points([Point("x", late_bucket + 5, 100.0), Point("x", t0 + 5, 100.0)]),  # t0: under the raw floor
        2,
    )
    assert (result.points, result.dropped) == (1, 1)
    store.maintain(NOW)
    row = store.con.execute(
        "SELECT count, sum, max FROM rollup WHERE bucket = ?", [round(late_bucket * 1000)]
    ).fetchone()
    assert row == (61, 160.0, 100.0)
    # Once that minute leaves raw, the rollup still has the late point.
    store.maintain(NOW + 1800)
    assert store.raw_floor > late_bucket * 1000
    assert answer(store, "x", "", late_bucket, late_bucket + 60, 60, "sum")[()] == [(late_bucket, 160.0)]
    assert answer(store, "x", "", t0, t0 + 60, 60, "count")[()] == [(t0, 60.0)]


def test_append_is_atomic_with_the_sequence(tmp_path: Path) -> None:
    store = open_store(tmp_path / "m.duckdb")
    store.append(frames_from_points([Point("x", NOW, 1.0)]), 5)
    bad = [PointFrame(["y"], [1], b"\0" * 8, b"\0" * 8)]
    store.con.execute("DROP TABLE raw")  # the next insert fails after the new series row went in
    with pytest.raises(duckdb.Error):
        store.append(bad, 6)
    assert store.last_seq == 5
    assert store.con.execute("SELECT value FROM meta WHERE key = 'last_seq'").fetchone() == (5,)
    assert store.con.execute("SELECT count(*) FROM series").fetchone() == (1,)
    assert [i.series for i in store.series()] == ["x"]
    store.close()


# ---- property: any data, any query, same answer as the model ---------------------------------------------

point_st = st.builds(
    Point,
    series=st.sampled_from(["a", "b"]),
    ts=st.integers(0, 3_600_000).map(lambda ms: NOW - 3600 + ms / 1000),
    value=st.floats(-1e6, 1e6, allow_nan=False).map(lambda v: round(v, 3)),
    labels=st.dictionaries(st.sampled_from(["k", "j"]), st.sampled_from(["1", "2"]), max_size=2),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    points=st.lists(point_st, max_size=120),
    start_ms=st.integers(0, 3_600_000),
    length_ms=st.integers(0, 3_600_000),
    step=st.sampled_from([0.5, 1, 7, 60, 333, 3600]),
    agg=st.sampled_from(AGGS),
    labels=st.sampled_from(["", "k=1", "k!=1", "j=2,k=1"]),
    batches=st.integers(1, 3),
)
def test_query_matches_the_model(
    points: list[Point], start_ms: int, length_ms: int, step: float, agg: str, labels: str, batches: int
) -> None:
    store = open_store(":memory:")
    try:
        size = max(1, len(points) // batches)
        for seq, i in enumerate(range(0, len(points), size), start=1):
            store.append(frames_from_points(points[i : i + size]), seq)
        start = NOW - 3600 + start_ms / 1000
        end = min(NOW, start + length_ms / 1000)
        if math.floor(end / step) - math.floor(start / step) + 1 > MAX_BUCKETS:
            return
        for series in ("a", "b"):
            want = model(to_samples(points), series, labels, start, end, step, agg)
            assert_same(answer(store, series, labels, start, end, step, agg), want)
    finally:
        store.close()


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    points=st.lists(point_st, min_size=1, max_size=150),
    start_ms=st.integers(0, 3_600_000),
    length_ms=st.integers(0, 3_600_000),
    step=st.sampled_from([1, 7, 60, 90, 600]),
    agg=st.sampled_from(AGGS),
    labels=st.sampled_from(["", "k=1", "j!=2"]),
    later_s=st.integers(0, 3600),
)
def test_query_across_rollups_matches_the_model(
    points: list[Point], start_ms: int, length_ms: int, step: float, agg: str, labels: str, later_s: int
) -> None:
    store = open_store(":memory:", raw_retention=1800, rollup_step=60, rollup_retention=86400)
    try:
        store.append(frames_from_points(points), 1)
        store.maintain(NOW + later_s)  # raw before the floor is deleted: its minutes live on as rollups
        start = NOW - 3600 + start_ms / 1000
        end = min(NOW, start + length_ms / 1000)
        if math.floor(end / step) - math.floor(start / step) + 1 > MAX_BUCKETS:
            return
        for series in ("a", "b"):
            want = model(to_samples(points), series, labels, start, end, step, agg, floor_ms=store.raw_floor)
            assert_same(answer(store, series, labels, start, end, step, agg), want)
    finally:
        store.close()
