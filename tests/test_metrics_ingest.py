"""Metrics through real processes: HTTP and NATS ingest, queries, bad input, and kill -9 during ingest."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import httpx
import nats
import pytest

from tests.harness import Fleetmate, NatsServer, running, wait_for


def _env(nats_server: NatsServer, **extra: str) -> dict[str, str]:
    return {
        "FLEETMATE_NATS_URL": nats_server.url,
        "FLEETMATE_ZK_ENABLED": "false",
        **extra,
    }


@pytest.fixture
def fm(tmp_path: Path, nats_server: NatsServer) -> Iterator[Fleetmate]:
    with running(Fleetmate(tmp_path / "fm", env=_env(nats_server))) as proc:
        yield proc


def stats(fm: Fleetmate) -> dict[str, Any]:
    body: dict[str, Any] = fm.get("/api/v1/metrics/stats").json()
    return body


def post(fm: Fleetmate, body: Any, wait: bool = True) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(
        f"{fm.url}/api/v1/metrics/points",
        params={"wait": "true"} if wait else None,
        content=content,
        headers={"Content-Type": "application/json"},
        timeout=10,
    )


def query(fm: Fleetmate, **params: Any) -> httpx.Response:
    return httpx.get(f"{fm.url}/api/v1/metrics/query", params=params, timeout=10)


def test_post_then_query_series_and_figures(fm: Fleetmate) -> None:
    t0 = (time.time() // 60 - 10) * 60  # ten minutes ago, on a minute boundary
    points = [
        {"series": "db_qps", "ts": t0 + i, "value": float(i % 60), "labels": {"db": "orders", "role": "primary"}}
        for i in range(300)
    ]
    reply = post(fm, {"points": points})
    assert reply.status_code == 200, reply.text
    first = reply.json()
    assert first["count"] == 300
    assert first["seq"] >= 1
    # A bare list works too.
    reply = post(fm, [{"series": "db_qps", "ts": t0 + 5, "value": 1000, "labels": {"db": "users"}}])
    assert reply.status_code == 200
    assert reply.json()["seq"] == first["seq"] + 1

    got = query(fm, series="db_qps", labels="db=orders", **{"from": t0, "to": t0 + 300}, step="1m", agg="avg")
    assert got.status_code == 200, got.text
    (result,) = got.json()["results"]
    assert result["labels"] == {"db": "orders", "role": "primary"}
    assert result["points"] == [[t0 + 60 * k, 29.5] for k in range(5)]  # 0..59 in every minute
    for agg, want in (("max", 59.0), ("min", 0.0), ("count", 60.0), ("sum", 1770.0), ("p95", 56.05)):
        body = query(fm, series="db_qps", labels="db=orders", **{"from": t0, "to": t0 + 120}, step="60", agg=agg)
        assert [v for _, v in body.json()["results"][0]["points"]] == pytest.approx([want, want]), agg
    both = query(fm, series="db_qps", **{"from": t0, "to": t0 + 60}, agg="max").json()["results"]
    assert {r["labels"]["db"]: r["points"] for r in both} == {"orders": [[t0, 59.0]], "users": [[t0, 1000.0]]}

    listed = fm.get("/api/v1/metrics/series").json()["series"]
    assert {"series": "db_qps", "labels": {"db": "users"}} in listed
    assert len(listed) == 2
    figures = fm.get("/metrics").text
    assert "fleetmate_metrics_ingest_points_total 301.0" in figures
    assert f"fleetmate_metrics_ingest_last_seq {float(first['seq'] + 1)}" in figures
    schema = fm.get("/schema/openapi.json").json()
    assert {"/api/v1/metrics/points", "/api/v1/metrics/query", "/api/v1/metrics/series"} <= schema["paths"].keys()


def test_bad_input_is_refused_and_changes_nothing(fm: Fleetmate) -> None:
    now = time.time()
    good = {"series": "x", "ts": now, "value": 1}
    assert post(fm, [good]).status_code == 200
    before = stats(fm)
    bad_bodies = {
        b'[{"series": "x", "ts": 1700000000, "value": 1e999}]': "finite number",
        json.dumps([good, {**good, "series": "bad name"}]).encode(): "$[1].series",
        json.dumps({"points": [good, {**good, "labels": {"no-dash": "v"}}]}).encode(): "$.points[1].labels",
        json.dumps([{**good, "ts": now * 1000}]).encode(): "seconds since the epoch",
        json.dumps([{**good, "value": None}]).encode(): "$[0].value",
        json.dumps([{**good, "colour": "red"}]).encode(): "colour",
        b"[{": "not valid JSON",
    }
    for body, fragment in bad_bodies.items():
        reply = post(fm, body)
        assert reply.status_code == 400, (body, reply.text)
        assert reply.json()["error"] == "bad_points"
        assert fragment in reply.json()["message"], reply.text
    for params, fragment in (
        ({"series": "x", "agg": "median"}, "agg"),
        ({"series": "x", "from": "200", "to": "100"}, "after"),
        ({"series": "x", "step": "0"}, "step"),
        ({"series": "x", "from": "0", "step": "1s"}, "buckets"),
        ({"series": "x", "labels": "nokey"}, "labels"),
    ):
        reply = query(fm, **params)
        assert reply.status_code == 400, reply.text
        assert reply.json()["error"] == "bad_query"
        assert fragment in reply.json()["message"]
    # Nothing reached the stream: the next good write takes the very next sequence.
    after = post(fm, [good]).json()
    assert after["seq"] == before["last_seq"] + 1
    assert stats(fm)["points"] == before["points"] + 1
    assert [s["series"] for s in fm.get("/api/v1/metrics/series").json()["series"]] == ["x"]


def test_nats_clients_publish_points(fm: Fleetmate, nats_server: NatsServer) -> None:
    now = time.time()

    async def talk() -> tuple[dict[str, Any], dict[str, str], int]:
        nc = await nats.connect(nats_server.url)
        try:
            # Request/reply: validated, answered after the stream's ack.
            reply = await nc.request(
                "fleetmate.metrics.ingest",
                json.dumps(
                    {"points": [{"series": "app_jobs", "ts": now, "value": 7, "labels": {"app": "a"}}]}
                ).encode(),
                timeout=5,
            )
            refused = await nc.request("fleetmate.metrics.ingest", b'[{"series": "app_jobs"}]', timeout=5)
            # Straight onto the stream subject, as JSON: stored by JetStream, checked by each replica.
            js = nc.jetstream()
            await js.publish("fleetmate.metrics.points.app-b", b"this is not a point batch")
            ack = await js.publish(
                "fleetmate.metrics.points.app-b",
                json.dumps([{"series": "app_jobs", "ts": now, "value": 9, "labels": {"app": "b"}}]).encode(),
            )
            return json.loads(reply.data), dict(refused.headers or {}), ack.seq
        finally:
            await nc.close()

    accepted, refused, last_seq = asyncio.run(talk())
    assert accepted["count"] == 1
    assert refused.get("Nats-Service-Error-Code") == "400"
    assert "`ts`" in refused["Nats-Service-Error"]
    wait_for(lambda: stats(fm)["last_seq"] >= last_seq, 10, "the stream messages stored")
    assert stats(fm)["rejected_messages"] == 1
    found = query(fm, series="app_jobs", **{"from": now - 60, "to": now + 1}, agg="sum").json()["results"]
    assert sorted((r["labels"]["app"], r["points"][0][1]) for r in found) == [("a", 7.0), ("b", 9.0)]


class Writer(threading.Thread):
    """POSTs batches of uniquely numbered points until stopped; keeps what was acknowledged and what may be."""

    def __init__(self, fm: Fleetmate, worker: int, base_ts: float) -> None:
        super().__init__(daemon=True)
        self.fm, self.worker, self.base_ts = fm, worker, base_ts
        self.acked: set[int] = set()
        self.unknown: set[int] = set()  # the request failed: stored or not, but never twice
        self.stop = threading.Event()
        self.failures = 0

    def run(self) -> None:
        n = 0
        with httpx.Client(timeout=5) as client:
            while not self.stop.is_set():
                ids = [self.worker * 10_000_000 + n + j for j in range(50)]
                n += 50
                body = [
                    {
                        "series": "ingest_check",
                        "ts": self.base_ts + (i % 10_000_000) / 1000,
                        "value": i,
                        "labels": {"w": "x"},
                    }
                    for i in ids
                ]
                try:  # the URL changes when the process restarts (a new port), and is "" meanwhile
                    reply = client.post(f"{self.fm.url}/api/v1/metrics/points", json=body)
                    ok = reply.status_code == 200
                except httpx.HTTPError:
                    ok = False
                if ok:
                    self.acked.update(ids)
                else:
                    self.unknown.update(ids)
                    self.failures += 1
                    time.sleep(0.05)


def test_kill_9_during_ingest_keeps_every_acknowledged_point_exactly_once(
    tmp_path: Path, nats_server: NatsServer
) -> None:
    env = _env(nats_server, FLEETMATE_METRICS_BATCH_POINTS="400", FLEETMATE_METRICS_FLUSH_INTERVAL="0.05")
    fm = Fleetmate(tmp_path / "fm", env=env)
    base_ts = time.time() - 3600
    with running(fm):
        writers = [Writer(fm, w, base_ts + w * 100) for w in (1, 2)]
        for w in writers:
            w.start()
        wait_for(lambda: stats(fm)["points"] >= 2000, 20, "ingest under way")
        fm.kill()  # SIGKILL, mid-ingest
        wait_for(lambda: all(w.failures for w in writers), 10, "writers to notice")
        fm.restart()
        acked_before = sum(len(w.acked) for w in writers)
        wait_for(lambda: sum(len(w.acked) for w in writers) >= acked_before + 2000, 20, "ingest after restart")
        for w in writers:
            w.stop.set()
            w.join(10)
        # Its sequence is the stream's last: once it is stored, everything before it is too.
        assert post(fm, [{"series": "done", "ts": time.time(), "value": 1}]).status_code == 200
        stored_count = query(
            fm,
            series="ingest_check",
            labels="w=x",
            **{"from": base_ts - 1, "to": base_ts + 1000},
            step="1h",
            agg="count",
        ).json()["results"][0]["points"]
        assert fm.stop() == 0
    acked = set().union(*(w.acked for w in writers))
    maybe = set().union(*(w.unknown for w in writers))
    assert len(acked) >= 4000
    assert any(w.failures for w in writers)
    con = duckdb.connect(str(tmp_path / "fm" / "data" / "metrics.duckdb"), read_only=True)
    try:
        rows = con.execute(
            "SELECT r.value, count(*) FROM raw r JOIN series s ON s.id = r.series_id "
            "WHERE s.name = 'ingest_check' GROUP BY 1"
        ).fetchall()
    finally:
        con.close()
    counts = {int(value): n for value, n in rows}
    assert [v for v, n in counts.items() if n > 1] == []  # nothing stored twice
    assert acked - counts.keys() == set()  # nothing acknowledged lost
    assert counts.keys() <= acked | maybe  # nothing invented
    assert sum(v for _, v in stored_count) == len(counts)  # the API counts the same rows


def test_disabled_metrics_answer_503(tmp_path: Path, nats_server: NatsServer) -> None:
    env = _env(nats_server, FLEETMATE_METRICS_ENABLED="false")
    with running(Fleetmate(tmp_path / "fm", env=env)) as proc:
        reply = post(proc, [{"series": "x", "ts": time.time(), "value": 1}])
        assert reply.status_code == 503
        assert "metrics.enabled = false" in reply.json()["message"]
        assert proc.get("/api/v1/metrics/series").status_code == 503
    assert not (tmp_path / "fm" / "data" / "metrics.duckdb").exists()
