"""Metrics ingest and query: points/s through the JetStream stream into DuckDB, and a 10M-point range query.

    python bench/metrics.py [--quick] [--points N] [--query-points N] [--http-points N] [--publishers P]
                            [--repeats R]

One `fleetmate serve` (embedded nats-server with fsync before every ack, one worker) in a temporary
directory. Publisher processes connect to its NATS and publish pre-built MessagePack point frames
(what an agent sends, 5,000 points a message) with pipelined JetStream publishes; the clock runs from
the first publish until the replica reports every point committed to DuckDB (queryable).

  backfill   --query-points points of one series spread over the last 23 h (the data the query reads)
  live       --points points with current timestamps over 1,000 series (hosts)
  http       --http-points points POSTed as JSON (1,000 a request, 4 connections per publisher process)
             to /api/v1/metrics/points; the API path: JSON decode, checks, publish, then the same consumer
  query      GET /api/v1/metrics/query over the backfilled series, 24 h at a 1-minute step (1,440
             buckets), repeated; avg and p95, p50/p99 of the HTTP round trip; the count agg is checked
             against the number of points sent

--quick: 1M live points, 2M query points, 200k HTTP points, 5 repeats (a smoke run). Targets (issue 7): ingest >= 500k
points/s, query <= 200 ms. Prints a table and writes bench/results/metrics.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import random
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import progress, summary, write_result
from tests.harness import Fleetmate, free_port, running, wait_for

POINTS_PER_MESSAGE = 5000
LIVE_SERIES = 1000
QUERY_SPAN_S = 23 * 3600
INGEST_TARGET = 500_000
QUERY_TARGET_MS = 200.0
HTTP_POINTS_PER_REQUEST = 1000
HTTP_CONNECTIONS = 4  # per publisher process


def _messages(kind: str, worker: int, workers: int, total: int, now: float) -> list[bytes]:
    """This worker's share of the payloads (built before the clock starts)."""
    from app.services.metrics.messages import PointFrame, encode_frame, series_key

    share = total // workers + (1 if worker < total % workers else 0)
    first = sum(total // workers + (1 if w < total % workers else 0) for w in range(worker))
    rng = random.Random(worker)
    query_key = series_key("bench_query", {"host": "q"})
    live_keys = [series_key("bench_live", {"host": f"h{h:04d}"}) for h in range(LIVE_SERIES)]
    out = []
    if kind == "http":
        for start in range(first, first + share, HTTP_POINTS_PER_REQUEST):
            n = min(HTTP_POINTS_PER_REQUEST, first + share - start)
            points = [
                {"series": "bench_http", "ts": now + (start + i) / 1e6, "value": rng.uniform(0, 100),
                 "labels": {"host": f"h{(start + i) % 100:02d}"}}
                for i in range(n)
            ]  # fmt: skip
            out.append(json.dumps({"points": points}).encode())
        return out
    for start in range(first, first + share, POINTS_PER_MESSAGE):
        n = min(POINTS_PER_MESSAGE, first + share - start)
        values = array("d", (rng.uniform(0, 100) for _ in range(n)))
        if kind == "backfill":
            # One series; point i at a fixed pace over the span, so the whole range is covered.
            ts = array("q", (round((now - QUERY_SPAN_S + (start + i) * QUERY_SPAN_S / total) * 1000) for i in range(n)))
            frame = PointFrame([query_key], [n], ts.tobytes(), values.tobytes())
        else:
            # Every host reports a few points a message, all stamped about now (a live fleet).
            hosts = min(LIVE_SERIES, n)
            counts = [n // hosts + (1 if h < n % hosts else 0) for h in range(hosts)]
            ts = array("q", (round(now * 1000) + i for i in range(n)))
            offset = (start // POINTS_PER_MESSAGE) % LIVE_SERIES
            keys = [live_keys[(offset + h) % LIVE_SERIES] for h in range(hosts)]
            frame = PointFrame(keys, counts, ts.tobytes(), values.tobytes())
        out.append(encode_frame(frame))
    return out


def _publisher(url: str, kind: str, worker: int, workers: int, total: int, now: float, go: Any, conn: Any) -> None:
    import nats

    payloads = _messages(kind, worker, workers, total, now)
    conn.send(len(payloads))
    go.wait()

    async def post_all() -> float:
        queue = list(reversed(payloads))
        headers = {"Content-Type": "application/json"}

        async def client_loop(client: httpx.AsyncClient) -> None:
            while queue:
                reply = await client.post("/api/v1/metrics/points", content=queue.pop(), headers=headers)
                reply.raise_for_status()

        started = time.monotonic()
        async with httpx.AsyncClient(base_url=url, timeout=60) as client:
            await asyncio.gather(*(client_loop(client) for _ in range(HTTP_CONNECTIONS)))
        return time.monotonic() - started

    if kind == "http":
        conn.send(asyncio.run(post_all()))
        return

    async def run() -> float:
        nc = await nats.connect(url)
        js = nc.jetstream(publish_async_max_pending=256)
        started = time.monotonic()
        for payload in payloads:
            await js.publish_async(f"fleetmate.metrics.points.bench-{worker}", payload)
        await js.publish_async_completed()
        elapsed = time.monotonic() - started
        await nc.close()
        return elapsed

    conn.send(asyncio.run(run()))


def ingest(fm: Fleetmate, url: str, kind: str, total: int, publishers: int) -> dict[str, Any]:
    """Publish total points from several processes; time until all are committed at the replica."""
    before = fm.get("/api/v1/metrics/stats").json()["points"]
    now = time.time()
    go = multiprocessing.Event()
    pipes, procs = [], []
    for w in range(publishers):
        parent, child = multiprocessing.Pipe()
        proc = multiprocessing.Process(target=_publisher, args=(url, kind, w, publishers, total, now, go, child))
        proc.start()
        pipes.append(parent)
        procs.append(proc)
    messages = sum(p.recv() for p in pipes)
    server = psutil.Process(fm.proc.pid if fm.proc else 0)
    server.cpu_percent()
    started = time.monotonic()
    go.set()
    publish_s = max(p.recv() for p in pipes)
    for proc in procs:
        proc.join()
    wait_for(
        lambda: fm.get("/api/v1/metrics/stats").json()["points"] >= before + total,
        600,
        f"{total} {kind} points committed",
        interval=0.02,
    )
    elapsed = time.monotonic() - started
    stats = fm.get("/api/v1/metrics/stats").json()
    return {
        "points": total,
        "messages": messages,
        "publishers": publishers,
        "publish_s": round(publish_s, 3),
        "publish_points_s": round(total / publish_s),
        "ingest_s": round(elapsed, 3),
        "ingest_points_s": round(total / elapsed),
        "fleetmate_cpu_pct": round(server.cpu_percent(), 1),
        "batches": stats["batches"],
        "stored": stats["points"] - before,
    }


def query_timings(fm: Fleetmate, agg: str, repeats: int, now: float) -> dict[str, Any]:
    params = {
        "series": "bench_query",
        "labels": "host=q",
        "from": str(now - 24 * 3600),
        "to": str(now + 60),
        "step": "1m",
        "agg": agg,
    }
    times, buckets = [], 0
    with httpx.Client(base_url=fm.url, timeout=30) as client:
        client.get("/api/v1/metrics/query", params=params)  # warm
        for _ in range(repeats):
            started = time.perf_counter()
            reply = client.get("/api/v1/metrics/query", params=params)
            times.append((time.perf_counter() - started) * 1000)
            reply.raise_for_status()
            buckets = len(reply.json()["results"][0]["points"])
    return {**{k: round(v, 2) for k, v in summary(times).items()}, "buckets": buckets}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1M live points, 2M query points, 5 repeats")
    parser.add_argument("--points", type=int, default=None, help="live points to ingest (default 10M)")
    parser.add_argument("--query-points", type=int, default=None, help="points of the queried series (default 10M)")
    parser.add_argument("--http-points", type=int, default=None, help="points to POST over HTTP (default 1M)")
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="query repeats (default 30)")
    args = parser.parse_args()
    live_points = args.points or (1_000_000 if args.quick else 10_000_000)
    http_points = args.http_points or (200_000 if args.quick else 1_000_000)
    query_points = args.query_points or (2_000_000 if args.quick else 10_000_000)
    repeats = args.repeats or (5 if args.quick else 30)
    total = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fm-metrics-bench-") as tmp:
        fm = Fleetmate(
            Path(tmp),
            env={
                "FLEETMATE_HTTP_PORT": str(free_port()),
                "FLEETMATE_ZK_ENABLED": "false",
            },
        )
        with running(fm):
            ready = next(line for line in fm.lines if line.get("msg") == "fleetmate ready")
            nats_url = ready["nats"].split(",")[0]
            progress(f"fleetmate ready at {fm.url}, NATS {nats_url}")
            progress(f"backfill: {query_points:,} points of one series over 23 h")
            backfill = ingest(fm, nats_url, "backfill", query_points, args.publishers)
            progress(f"  {backfill['ingest_points_s']:,} points/s end to end")
            progress(f"live: {live_points:,} points over {LIVE_SERIES} series")
            live = ingest(fm, nats_url, "live", live_points, args.publishers)
            progress(f"  {live['ingest_points_s']:,} points/s end to end")
            progress(f"http: {http_points:,} points as JSON POSTs of {HTTP_POINTS_PER_REQUEST} points")
            http = ingest(fm, fm.url, "http", http_points, args.publishers)
            progress(f"  {http['ingest_points_s']:,} points/s end to end")
            # Let maintenance roll up what it will, so it does not run inside the timed queries.
            time.sleep(6)
            now = time.time()
            with httpx.Client(base_url=fm.url, timeout=60) as client:
                counted = client.get(
                    "/api/v1/metrics/query",
                    params={"series": "bench_query", "from": str(now - 24 * 3600), "to": str(now + 60),
                            "step": "1h", "agg": "count"},
                ).json()["results"][0]["points"]  # fmt: skip
            check = {"points_counted": int(sum(v for _, v in counted)), "points_sent": query_points}
            queries = {agg: query_timings(fm, agg, repeats, now) for agg in ("avg", "p95")}
            for agg, q in queries.items():
                progress(f"query {agg}: p50 {q['p50']:.1f} ms, p99 {q['p99']:.1f} ms over {q['buckets']} buckets")
            stats = fm.get("/api/v1/metrics/stats").json()
            assert fm.stop() == 0
    problems = []
    if check["points_counted"] != check["points_sent"]:
        problems.append(f"count agg found {check['points_counted']} of {check['points_sent']} points")
    print()
    print(f"{'scenario':34}{'points':>12}{'points/s':>12}{'publish pts/s':>15}{'seconds':>9}{'fm cpu %':>10}")
    rows = (
        ("stream: backfill (1 series)", backfill),
        ("stream: live (1,000 series)", live),
        ("HTTP POST (JSON, 100 series)", http),
    )
    for name, r in rows:
        print(
            f"{name:34}{r['points']:>12,}{r['ingest_points_s']:>12,}{r['publish_points_s']:>15,}"
            f"{r['ingest_s']:>9.2f}{r['fleetmate_cpu_pct']:>10.0f}"
        )
    print()
    print(f"{'query (HTTP, 24 h at 1 m)':34}{'points':>12}{'p50 ms':>10}{'p99 ms':>10}{'max ms':>10}{'buckets':>9}")
    for agg, q in queries.items():
        print(f"{agg:34}{query_points:>12,}{q['p50']:>10.1f}{q['p99']:>10.1f}{q['max']:>10.1f}{q['buckets']:>9}")
    best_ingest = max(backfill["ingest_points_s"], live["ingest_points_s"])
    print()
    print(
        f"targets: ingest >= {INGEST_TARGET:,}/s: live {live['ingest_points_s']:,}/s "
        f"({'met' if live['ingest_points_s'] >= INGEST_TARGET else 'NOT met'}); "
        f"query <= {QUERY_TARGET_MS:.0f} ms: avg p50 {queries['avg']['p50']:.0f} ms "
        f"({'met' if queries['avg']['p50'] <= QUERY_TARGET_MS else 'NOT met'})"
    )
    print("problems: " + ("none" if not problems else "; ".join(problems)))
    elapsed = time.monotonic() - total
    path = write_result(
        "metrics",
        {
            "quick": args.quick,
            "setup": "one fleetmate (embedded nats-server, sync_interval always, 1 worker); publishers are "
            f"separate processes publishing {POINTS_PER_MESSAGE}-point MessagePack frames with js.publish_async",
            "ingest": {"backfill": backfill, "live": live, "http": http, "best_points_s": best_ingest},
            "query": {"points": query_points, "range_s": 86400 + 60, "step_s": 60, **queries},
            "check": check,
            "final_stats": stats,
            "targets": {"ingest_points_s": INGEST_TARGET, "query_ms": QUERY_TARGET_MS},
            "problems": problems,
            "elapsed_s": round(elapsed, 1),
        },
    )
    print(f"wrote {path}")
    return 0 if not problems else 3


if __name__ == "__main__":
    sys.exit(main())
