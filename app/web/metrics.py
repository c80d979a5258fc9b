"""Prometheus figures: process, HTTP requests and the bus, in one registry per app."""

from __future__ import annotations

import math
from bisect import bisect_left
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, disable_created_metrics
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from app.node import Node
from app.services.metrics.service import prometheus_families as metrics_families
from app.storage.diskspace import free_bytes
from app.storage.diskspace import guard as disk_guard

disable_created_metrics()  # type: ignore[no-untyped-call]  # *_created series double the output and no dashboard reads them


class _NodeCollector(Collector):
    """Reads bus and node figures at scrape time, so nothing is counted twice."""

    def __init__(self, node: Node) -> None:
        self.node = node

    def collect(self) -> Iterator[Metric]:
        node = self.node
        yield GaugeMetricFamily("fleetmate_uptime_seconds", "Seconds since the process started", node.uptime())
        bus = node.bus
        yield GaugeMetricFamily(
            "fleetmate_bus_connected", "1 while connected to NATS", 1.0 if bus and bus.connected else 0.0
        )
        stats = bus.stats() if bus else {}
        for key, help_text in (
            ("in_msgs", "Messages received from NATS"),
            ("out_msgs", "Messages sent to NATS"),
            ("in_bytes", "Bytes received from NATS"),
            ("out_bytes", "Bytes sent to NATS"),
            ("reconnects", "Reconnections to NATS"),
            ("errors_received", "Protocol errors received from NATS"),
        ):
            yield CounterMetricFamily(f"fleetmate_bus_{key}", help_text, value=float(stats.get(key, 0)))
        if node.zk_counters is not None:
            zk = node.zk_counters()
            yield CounterMetricFamily(
                "fleetmate_zk_connections_refused",
                "ZooKeeper connections closed at once: their address held zk.max_client_cnxns",
                value=float(zk["refused"]),
            )
            yield CounterMetricFamily(
                "fleetmate_zk_requests_throttled",
                "ZooKeeper requests that waited for the rate limit",
                value=float(zk["throttled"]),
            )
        yield GaugeMetricFamily(
            "fleetmate_disk_writes_refused",
            "1 while client writes are refused (disk full)",
            1.0 if disk_guard.reason else 0.0,
        )
        yield CounterMetricFamily(
            "fleetmate_disk_refused_writes",
            "Client writes refused because the disk was full",
            value=float(disk_guard.refused),
        )
        if disk_guard.path is not None:
            try:
                free = float(free_bytes(disk_guard.path))
            except OSError:
                free = math.nan
            yield GaugeMetricFamily("fleetmate_disk_free_bytes", "Free bytes in the data directory's file system", free)
        registry = node.registry
        if registry is not None:
            figures = registry.stats()
            gauge, counter = GaugeMetricFamily, CounterMetricFamily
            for key, family, value, help_text in (
                ("log_applied_seq", gauge, figures.applied_seq, "Last log sequence applied by this replica"),
                ("log_applied_entries", counter, figures.applied_entries, "Log entries applied"),
                (
                    "log_applied_commands",
                    counter,
                    figures.applied_commands,
                    "Commands applied (one revision each when they succeed)",
                ),
                ("log_appended_entries", counter, figures.appended_entries, "Log entries this replica appended"),
                ("log_appended_commands", counter, figures.appended_commands, "Commands this replica appended"),
                ("log_apply_seconds", counter, figures.apply_seconds, "Seconds spent applying and committing entries"),
                ("revision", gauge, figures.revision, "Applied registry revision"),
                ("nodes", gauge, figures.nodes, "Znodes"),
                ("sessions", gauge, figures.sessions, "Open sessions"),
                ("watches", gauge, figures.watches, "Watches on this replica"),
                ("sessions_expired", counter, figures.sessions_expired, "Sessions this leader expired"),
            ):
                yield family(f"fleetmate_registry_{key}", help_text, value=float(value))
            snaps = registry.snapshots
            age = snaps.age()
            yield GaugeMetricFamily(
                "fleetmate_snapshot_age_seconds",
                "Seconds since the newest known snapshot was taken (-1: none yet)",
                -1.0 if age is None else age,
            )
            yield GaugeMetricFamily(
                "fleetmate_snapshot_seq",
                "Log sequence of the newest known snapshot",
                snaps.last.seq if snaps.last else 0,
            )
            yield CounterMetricFamily("fleetmate_snapshots_taken", "Snapshots this replica took", snaps.taken)
            yield CounterMetricFamily(
                "fleetmate_snapshot_failures", "Snapshots that failed to save or restore", snaps.failures
            )
            yield GaugeMetricFamily(
                "fleetmate_log_trimmed_through_seq", "The log was trimmed through this sequence", snaps.trimmed_to
            )
            yield GaugeMetricFamily(
                "fleetmate_registry_log_lag",
                "Log entries behind the most advanced replica heard from",
                max(0, node.newest_applied_seq() - figures.applied_seq),
            )
        members = node.membership
        if members is not None:
            states = members.states()
            per_node = GaugeMetricFamily(
                "fleetmate_node_state", "1 for each node's current state (membership)", labels=["node", "state"]
            )
            for member, member_state in sorted(states.items()):
                per_node.add_metric([member, member_state], 1.0)
            yield per_node
            counts = GaugeMetricFamily("fleetmate_nodes", "Nodes per membership state", labels=["state"])
            for name in ("online", "suspect", "down", "maintenance"):
                counts.add_metric([name], float(sum(1 for s in states.values() if s == name)))
            yield counts
        if node.metrics is not None:
            yield from metrics_families(node.metrics)
        lead = node.leadership
        if lead is not None:
            yield GaugeMetricFamily("fleetmate_lease_leader", "1 while this replica holds the lease", lead.leading)
            holder = GaugeMetricFamily("fleetmate_lease_holder", "The lease holder (label), 1", labels=["node_id"])
            if lead.holder is not None:
                holder.add_metric([lead.holder.holder], 1.0)
            yield holder
            yield CounterMetricFamily(
                "fleetmate_lease_changes", "Times this replica took or lost the lease", value=lead.changes
            )
        if node.kv is not None:
            yield from _kv_families(node.kv.stats())
        emb = node.embedded
        if emb is not None:
            yield CounterMetricFamily(
                "fleetmate_nats_embedded_restarts",
                "Unexpected exits of the embedded nats-server",
                emb.restarts,
            )
            yield GaugeMetricFamily(
                "fleetmate_nats_embedded_up", "1 while the embedded nats-server runs", 1.0 if emb.pid else 0.0
            )
            if emb.pid:
                try:
                    import psutil

                    rss = psutil.Process(emb.pid).memory_info().rss
                except Exception:
                    rss = 0
                yield GaugeMetricFamily(
                    "fleetmate_nats_embedded_resident_memory_bytes", "RSS of the embedded nats-server", rss
                )


def _kv_families(stats: dict[str, Any]) -> Iterator[Metric]:
    """The KV store's figures: shards and bytes held here, per partition applied sequence, the counters."""
    for key, help_text in (
        ("forwarded", "KV requests sent to the replica holding their shard"),
        ("retried", "KV requests routed again (a split or move came first)"),
        ("copies_in", "Shard copies taken from other replicas"),
        ("copies_out", "Shard copies given to other replicas"),
        ("copy_failures", "Shard copies that failed (tried again)"),
        ("leader_moves", "Partition NATS leaders moved by this replica"),
    ):
        yield CounterMetricFamily(f"fleetmate_kv_{key}", help_text, value=float(stats[key]))
    yield GaugeMetricFamily("fleetmate_kv_shards_held", "Shard copies held here", float(stats["shards_held"]))
    yield GaugeMetricFamily("fleetmate_kv_bytes_held", "Key and value bytes held here", float(stats["bytes_held"]))
    yield GaugeMetricFamily("fleetmate_kv_watches", "Watches served from here", float(stats["watches"]))
    applied = GaugeMetricFamily("fleetmate_kv_applied_seq", "Applied sequence per partition", labels=["partition"])
    for p, seq in stats["applied"].items():
        applied.add_metric([str(p)], float(seq))
    yield applied


LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
MAX_SERIES = 10_000  # (method, route, status) combinations kept; routes are templates, so few


class RequestFigures(Collector):
    """Requests per (method, route, status) and their latency per (method, route), as plain numbers.

    Every request lands here, so recording is a few list and dict operations on the event loop
    (prometheus_client's Counter and Histogram take a lock per increment, four per request); the
    Prometheus families are built at scrape time.
    """

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str, int], int] = {}
        # (method, route) -> [per-bucket counts (the last one is +Inf)..., sum of seconds]
        self.latency: dict[tuple[str, str], list[float]] = {}
        self.fast = 0  # requests answered by the lean path (app.web.fastpath)

    def record(self, method: str, route: str, status: int, seconds: float) -> None:
        """Count one request and its latency."""
        key = (method, route, status)
        counts = self.counts
        if key in counts:
            counts[key] += 1
        elif len(counts) < MAX_SERIES:
            counts[key] = 1
        series = self.latency.get((method, route))
        if series is None:
            if len(self.latency) >= MAX_SERIES:
                return
            series = self.latency[(method, route)] = [0.0] * (len(LATENCY_BUCKETS) + 2)
        series[bisect_left(LATENCY_BUCKETS, seconds)] += 1
        series[-1] += seconds

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "fleetmate_http_requests",
            "HTTP requests by method, route template and status",
            labels=["method", "route", "status"],
        )
        for (method, route, status), count in list(self.counts.items()):
            requests.add_metric([method, route, str(status)], float(count))
        yield requests
        latency = HistogramMetricFamily(
            "fleetmate_http_request_duration_seconds",
            "HTTP request latency by method and route template",
            labels=["method", "route"],
        )
        for (method, route), series in list(self.latency.items()):
            cumulative = 0.0
            buckets: list[tuple[str, float]] = []
            for bound, observed in zip((*LATENCY_BUCKETS, math.inf), series, strict=False):
                cumulative += observed
                buckets.append((repr(bound) if bound != math.inf else "+Inf", cumulative))
            latency.add_metric([method, route], buckets, series[-1])
        yield latency
        yield CounterMetricFamily(
            "fleetmate_http_fast_path", "Node gets and sets answered by the lean path", value=float(self.fast)
        )


class HttpMetrics:
    """The app's registry with the HTTP request counter and latency histogram."""

    def __init__(self, node: Node) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        self.registry.register(_NodeCollector(node))
        self.requests = RequestFigures()
        self.registry.register(self.requests)
        self.limits = Gauge(
            "fleetmate_rate_limit_per_second",
            "Configured request rate limits (0: off)",
            ["scope"],
            registry=self.registry,
        )
        self.throttled = Counter(
            "fleetmate_rate_limited", "Requests refused with 429 by the rate limit", registry=self.registry
        )

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The scrape body and its Content-Type, in the format the Accept header asks for, as
        prometheus_client's own exposition negotiates it (Prometheus text 0.0.4 when nothing is asked).
        The Content-Type is sent as it is: one charset (a second one fails Go's mime parser)."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
