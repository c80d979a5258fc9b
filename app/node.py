"""One fleetmate process: starts the bus (embedded or external) and the services, reports readiness, stops."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Awaitable, Callable

import msgspec
import psutil

from app import __version__, logs
from app.bus import subjects
from app.bus.connection import Bus, client_token, tls_context
from app.bus.embedded import EmbeddedNats, server_token
from app.bus.streams import step_down_if_leading
from app.config import Config
from app.log.host import LogEngine
from app.log.leadership import Leadership
from app.log.lease import registry as lease_backends
from app.log.lease.base import LeaseRecord
from app.services.agent.hostinfo import host_info
from app.services.ha.agents import AgentDirectory
from app.services.ha.service import HaService
from app.services.kv.partition import stream_name
from app.services.kv.service import KvService
from app.services.membership.service import MembershipService
from app.services.metrics.messages import STREAM as METRICS_STREAM
from app.services.metrics.service import MetricsService
from app.services.registry.service import RegistryService
from app.services.scheduler.leader import SchedulerLeader
from app.services.scheduler.primaries import PrimaryBalancer, agent_zones
from app.services.scheduler.service import SchedulerService
from app.services.system.messages import NodeInfo
from app.services.system.service import SystemService
from app.storage.datadir import DataDirLock
from app.storage.diskspace import guard as disk_guard
from app.storage.snapshots import registry as snapshot_stores
from app.storage.snapshots.base import SnapshotStore
from app.supervise import supervisor

log = logging.getLogger("fleetmate.node")

STOP_STEP_TIMEOUT_S = 8.0


class Node:
    """The services of one replica and the bus they share."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.started_at = time.time()
        self._started_mono = time.monotonic()
        self.http_url = ""
        self.zk_address = ""
        self.zk_secure_address = ""  # host:port of the ZooKeeper TLS port ("" when off)
        # The ZooKeeper listener's counters for /metrics (set by whoever starts it): refused, throttled.
        self.zk_counters: Callable[[], dict[str, int]] | None = None
        self.embedded: EmbeddedNats | None = None
        self.bus: Bus | None = None
        self.system: SystemService | None = None
        self.registry: RegistryService | None = None
        self.logs: LogEngine | None = None  # every log this replica follows (the registry's today)
        self.leadership: Leadership | None = None
        self.membership: MembershipService | None = None
        self.metrics: MetricsService | None = None
        self.ha: HaService | None = None
        self.scheduler: SchedulerService | None = None
        self.scheduler_leader: SchedulerLeader | None = None
        self.kv: KvService | None = None
        self.snapshot_store: SnapshotStore | None = None
        self.dir_lock = DataDirLock(cfg.data_path)
        self.stream_replicas = 1
        self.phase = "starting"
        self._proc = psutil.Process(os.getpid())
        self._disk_task: asyncio.Task[None] | None = None

    @property
    def nats_servers(self) -> tuple[str, ...]:
        """The NATS URL(s) this replica uses."""
        if self.embedded is not None:
            return (self.embedded.url,) if self.embedded.url else ()
        return tuple(self.cfg.nats.url)

    async def start(self) -> None:
        """Start the embedded nats-server (if configured), connect, and start the services."""
        cfg = self.cfg
        nats_cfg = cfg.nats
        self.dir_lock.acquire()  # before the embedded nats-server: two on one JetStream store would corrupt it
        disk_guard.configure(cfg.data_path, cfg.disk.min_free_mb << 20)
        disk_guard.check()
        self._disk_task = supervisor.watch(
            asyncio.create_task(disk_guard.run(cfg.disk.check_interval), name="disk-guard"), "the disk space guard"
        )
        if cfg.embedded_nats:
            self.phase = "starting the embedded nats-server"
            token = server_token(
                host=nats_cfg.host, token=nats_cfg.token, token_file=nats_cfg.token_file, data_dir=cfg.data_path
            )
            self.embedded = EmbeddedNats(
                data_dir=cfg.data_path,
                name=cfg.node_id,
                host=nats_cfg.host,
                port=nats_cfg.port,
                sync_always=nats_cfg.sync_always,
                min_free_bytes=cfg.disk.min_free_mb << 20,
                token=token,
            )
            await self.embedded.start()
            tls = None  # the embedded server listens without TLS
        else:
            token = client_token(nats_cfg.token, nats_cfg.token_file)
            tls = tls_context(nats_cfg.tls_ca, nats_cfg.tls_cert, nats_cfg.tls_key)
        self.phase = "connecting to NATS"
        self.bus = Bus(self.nats_servers, name=f"fleetmate-{self.node_id}", token=token, tls=tls)
        await self.bus.connect(cfg.nats.connect_timeout)
        self.stream_replicas = cfg.registry.stream_replicas or min(3, self.bus.cluster_size())
        log.info(
            "log replicas chosen", extra={"replicas": self.stream_replicas, "nats_servers": self.bus.cluster_size()}
        )
        self.phase = "starting services"
        self.system = SystemService(self.bus, self.node_id, self.describe, replicas=self.stream_replicas)
        await self.system.start()
        self.phase = "catching up with the registry log"
        self.snapshot_store = snapshot_stores.create(cfg)
        await self.snapshot_store.open()
        self.logs = LogEngine(self.bus, self.node_id)
        self.registry = RegistryService(
            self.bus,
            msgspec.structs.replace(cfg.registry, stream_replicas=self.stream_replicas),
            cfg.data_path,
            self.node_id,
            snapshot_store=self.snapshot_store,
            snapshot_cfg=cfg.snapshot,
            peers_applied=self._peers_applied,
            engine=self.logs,
        )
        await self.registry.start()
        self.membership = MembershipService(
            self.bus, self.registry, cfg.membership, self.node_id, self.started_at, host_info, self._addresses
        )
        await self.membership.start()
        if cfg.metrics.enabled:
            self.phase = "starting metrics"
            self.metrics = MetricsService(
                self.bus, cfg.metrics, self.node_id, cfg.data_path, replicas=self.stream_replicas
            )
            await self.metrics.start()
        if cfg.scheduler.enabled:
            self.phase = "catching up with the scheduler log"
            self.scheduler = SchedulerService(
                self.bus,
                cfg.scheduler,
                cfg.data_path,
                self.node_id,
                self.logs,
                replicas=self.stream_replicas,
                snapshot_store=self.snapshot_store,
                snapshot_cfg=cfg.snapshot,
                peers_applied=self._peers_applied_scheduler,
            )
            await self.scheduler.start()
            self.scheduler_leader = SchedulerLeader(self.scheduler)
            self.scheduler_leader.metrics = self.metrics
            if cfg.kv.enabled:
                self.phase = "opening the kv partitions"
                self.kv = KvService(
                    self.bus,
                    cfg.kv,
                    cfg.data_path,
                    self.node_id,
                    self.logs,
                    self.scheduler,
                    replicas=self.stream_replicas,
                    address=self.http_url,
                    session_alive=self.registry.has_session,
                )
                await self.kv.start()
        if cfg.ha.enabled:
            membership = self.membership
            agents = AgentDirectory(
                self.bus,
                lambda: {n: (h.at, h.facts) for n, h in membership.heard.items() if h.kind == "agent"},
                cfg.membership.down_after,
            )
            self.ha = HaService(self.registry, cfg.ha, agents=agents)
            if self.scheduler_leader is not None and cfg.scheduler.balance_primaries:
                zones = agent_zones(agents.locate, lambda n: h.labels if (h := membership.heard.get(n)) else {})
                self.scheduler_leader.primaries = PrimaryBalancer(self.ha, cfg.scheduler, zones)
        self.phase = "joining the leader election"
        backend = lease_backends.create(cfg, self.bus, self.stream_replicas)
        self.leadership = Leadership(
            backend,
            LeaseRecord(self.node_id, time.time(), self.http_url),
            cfg.lease.renew_interval,
            on_gain=self._gain_lead,
            on_lose=self._lose_lead,
        )
        self.leadership.start()
        self.phase = "running"
        logs.announce(  # at every log level: the addresses to reach this replica
            log,
            "fleetmate ready",
            {
                "node_id": self.node_id,
                "http": self.http_url,
                "zk": self.zk_address,
                "zk_secure": self.zk_secure_address,
                "nats": ",".join(self.nats_servers),
                "startup_s": round(time.monotonic() - self._started_mono, 3),
            },
        )

    async def _gain_lead(self) -> None:
        """Leader duties start: the registry's first (it appends leader_elected), then membership's."""
        assert self.registry is not None
        await self.registry.become_leader()
        if self.membership is not None:
            await self.membership.lead()
        if self.ha is not None:
            await self.ha.lead()
        if self.scheduler_leader is not None:
            await self.scheduler_leader.lead()
        if self.kv is not None:
            await self.kv.lead()

    async def _lose_lead(self) -> None:
        """Leader duties stop: the kv's, the scheduler's and HA's first, then membership's, then the registry's."""
        if self.kv is not None:
            await self.kv.stop_leading()
        if self.scheduler_leader is not None:
            await self.scheduler_leader.stop()
        if self.ha is not None:
            await self.ha.stop_leading()
        if self.membership is not None:
            await self.membership.stop_leading()
        if self.registry is not None:
            await self.registry.stop_leading()

    def _addresses(self) -> tuple[str, str]:
        """This replica's HTTP URL and ZooKeeper address (for its heartbeat)."""
        return self.http_url, self.zk_address

    async def _step_down_streams(self) -> None:
        """Move the log's, the metrics stream's and the lease bucket's leadership off this replica's NATS server."""
        if self.bus is None or not self.cfg.nats.step_down_on_stop:
            return
        streams = [subjects.REGISTRY_STREAM, f"KV_{subjects.LEASE_BUCKET}"]
        if self.scheduler is not None:
            streams.append(subjects.SCHEDULER_STREAM)
        if self.kv is not None:
            streams.extend(stream_name(p) for p in self.kv.partitions)
        if self.metrics is not None:
            streams.append(METRICS_STREAM)
        await step_down_if_leading(self.bus.nc, streams, self.bus.server_name)

    async def _peers_applied(self) -> list[int]:
        """The applied log sequence of every other live replica (the log is not trimmed past them)."""
        if self.system is None:
            return []
        return [r.applied_seq for r in await self.system.replicas() if r.node_id != self.node_id]

    async def _peers_applied_scheduler(self) -> list[int]:
        """The scheduler log is trimmed only behind its snapshots (replicas do not announce its sequence):
        a replica behind a trimmed log restores the newest snapshot."""
        return []

    def newest_applied_seq(self) -> int:
        """The highest applied sequence among this replica and the others' last announcements."""
        mine = self.registry.applied_seq if self.registry else 0
        if self.system is None:
            return mine
        return max([mine, *(r.applied_seq for r in self.system.known())])

    def uptime(self) -> float:
        """Seconds since this process started."""
        return time.monotonic() - self._started_mono

    def describe(self) -> NodeInfo:
        """This replica as NodeInfo; the role and leader come from the lease."""
        lead = self.leadership
        leading = lead is not None and lead.leading
        holder = lead.holder if lead is not None else None
        return NodeInfo(
            node_id=self.node_id,
            role="leader" if leading else "follower",
            leader_id=self.node_id if leading else (holder.holder if holder else ""),
            version=__version__,
            started_at=self.started_at,
            uptime_s=round(self.uptime(), 3),
            http_url=self.http_url,
            zk_address=self.zk_address,
            zk_secure_address=self.zk_secure_address,
            nats_servers=self.nats_servers,
            nats_connected_url=self.bus.connected_url if self.bus else "",
            embedded_nats=self.embedded is not None,
            pid=os.getpid(),
            rss_bytes=self._proc.memory_info().rss,
            revision=self.registry.revision if self.registry else 0,
            applied_seq=self.registry.applied_seq if self.registry else 0,
        )

    async def not_ready(self) -> str | None:
        """None when ready to serve; otherwise the reason."""
        if supervisor.failure is not None:
            return supervisor.failure
        if self.phase != "running":
            return self.phase
        if self.embedded is not None and not self.embedded.running.is_set():
            return f"embedded nats-server is down (last exit code {self.embedded.last_exit}); restarting"
        assert self.bus is not None
        if self.registry is not None and self.registry.failed:
            return self.registry.failed
        if self.scheduler is not None and self.scheduler.log.failed:
            return self.scheduler.log.failed
        return await self.bus.jetstream_ok()

    async def stop(self) -> None:
        """Stop services, close the bus, stop the embedded server; each step bounded in time."""
        self.phase = "stopping"
        if self._disk_task is not None:
            self._disk_task.cancel()
        steps: list[tuple[str, Callable[[], Awaitable[None]] | None]] = [
            ("stream leader step-down", self._step_down_streams if self.stream_replicas > 1 else None),
            ("leadership", self.leadership.stop if self.leadership else None),
            ("lease backend", self.leadership.backend.close if self.leadership else None),
            ("ha", self.ha.stop if self.ha else None),
            ("metrics", self.metrics.stop if self.metrics else None),
            ("kv", self.kv.stop if self.kv else None),
            ("scheduler", self.scheduler.stop if self.scheduler else None),
            ("membership", self.membership.stop if self.membership else None),
            ("registry", self.registry.stop if self.registry else None),
            ("system", self.system.stop if self.system else None),
            ("snapshot store", self.snapshot_store.close if self.snapshot_store else None),
            ("bus", self.bus.close if self.bus else None),
            ("embedded nats-server", self.embedded.stop if self.embedded else None),
        ]
        for name, step in steps:
            if step is None:
                continue
            try:
                # The registry's step may end with a snapshot, bounded by snapshot.on_stop_timeout.
                extra = self.cfg.snapshot.on_stop_timeout if name in ("registry", "scheduler") else 0.0
                await asyncio.wait_for(step(), STOP_STEP_TIMEOUT_S + extra)
            except TimeoutError:
                log.error("a shutdown step did not finish in time; going on", extra={"step": name})
            except Exception as exc:
                log.error("a shutdown step failed; going on", extra={"step": name, "error": repr(exc)})
        self.dir_lock.release()
        log.info("fleetmate stopped", extra={"node_id": self.node_id})
