"""Shard loads: from the data nodes' heartbeats, kept as series in the metrics store, read back smoothed.

The leader records each shard's size and load (reads + writes a second at its leader) as the
points `fleetmate_shard_load` and `fleetmate_shard_bytes` (labels cluster, shard), then reads the
load back averaged over the last few load intervals: the hot-shard scheduler acts on that
average, written into the scheduler log (RecordLoad), so one spike does not move a shard and
every replica decides from the same numbers. The same series chart shard load over time.
"""

from __future__ import annotations

import logging
import time
from typing import Protocol

from app.services.metrics.messages import IngestReply, Point, QueryReply
from app.services.scheduler.model import Cluster
from app.services.scheduler.protocol import Heartbeat

log = logging.getLogger("fleetmate.scheduler")

LOAD_SERIES = "fleetmate_shard_load"
SIZE_SERIES = "fleetmate_shard_bytes"
WINDOW_INTERVALS = 3  # the average covers this many load intervals
COMMIT_WAIT_S = 2.0


class MetricsStore(Protocol):
    """What the loads need from the metrics service (app/services/metrics/service.py)."""

    async def publish(self, points: list[Point]) -> IngestReply: ...
    async def wait_committed(self, seq: int, timeout: float = 10.0) -> None: ...
    async def query(
        self,
        series: str,
        labels: str | None = None,
        start: str | None = None,
        end: str | None = None,
        step: str | None = None,
        agg: str = "avg",
    ) -> QueryReply: ...


def heard_loads(
    c: Cluster, heard: dict[tuple[str, str], tuple[float, Heartbeat]]
) -> tuple[dict[int, int], dict[int, float]]:
    """Each shard's size (the largest any replica reports) and load (what its leader reports)."""
    name = c.spec.name
    sizes: dict[int, int] = {}
    load: dict[int, float] = {}
    for (cluster, node), (_, hb) in heard.items():
        if cluster != name:
            continue
        for s in hb.shards:
            shard = c.shards.get(s.id)
            if shard is None or shard.replica(node) is None:
                continue
            sizes[s.id] = max(sizes.get(s.id, 0), s.size)
            if shard.leader == node:
                load[s.id] = s.writes_per_s + s.reads_per_s
    return sizes, load


async def smoothed(
    metrics: MetricsStore, cluster: str, sizes: dict[int, int], load: dict[int, float], interval_s: float
) -> dict[int, float]:
    """Record the loads and sizes as points, then each shard's load averaged over the window; the
    heard loads unchanged when the store cannot answer (it is the record, not the judge)."""
    now = time.time()
    points = [Point(LOAD_SERIES, now, v, {"cluster": cluster, "shard": str(s)}) for s, v in load.items()]
    points += [Point(SIZE_SERIES, now, float(v), {"cluster": cluster, "shard": str(s)}) for s, v in sizes.items()]
    window = max(1.0, interval_s * WINDOW_INTERVALS)
    try:
        if points:
            reply = await metrics.publish(points)
            await metrics.wait_committed(reply.seq, COMMIT_WAIT_S)
        labels = f"cluster={cluster}"
        answer = await metrics.query(LOAD_SERIES, labels, f"now-{window:g}", "now", f"{window * 2:g}", "avg")
    except Exception as exc:  # metrics down or full: decide from the heartbeats alone this time
        log.debug("shard loads not read from the metrics store", extra={"cluster": cluster, "error": repr(exc)})
        return load
    out: dict[int, float] = {}
    for result in answer.results:
        shard = result.labels.get("shard", "")
        values = [v for _, v in result.points]
        if shard.isdigit() and values:
            out[int(shard)] = sum(values) / len(values)
    return {s: out.get(s, v) for s, v in load.items()}
