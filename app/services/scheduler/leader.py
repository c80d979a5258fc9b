"""The scheduling leader's duties: node leases, first placement, procedure steps, the schedulers, assignment pushes.

Everything it decides is a log command carrying its term (a paused ex-leader's commands are
refused in apply) and the trace id of its round. A new leader resumes every unfinished procedure
from its last applied step: steps are started and finished only by commands fenced by term and
step index, so nothing runs twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import msgspec

from app import failpoints
from app.decisions import decision_span
from app.services.scheduler import protocol
from app.services.scheduler.errors import SchedulerError, StaleTerm
from app.services.scheduler.loads import MetricsStore, heard_loads, smoothed
from app.services.scheduler.messages import (
    Advance,
    Command,
    Expire,
    LeaderElected,
    Place,
    Propose,
    RecordLoad,
    SetNodeState,
)
from app.services.scheduler.model import Cluster, Event, Procedure
from app.services.scheduler.primaries import PrimaryBalancer
from app.services.scheduler.procedures import step_complete
from app.services.scheduler.schedulers import operators, placement
from app.services.scheduler.service import SchedulerService, now_ms
from app.supervise import supervisor

log = logging.getLogger("fleetmate.scheduler")
_json = msgspec.json.Encoder()
SUSPECT_AT = 2 / 3  # of a lease without a heartbeat: two missed (nodes beat every lease/3)


class SchedulerLeader:
    """Runs while this replica holds the lease: rounds every scheduler.interval, steps at once on acks."""

    def __init__(self, svc: SchedulerService) -> None:
        self.svc = svc
        self.cfg = svc.cfg
        self._task: asyncio.Task[None] | None = None
        self._pusher: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._to_push: set[tuple[str, str]] = set()
        self._push_now = asyncio.Event()
        self._since = 0.0  # monotonic time this replica started leading
        self._last_full = 0.0
        self._last_push_all = 0.0
        self._last_load: dict[str, float] = {}
        self.rounds = 0
        # HA primaries balanced as a domain (scheduler.balance_primaries): kicked once per full
        # round, it runs as its own task so a switchover never stalls the shard procedures.
        self.primaries: PrimaryBalancer | None = None
        self.metrics: MetricsStore | None = None  # where shard loads are kept (None: metrics off)

    # ---- on and off -----------------------------------------------------------------------------

    async def lead(self) -> None:
        """Take the scheduling term (term + 1 over the applied one) and start the rounds."""
        svc = self.svc
        while True:
            term = svc.state.term + 1
            try:
                await svc.append(LeaderElected(term, svc.node_id, now_ms()))
                break
            except StaleTerm:
                continue  # another replica's election applied first: take the next term
        svc.term, svc.leading = term, True
        self._since = time.monotonic()
        self._last_full = 0.0
        self._last_push_all = 0.0
        svc.changes.listeners.append(self._on_events)
        self._task = supervisor.watch(asyncio.create_task(self._run(), name="scheduler-leader"), "the scheduler")
        self._pusher = supervisor.watch(
            asyncio.create_task(self._push_loop(), name="scheduler-pusher"), "the assignment pusher"
        )
        resumed = len(svc.state.running())
        log.info("leading the scheduler", extra={"term": term, "procedures_resumed": resumed})

    async def stop(self) -> None:
        """Stop every duty at once."""
        svc = self.svc
        svc.leading = False
        if self.primaries is not None:
            self.primaries.stop()
        with contextlib.suppress(ValueError):
            svc.changes.listeners.remove(self._on_events)
        for task in (self._task, self._pusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
        self._task = self._pusher = None

    def _on_events(self, events: list[Event]) -> None:
        """Applied events (in the apply loop): nodes whose assignment changed are pushed; an ack wakes the steps."""
        for e in events:
            for node in e.nodes:
                self._to_push.add((e.cluster, node))
            if e.proc or e.kind == "node":
                self._wake.set()
        if self._to_push:
            self._push_now.set()

    # ---- rounds -----------------------------------------------------------------------------------

    async def _run(self) -> None:
        interval = self.cfg.interval
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                full = time.monotonic() - self._last_full >= interval
                await self.round(full)
            except StaleTerm:
                log.warning("a newer scheduling leader exists; waiting for the lease to say so")
                await asyncio.sleep(interval)
            except SchedulerError as exc:
                log.warning("scheduler round failed", extra={"error": str(exc)})
            except Exception as exc:  # the bus may be away: the next round tries again
                log.warning("scheduler round failed", extra={"error": repr(exc)})
                await asyncio.sleep(interval)

    async def round(self, full: bool = True) -> None:
        """One round: procedure steps always; with `full`, leases, placement, loads and the schedulers too."""
        svc = self.svc
        if not svc.leading:
            return
        with decision_span("scheduler.round", {"fleetmate.term": svc.term, "fleetmate.full": full}) as trace_id:
            if full:
                self._last_full = time.monotonic()
                self.rounds += 1
                for c in list(svc.state.clusters.values()):
                    await self._leases(c, trace_id)
                    await self._place(c, trace_id)
                    await self._loads(c)
            await self._steps(trace_id)
            if full:
                for c in list(svc.state.clusters.values()):
                    await self._schedule(c, trace_id)
                await self._steps(trace_id)
                if self.primaries is not None:
                    self.primaries.kick()

    async def _send(self, commands: list[Command]) -> list[object]:
        """Append commands concurrently (the batcher puts them in few entries); refusals are returned."""
        if not commands:
            return []
        results = await asyncio.gather(*(self.svc.log.append(c) for c in commands), return_exceptions=True)
        for r in results:
            if isinstance(r, StaleTerm):
                raise r
        return list(results)

    async def _leases(self, c: Cluster, trace_id: str) -> None:
        """online / suspect / down from the heartbeats this replica heard (the lease counts from when it
        started leading, so a new leader gives every node a full lease)."""
        now = time.monotonic()
        name = c.spec.name
        out: list[Command] = []
        for node, rec in c.nodes.items():
            if rec.state in ("removed",):
                continue
            heard = self.svc.heard.get((name, node))
            last = max(heard[0] if heard else 0.0, self._since)
            lease = rec.spec.lease_s or c.spec.lease_s
            age = now - last
            fresh = heard is not None and heard[0] >= self._since
            if age > lease:
                want = "down"
            elif age > lease * SUSPECT_AT:
                want = "suspect"
            else:
                want = "online" if fresh or rec.state in ("online", "suspect") else rec.state
            if rec.state == "draining" and want != "down":
                continue
            if rec.state == "down" and want == "suspect":
                continue
            if want != rec.state:
                reason = f"no heartbeat for {age:.1f}s (lease {lease:g}s)" if want != "online" else "heartbeat"
                out.append(SetNodeState(name, node, want, reason, self.svc.term, now_ms(), trace_id))  # type: ignore[arg-type]
        for cmd, result in zip(out, await self._send(out), strict=True):
            if not isinstance(result, Exception):
                assert isinstance(cmd, SetNodeState)
                log.info(
                    "data node state",
                    extra={
                        "cluster": name,
                        "node": cmd.node,
                        "state": cmd.state,
                        "reason": cmd.reason,
                        "trace_id": trace_id,
                    },
                )

    async def _place(self, c: Cluster, trace_id: str) -> None:
        """The first placement once node_count nodes are online (then a dynamic cluster balances onto
        later ones; a static one is fixed)."""
        if c.placed:
            return
        online = [n for n, r in c.nodes.items() if r.state == "online"]
        need = c.spec.node_count  # HoraeMeta waits for its default_cluster_node_count, static or dynamic
        if len(online) < need:
            return
        plan = placement(c)
        if plan:
            await self._send([Place(c.spec.name, plan, self.svc.term, now_ms(), trace_id)])
            log.info("cluster placed", extra={"cluster": c.spec.name, "shards": len(plan), "trace_id": trace_id})

    async def _loads(self, c: Cluster) -> None:
        """Sizes and loads from the heartbeats, kept in the metrics store and recorded (loads averaged
        there over a few intervals) every scheduler.load_interval."""
        name = c.spec.name
        now = time.monotonic()
        if now - self._last_load.get(name, 0.0) < self.cfg.load_interval or not c.placed:
            return
        self._last_load[name] = now
        sizes, load = heard_loads(c, self.svc.heard)
        if self.metrics is not None and (sizes or load):
            load = await smoothed(self.metrics, name, sizes, load, self.cfg.load_interval)
        if sizes or load or c.sizes or c.load:
            await self._send([RecordLoad(name, sizes, load, self.svc.term, now_ms())])

    def _due(self, c: Cluster, p: Procedure, now: int, trace_id: str) -> Command | None:
        term = self.svc.term
        if p.at < 0 or p.status == "created":
            if c.frozen and p.op.source != "failover":
                expire = now - p.created_ms >= c.limits.expire_s * 1000
                return Expire(p.id, p.at, term, now, trace_id) if expire else None
            return Advance(p.id, p.at, term, now, trace_id)
        step = p.steps[p.at]
        if not step.started or step_complete(c, step):
            return Advance(p.id, p.at, term, now, trace_id)
        if now >= step.deadline_ms:
            return Expire(p.id, p.at, term, now, trace_id)
        return None

    async def _steps(self, trace_id: str) -> None:
        """Finish every acknowledged step and start the next; end those past their deadline."""
        svc = self.svc
        now = now_ms()
        out: list[Command] = []
        for p in svc.state.running():
            c = svc.state.clusters.get(p.cluster)
            if c is not None and (cmd := self._due(c, p, now, trace_id)) is not None:
                out.append(cmd)
        if out:
            failpoints.hit("scheduler.step")  # the steps are decided, none appended
            await self._send(out)
            failpoints.hit("scheduler.stepped")  # appended and applied, not yet pushed nor acted on

    async def _schedule(self, c: Cluster, trace_id: str) -> None:
        """The schedulers' operators for this round, proposed."""
        if not c.placed or not c.enable_schedule:
            return
        ops = operators(c, self.svc.state.running(c.spec.name), now_ms())
        if not ops:
            return
        now = now_ms()
        cmds: list[Command] = [Propose(c.spec.name, op, self.svc.term, now, trace_id) for op in ops]
        results = await self._send(cmds)
        started = sum(1 for r in results if not isinstance(r, Exception))
        log.info(
            "scheduler operators",
            extra={"cluster": c.spec.name, "proposed": len(ops), "started": started, "trace_id": trace_id},
        )

    # ---- pushes -------------------------------------------------------------------------------------

    async def _push_loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._push_now.wait(), self.cfg.push_interval)
            self._push_now.clear()
            svc = self.svc
            if time.monotonic() - self._last_push_all >= self.cfg.push_interval:
                self._last_push_all = time.monotonic()
                self._to_push |= {(name, n) for name, c in svc.state.clusters.items() for n in c.nodes}
            todo, self._to_push = self._to_push, set()
            for cluster, node in sorted(todo):
                c = svc.state.clusters.get(cluster)
                try:
                    if c is None:
                        body = protocol.Assignment(cluster, node, svc.state.revision, [], [], "removed")
                    else:
                        body = svc.assignment(cluster, node)
                    await svc.bus.nc.publish(protocol.assign_subject(cluster, node), _json.encode(body))
                except Exception as exc:  # the bus may be away: the periodic push repeats it
                    log.debug("assignment push failed", extra={"node": node, "error": repr(exc)})
