"""The agent on the bus: heartbeats, facts when they change, scheduled log cleanup, nats.micro endpoints.

Subjects and payloads are described in app/services/agent/messages.py. Every collector that
blocks (psutil, `--version` probes, directory walks) runs in a worker thread, so a slow disk or
a hung binary never delays a heartbeat.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar
from urllib.parse import urlsplit

import msgspec
from nats.micro.service import Service

from app import __version__
from app.bus import subjects
from app.bus.connection import Bus
from app.bus.micro import Endpoint, HandlerError, start_service
from app.config import Config
from app.services.agent import logclean, pgrejoin
from app.services.agent.engines import scan_engines
from app.services.agent.hostinfo import host_info
from app.services.agent.messages import (
    CleanRequest,
    CleanResult,
    EngineScan,
    FreePortsRequest,
    Heartbeat,
    HostInfo,
    ListeningPorts,
    LogCleanReport,
    LogRule,
    NetStatus,
    NodeFacts,
    PgRejoinRequest,
    Target,
)
from app.services.agent.netstatus import net_status
from app.services.agent.ports import free_ports, listening_ports
from app.services.agent.sockdiag import Socket, listening_fingerprint
from app.services.metrics.messages import encode_points, points_from_host, subject_for

log = logging.getLogger("fleetmate.agent")

T = TypeVar("T")
S = TypeVar("S", bound=msgspec.Struct)

LOG_REPORTS_KEPT = 50
LOG_PATHS_KEPT = 200  # deleted and skipped paths kept per report in the facts
PORTS_FULL_SCAN_EVERY_S = 60.0  # also rescan when no socket changed, for owners that changed
PROBE_TIMEOUT_S = 2.0

_encoder = msgspec.json.Encoder()


def encode(msg: msgspec.Struct) -> bytes:
    """JSON for the bus (the agent's payloads are JSON, see messages.py)."""
    return _encoder.encode(msg)


def decode_request(data: bytes, type_: type[S], what: str) -> S:
    """A request body as `type_` (an empty body means the defaults); HandlerError 400 when malformed."""
    try:
        return msgspec.json.decode(data or b"{}", type=type_)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise HandlerError("400", f"bad {what} request: {exc}") from None


def parse_peer(text: str) -> Target:
    """A "host:port" (or "[v6]:port") peer as a Target; ValueError when it is not one."""
    host, sep, port = text.strip().rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{text!r} is not host:port")
    return Target(host, int(port))


def labels(cfg: Config) -> dict[str, str]:
    """The node's labels: zone, rack and role where configured."""
    pairs = (("zone", cfg.agent.zone), ("rack", cfg.agent.rack), ("role", cfg.agent.role))
    return {k: v for k, v in pairs if v}


def _steady(net: NetStatus) -> NetStatus:
    """The network status without round-trip times, which change every probe and are not facts."""
    reach = tuple(msgspec.structs.replace(r, rtt_ms=None) for r in net.reachability)
    return msgspec.structs.replace(net, reachability=reach)


class Collector(Generic[T]):
    """A blocking collector run in a worker thread, at most one run at a time."""

    def __init__(self, name: str, fn: Callable[[], T]) -> None:
        self.name = name
        self.fn = fn
        self._task: asyncio.Future[T] | None = None

    def _current(self) -> asyncio.Future[T]:
        if self._task is None or self._task.done():
            self._task = asyncio.ensure_future(asyncio.to_thread(self.fn))
        return self._task

    async def run(self) -> T:
        """A fresh result (joining the run in progress, if any)."""
        return await asyncio.shield(self._current())

    async def within(self, budget: float) -> T | None:
        """A fresh result, or None when it takes longer than `budget` seconds (it goes on in the background)."""
        # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that
        # arrives as the result does, and a stopping agent would then beat on forever.
        task = self._current()
        done, _ = await asyncio.wait({task}, timeout=budget)
        if not done:
            log.warning("collector is slow; using its previous result", extra={"collector": self.name})
            return None
        return task.result()


class AgentService:
    """One host's agent: publishes heartbeats and facts, runs cleanups, answers requests."""

    def __init__(self, bus: Bus, cfg: Config, peers: tuple[Target, ...] = ()) -> None:
        self.bus = bus
        self.cfg = cfg
        self.node_id = cfg.node_id
        self.labels = labels(cfg)
        self.peers = peers
        self.interval = cfg.membership.heartbeat_interval
        self.started_at = time.time()
        self.seq = 0
        self.rev = 0
        self.facts: NodeFacts | None = None
        self.reports: deque[LogCleanReport] = deque(maxlen=LOG_REPORTS_KEPT)
        self._host_last: HostInfo | None = None
        self._ports: ListeningPorts | None = None
        self._ports_print: frozenset[Socket] | None = None
        self._ports_at = 0.0
        self._engines: EngineScan | None = None
        self._network: NetStatus | None = None
        self._facts_lock = asyncio.Lock()
        self._clean_lock = asyncio.Lock()
        self._facts_unsent = False
        self._seen_reconnects = 0
        self._host = Collector("host", host_info)
        self._ports_c = Collector("ports", listening_ports)
        self._engines_c = Collector("engines", lambda: scan_engines(cfg.agent.engine_dirs))
        self._net_c = Collector("network", self._net_status)
        self._service: Service | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._refresh: asyncio.Task[None] | None = None
        self._stopping = False
        self._rejoining = False

    # ---- start and stop ---------------------------------------------------------------------

    async def start(self) -> None:
        """Answer requests, then start heartbeats, fact collection and the cleanup schedule."""
        ep = subjects.agent_request
        self._service = await start_service(
            self.bus.nc,
            name=subjects.AGENT_SERVICE,
            version=__version__,
            description="fleetmate agent: host figures, ports, engines, log cleanup, network",
            endpoints=[
                Endpoint("info", ep(self.node_id, "info"), self._on_info),
                Endpoint("ports", ep(self.node_id, "ports"), self._on_ports),
                Endpoint("free_ports", ep(self.node_id, "free_ports"), self._on_free_ports),
                Endpoint("scan", ep(self.node_id, "scan"), self._on_scan),
                Endpoint("clean", ep(self.node_id, "clean"), self._on_clean),
                Endpoint("net", ep(self.node_id, "net"), self._on_net),
                Endpoint("facts", ep(self.node_id, "facts"), self._on_facts),
                Endpoint("pg_rejoin", ep(self.node_id, "pg_rejoin"), self._on_pg_rejoin),
            ],
            metadata={"node_id": self.node_id, "kind": "agent", **self.labels},
        )
        self._seen_reconnects = self.bus.reconnects
        self._tasks = [
            asyncio.create_task(self._heartbeats(), name="agent-heartbeats"),
            asyncio.create_task(self._first_facts(), name="agent-first-facts"),
        ]
        if self.cfg.agent.log_clean_interval > 0 and self.cfg.agent.log_rules:
            self._tasks.append(asyncio.create_task(self._clean_schedule(), name="agent-log-clean"))
        log.info(
            "agent started",
            extra={
                "node_id": self.node_id,
                "labels": self.labels,
                "heartbeat_interval": self.interval,
                "nats": self.bus.connected_url,
            },
        )

    async def stop(self) -> None:
        """Stop the loops and the micro service (the bus is closed by its owner)."""
        self._stopping = True
        pending = {t for t in (*self._tasks, self._refresh) if t is not None and not t.done()}
        for _ in range(3):  # a cancellation lost inside a library call is asked for again
            if not pending:
                break
            for task in pending:
                task.cancel()
            _, pending = await asyncio.wait(pending, timeout=1.0)
        if pending:
            log.warning("agent tasks did not stop", extra={"tasks": sorted(t.get_name() for t in pending)})
        if self._service is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._service.stop(), 2.0)
        log.info("agent stopped", extra={"node_id": self.node_id, "heartbeats": self.seq})

    # ---- heartbeats ---------------------------------------------------------------------------

    async def _heartbeats(self) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while not self._stopping:
            try:
                await self._beat()
            except Exception:
                log.exception("heartbeat failed")
            next_at += self.interval
            now = loop.time()
            if next_at <= now:  # a beat overran: skip the slots it missed rather than bursting
                next_at = now + self.interval - (now - next_at) % self.interval
            await asyncio.sleep(next_at - now)

    async def _beat(self) -> None:
        try:
            host = await self._host.within(max(0.2, self.interval / 2)) or self._host_last
            if host is None:
                host = await self._host.run()  # the very first reading: wait for it
        except Exception:
            if self._host_last is None:
                raise
            # A failing reading must not silence the node: it would be marked down while alive.
            log.exception("reading host figures failed; sending the previous ones")
            host = self._host_last
        self._host_last = host
        if self.bus.connected:
            self.seq += 1
            beat = Heartbeat(
                node_id=self.node_id,
                kind="agent",
                labels=self.labels,
                seq=self.seq,
                sent_at=time.time(),
                started_at=self.started_at,
                version=__version__,
                host=host,
                client_ip=self._client_ip(),
                facts_rev=self.rev,
            )
            await self.bus.nc.publish(subjects.agent_heartbeat(self.node_id), encode(beat))
            # The same figures as time series: the metrics stream keeps them, every replica's DuckDB gets them.
            points = points_from_host(self.node_id, self.labels, host, beat.sent_at)
            await self.bus.nc.publish(subject_for(self.node_id), encode_points(points))
            if self.bus.reconnects != self._seen_reconnects:
                # The control plane may have missed facts while we were away.
                self._seen_reconnects = self.bus.reconnects
                self._facts_unsent = True
            if self._facts_unsent and self.facts is not None:
                await self._publish_facts(self.facts)
        if self.facts is not None and (self._refresh is None or self._refresh.done()):
            self._refresh = asyncio.create_task(self._refresh_facts(), name="agent-refresh")

    def _client_ip(self) -> str:
        client = self._network.client if self._network is not None else None
        return client.ip if client is not None else ""

    # ---- facts --------------------------------------------------------------------------------

    def _control_plane(self) -> Target | None:
        url = self.bus.connected_url or (self.bus.servers[0] if self.bus.servers else "")
        parts = urlsplit(url)
        return Target(parts.hostname, parts.port or 4222) if parts.hostname else None

    def _net_status(self) -> NetStatus:
        cp = self._control_plane()
        targets = (cp, *self.peers) if cp is not None else self.peers
        return net_status(
            interface=self.cfg.agent.interface or None,
            route_to=cp.host if cp is not None else None,
            targets=targets,
            timeout=PROBE_TIMEOUT_S,
        )

    async def _first_facts(self) -> None:
        """Collect everything once (the engine scan may take seconds) and publish facts revision 1."""
        while not self._stopping:
            try:
                fp = listening_fingerprint()  # before the scan: a socket opened meanwhile shows up next beat
                ports, engines, net = await asyncio.gather(
                    self._ports_c.run(), self._engines_c.run(), self._net_c.run()
                )
                self._ports_print, self._ports_at = fp, time.monotonic()
                await self._update(ports=ports, engines=engines, network=net)
                return
            except Exception:
                log.exception("collecting facts failed; retrying")
                await asyncio.sleep(self.interval)

    async def _refresh_facts(self) -> None:
        """Every heartbeat: look for changed listening sockets and network; publish facts on a change."""
        try:
            ports: ListeningPorts | None = None
            fp = listening_fingerprint()  # ~0.1 ms: no thread needed
            stale = time.monotonic() - self._ports_at >= PORTS_FULL_SCAN_EVERY_S
            if fp is None or fp != self._ports_print or stale:
                log.debug("listening sockets changed; scanning ports", extra={"periodic": stale})
                ports = await self._ports_c.run()
                self._ports_print, self._ports_at = fp, time.monotonic()
            net = await self._net_c.run()
            await self._update(ports=ports, network=net)
        except Exception:
            log.exception("refreshing facts failed")

    async def _update(
        self,
        *,
        ports: ListeningPorts | None = None,
        engines: EngineScan | None = None,
        network: NetStatus | None = None,
        report: bool = False,
    ) -> None:
        """Take new readings; when any fact changed, raise the revision and publish NodeFacts."""
        async with self._facts_lock:
            changed = report
            if ports is not None and ports != self._ports:
                self._ports, changed = ports, True
            if engines is not None and engines != self._engines:
                self._engines, changed = engines, True
            if network is not None and (self._network is None or _steady(network) != _steady(self._network)):
                self._network, changed = network, True
            if not changed or self._ports is None or self._engines is None or self._network is None:
                return
            self.rev += 1
            self.facts = NodeFacts(
                node_id=self.node_id,
                rev=self.rev,
                ports=self._ports,
                engines=self._engines,
                network=self._network,
                logs=tuple(self.reports),
                updated_at=time.time(),
                started_at=self.started_at,
            )
            log.info(
                "facts changed",
                extra={
                    "rev": self.rev,
                    "ports": len(self._ports.ports),
                    "engines": [f"{e.engine} {e.version}" for e in self._engines.engines],
                    "client_ip": self._client_ip(),
                },
            )
            await self._publish_facts(self.facts)

    async def _publish_facts(self, facts: NodeFacts) -> None:
        if not self.bus.connected:
            self._facts_unsent = True
            return
        try:
            await self.bus.nc.publish(subjects.agent_facts(self.node_id), encode(facts))
            self._facts_unsent = False
        except Exception as exc:
            self._facts_unsent = True
            log.warning("could not publish facts; will retry", extra={"error": str(exc) or type(exc).__name__})

    # ---- log cleanup --------------------------------------------------------------------------

    async def _clean_schedule(self) -> None:
        """Clean at start, then every agent.log_clean_interval seconds."""
        while not self._stopping:
            try:
                await self.clean(self.cfg.agent.log_rules, dry_run=False)
            except Exception:
                log.exception("scheduled log cleanup failed")
            await asyncio.sleep(self.cfg.agent.log_clean_interval)

    async def clean(self, rules: tuple[LogRule, ...], dry_run: bool) -> tuple[LogCleanReport, ...]:
        """Run the rules (dry runs only when agent.log_clean_dry_run), record and log each report."""
        dry = dry_run or self.cfg.agent.log_clean_dry_run
        async with self._clean_lock:
            reports = await asyncio.to_thread(_run_rules, rules, dry)
        for r in reports:
            # Facts travel in one NATS message: a run over a huge tree keeps its totals, not every path.
            self.reports.append(
                msgspec.structs.replace(r, deleted=r.deleted[:LOG_PATHS_KEPT], skipped=r.skipped[:LOG_PATHS_KEPT])
            )
            log.info(
                "log cleanup ran",
                extra={
                    "rule": r.rule.name or r.rule.directory,
                    "dry_run": r.dry_run,
                    "considered": r.considered,
                    "deleted": len(r.deleted),
                    "bytes_freed": r.bytes_freed,
                    "skipped": len(r.skipped),
                    "error": r.error,
                },
            )
        if reports:
            await self._update(report=True)
        return reports

    # ---- request handlers ---------------------------------------------------------------------

    async def _on_info(self, _data: bytes) -> bytes:
        host = await self._host.run()
        return encode(host)

    async def _on_ports(self, _data: bytes) -> bytes:
        ports = await self._ports_c.run()
        await self._update(ports=ports)
        return encode(ports)

    async def _on_free_ports(self, data: bytes) -> bytes:
        req = decode_request(data, FreePortsRequest, "free_ports")
        try:
            found = await asyncio.to_thread(free_ports, req.start, req.end, req.proto, req.count)
        except ValueError as exc:
            raise HandlerError("400", str(exc)) from None
        return encode(found)

    async def _on_scan(self, _data: bytes) -> bytes:
        engines = await self._engines_c.run()
        await self._update(engines=engines)
        return encode(engines)

    async def _on_clean(self, data: bytes) -> bytes:
        req = decode_request(data, CleanRequest, "clean")
        rules = self.cfg.agent.log_rules
        if req.rule is not None:
            rules = tuple(r for r in rules if req.rule in (r.name, r.directory))
            if not rules:
                known = ", ".join(r.name or r.directory for r in self.cfg.agent.log_rules) or "none configured"
                raise HandlerError("404", f"no log rule named {req.rule!r} (agent.log_rules: {known})")
        return encode(CleanResult(await self.clean(rules, req.dry_run)))

    async def _on_net(self, _data: bytes) -> bytes:
        net = await self._net_c.run()
        await self._update(network=net)
        return encode(net)

    async def _on_facts(self, _data: bytes) -> bytes:
        if self.facts is None:
            raise HandlerError("503", "facts are still being collected; ask again shortly")
        return encode(self.facts)

    async def _on_pg_rejoin(self, data: bytes) -> bytes:
        req = decode_request(data, PgRejoinRequest, "pg_rejoin")
        if self._rejoining:
            raise HandlerError("409", "a rejoin is already running on this host")
        self._rejoining = True
        try:
            log.warning("rejoining a PostgreSQL former primary", extra={"instance": req.address, "source": req.source})
            report = await pgrejoin.rejoin(req)
        except pgrejoin.RejoinError as exc:
            log.error("PostgreSQL rejoin failed", extra={"instance": req.address, "error": str(exc)})
            raise HandlerError(exc.code, str(exc)) from None
        finally:
            self._rejoining = False
        log.warning("PostgreSQL former primary rejoined", extra={"instance": req.address, "seconds": report.seconds})
        return encode(report)


def _run_rules(rules: tuple[LogRule, ...], dry_run: bool) -> tuple[LogCleanReport, ...]:
    """Run each rule in turn (in a worker thread); a malformed rule gives a report with its error."""
    out: list[LogCleanReport] = []
    for rule in rules:
        now = time.time()
        try:
            out.append(logclean.run(rule, now, dry_run=dry_run))
        except ValueError as exc:
            out.append(LogCleanReport(rule, now, dry_run, 0, 0, (), (), 0, True, str(exc)))
    return tuple(out)
