"""HA primaries as a scheduling domain: a pure balance-leader planner and the balancer running its switchovers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Literal

import msgspec

from app.adaptors.types import Address
from app.config.schema import SchedulerConfig
from app.decisions import decision_span
from app.services.ha import layout
from app.services.ha.catalog import REFRESH_S
from app.services.ha.layout import HistoryEntry, InstanceRecord
from app.services.ha.service import HaService

log = logging.getLogger("fleetmate.scheduler")

EVERY_S = 3.0  # the balancer plans at most this often (the leader's rounds may be faster)
CHANGE_PREFIX = "primary is now "  # the history entry of every switchover and failover
_history_dec = msgspec.json.Decoder(HistoryEntry)


def host_of(address: str) -> str:
    """The host (IP) part of `host:port`; the text itself when it is not one."""
    try:
        return Address.parse(address).host
    except ValueError:
        return address


class PrimaryCluster(msgspec.Struct, frozen=True):
    """One HA cluster as the planner sees it (addresses as host:port)."""

    name: str
    primary: str  # "" when none is recorded
    instances: tuple[str, ...] = ()  # every recorded instance: the hosts the cluster spans
    replicas: tuple[str, ...] = ()  # healthy replicas of the primary: reachable, not must_not, not in downtime
    prefer: tuple[str, ...] = ()  # replicas with the `prefer` promotion rule
    last_recovery_at: float | None = None  # the HA anti-flapping clock
    last_change_at: float | None = None  # the last switchover or failover (its history entry)
    findings: tuple[str, ...] = ()  # the HA leader's findings, as "Kind instance"
    busy: str = ""  # any other reason to leave it alone (not analysed yet, an old primary to fence)


class PrimaryMove(msgspec.Struct, frozen=True):
    """A switchover the planner asks for, and why."""

    cluster: str
    source: str
    target: str
    reason: str


class PrimaryPlan(msgspec.Struct, frozen=True):
    """The planner's answer: at most one move, the counts it saw, and why each cluster may not move."""

    move: PrimaryMove | None
    hosts: dict[str, int]  # primaries per host
    zones: dict[str, int]  # primaries per zone
    host_spread: int
    zone_spread: int
    blocked: dict[str, str]  # cluster -> why it is left alone
    why: str  # why there is no move ("" with one)


def blocked_reason(c: PrimaryCluster, now: float, cooldown: float, block_seconds: float) -> str:
    """Why cluster c's primary may not be moved now; "" when it may."""
    if not c.primary:
        return "no recorded primary"
    if c.busy:
        return c.busy
    if c.last_recovery_at is not None and now - c.last_recovery_at < block_seconds:
        left = block_seconds - (now - c.last_recovery_at)
        return f"anti-flapping: last recovery {now - c.last_recovery_at:.0f} s ago ({left:.0f} s left)"
    if c.findings:
        return "findings: " + ", ".join(c.findings)
    if c.last_change_at is not None and now - c.last_change_at < cooldown:
        left = cooldown - (now - c.last_change_at)
        return f"cooldown: primary changed {now - c.last_change_at:.0f} s ago ({left:.0f} s left)"
    return ""


def _spread(counts: Mapping[str, int]) -> int:
    return max(counts.values()) - min(counts.values()) if counts else 0


def plan_primaries(
    clusters: Iterable[PrimaryCluster],
    now: float,
    cooldown: float,
    block_seconds: float,
    zones: Mapping[str, str] | None = None,
) -> PrimaryPlan:
    """At most one switchover that spreads primaries across zones, then hosts (zones: host -> zone, else the host).

    Balance-leader's rule: a primary moves only from a zone (or, zones equal, a host) holding at
    least two more primaries than the target's, so every move lowers sum(count**2) per zone, then
    per host; the potential only goes down, so balancing ends, and a fleet whose counts are within
    one of each other (spread <= 1) gets no move at all: no oscillation. Blocked clusters (see
    blocked_reason) never move; neither do they stop the others.
    """
    zone_of = zones or {}
    listed = sorted(clusters, key=lambda c: c.name)
    hosts: dict[str, int] = {}
    for c in listed:
        for a in (*c.instances, *c.replicas, *([c.primary] if c.primary else [])):
            hosts.setdefault(host_of(a), 0)
    for c in listed:
        if c.primary:
            hosts[host_of(c.primary)] += 1
    zcount: dict[str, int] = {}
    for h, n in hosts.items():
        z = zone_of.get(h, h)
        zcount[z] = zcount.get(z, 0) + n
    blocked: dict[str, str] = {}
    best: tuple[tuple[int, int, int, str, str], PrimaryMove] | None = None
    for c in listed:
        why = blocked_reason(c, now, cooldown, block_seconds)
        if why:
            blocked[c.name] = why
            continue
        hs = host_of(c.primary)
        zs = zone_of.get(hs, hs)
        for target in sorted(set(c.replicas)):
            hd = host_of(target)
            zd = zone_of.get(hd, hd)
            if hd == hs:
                continue
            dz = 0 if zd == zs else 2 * (zcount[zd] - zcount[zs] + 1)
            dh = 2 * (hosts[hd] - hosts[hs] + 1)
            if not (dz < 0 or (dz == 0 and dh < 0)):
                continue
            key = (dz, dh, 0 if target in c.prefer else 1, c.name, target)
            if best is None or key < best[0]:
                labelled = zd != zs and (zs, zd) != (hs, hd)
                what = f"zone {zs} {zcount[zs]} -> {zd} {zcount[zd]}, " if labelled else ""
                reason = f"{what}host {hs} {hosts[hs]} primaries -> {hd} {hosts[hd]}"
                best = (key, PrimaryMove(c.name, c.primary, target, reason))
    hspread, zspread = _spread(hosts), _spread(zcount)
    if best is not None:
        why = ""
    elif hspread <= 1 and zspread <= 1:
        why = "balanced: primaries per zone and per host within one of each other"
    else:
        why = f"spread {hspread} per host, {zspread} per zone, but no cluster may move to a host with fewer"
    return PrimaryPlan(best[1] if best else None, hosts, zcount, hspread, zspread, blocked, why)


Outcome = Literal["done", "failed", "skipped"]


class Balanced(msgspec.Struct, frozen=True):
    """One switchover the balancer ran, as the tests and the log see it."""

    cluster: str
    source: str
    target: str
    outcome: Outcome
    trace_id: str
    at: float
    seconds: float
    error: str = ""


class PrimaryBalancer:
    """Runs plan_primaries on the scheduling leader and carries a move out as an HA switchover.

    The leader calls kick() once per full round; a step runs as its own task, at most every
    EVERY_S, one at a time, so a slow switchover never stalls the shard procedures. A switchover
    in flight is never cancelled (a primary left read-only halfway would be worse than finishing).
    """

    def __init__(
        self,
        ha: HaService,
        cfg: SchedulerConfig,
        zone_of: Callable[[str], str] | None = None,
        clock: Callable[[], float] = time.time,
        every: float = EVERY_S,
    ) -> None:
        self.ha = ha
        self.cfg = cfg
        self.zone_of = zone_of
        self.clock = clock
        self.every = every
        self.done: list[Balanced] = []
        self.last_plan: PrimaryPlan | None = None
        self._task: asyncio.Task[None] | None = None
        self._switching = False
        self._last_step = 0.0
        self._changes: dict[str, tuple[str, float | None]] = {}  # cluster -> (newest history child seen, last change)
        self._switched_at: dict[str, float] = {}

    # ---- driven by the scheduling leader --------------------------------------------------------

    def kick(self) -> None:
        """Start a step as a task unless one runs or the last started under `every` seconds ago."""
        if self._task is not None and not self._task.done():
            return
        now = time.monotonic()
        if now - self._last_step < self.every:
            return
        self._last_step = now
        self._task = asyncio.create_task(self._guarded(), name="scheduler-primaries")

    def stop(self) -> None:
        """The leader stops: a step still planning is cancelled; a switchover in flight finishes."""
        if self._task is not None and not self._task.done() and not self._switching:
            self._task.cancel()
        self._task = None

    async def wait(self) -> None:
        """Wait for the step in flight, if any (tests)."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _guarded(self) -> None:
        try:
            await self.step()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the registry or an instance may be away: the next step tries again
            log.warning("primary balancing failed", extra={"error": repr(exc)})

    # ---- one step ---------------------------------------------------------------------------------

    def clusters(self) -> list[PrimaryCluster]:
        """Every HA cluster as the planner sees it, from the registry and the HA leader's findings."""
        ha = self.ha
        now = self.clock()
        fresh_within = REFRESH_S + 3 * ha.cfg.poll_interval
        out: list[PrimaryCluster] = []
        for name in ha.names():
            try:
                record = ha.record(name)
            except Exception:  # removed meanwhile, or unreadable: not ours to judge
                continue
            primary = ha.primary(name)
            instances = ha.instances(name)
            by_address = {i.address: i for i in instances}
            busy = ""
            findings = ha.analyses.get(name)
            if findings is None:
                busy = "not analysed by this leader yet"
            elif record.old_primaries:
                busy = "an old primary is still to be fenced: " + ", ".join(record.old_primaries)
            else:
                p = by_address.get(primary)
                if p is None or not p.reachable or p.read_only is not False or now - p.probed_at > fresh_within:
                    busy = f"the primary {primary or '-'} is not seen writable lately"
            downtime = {a for a, until in record.downtime.items() if until > now}
            replicas = tuple(
                i.address
                for i in instances
                if i.address != primary
                and record.rules.get(i.address) != "must_not"
                and i.address not in downtime
                and _healthy_replica(i, primary, ha.cfg.lag_threshold, now, fresh_within)
            )
            out.append(
                PrimaryCluster(
                    name,
                    primary,
                    tuple(by_address),
                    replicas,
                    tuple(a for a in replicas if record.rules.get(a) == "prefer"),
                    record.last_recovery_at,
                    self._last_change(name),
                    tuple(f"{f.kind} {f.instance}" for f in findings or ()),
                    busy,
                )
            )
        return out

    def plan(self) -> PrimaryPlan:
        """What the planner would do now (no side effect)."""
        clusters = self.clusters()
        zones: dict[str, str] = {}
        if self.zone_of is not None:
            for c in clusters:
                for a in (*c.instances, c.primary):
                    if a:
                        zones.setdefault(host_of(a), self.zone_of(a))
        return plan_primaries(
            clusters, self.clock(), self.cfg.primary_cooldown, self.ha.cfg.recovery_block_seconds, zones
        )

    async def step(self) -> Balanced | None:
        """Plan once and carry out the move, if any, under a decision span recorded in the cluster's history."""
        ha = self.ha
        if not ha.leading:
            return None
        plan = self.plan()
        self.last_plan = plan
        move = plan.move
        if move is None:
            return None
        note = ha.catalog.note
        started = self.clock()
        with decision_span(
            "scheduler.primaries", {"ha.cluster": move.cluster, "ha.source": move.source, "ha.target": move.target}
        ) as trace_id:
            # The decision first, fenced by the lease term: a deposed leader's is refused and nothing moves.
            await note(
                move.cluster, "step", f"balance-primaries: switchover {move.source} -> {move.target} ({move.reason})"
            )
            self._switching = True
            self._switched_at[move.cluster] = started
            try:
                view = await ha.switchover(move.cluster, move.target)
            except Exception as exc:
                outcome = Balanced(
                    move.cluster,
                    move.source,
                    move.target,
                    "failed",
                    trace_id,
                    started,
                    self.clock() - started,
                    str(exc),
                )
                self.done.append(outcome)
                with contextlib.suppress(Exception):
                    await note(move.cluster, "failed", f"balance-primaries: failed, {move.target} not promoted: {exc}")
                log.warning(
                    "primary balancing switchover failed",
                    extra={"cluster": move.cluster, "target": move.target, "error": str(exc), "trace_id": trace_id},
                )
                return outcome
            finally:
                self._switching = False
            seconds = self.clock() - started
            outcome = Balanced(move.cluster, move.source, move.target, "done", trace_id, started, seconds)
            self.done.append(outcome)
            with contextlib.suppress(Exception):
                await note(
                    move.cluster,
                    "step",
                    f"balance-primaries: done in {seconds:.1f} s, primary is {view.primary} (was {move.source})",
                    view.primary,
                )
            log.info(
                "primary balanced",
                extra={
                    "cluster": move.cluster,
                    "source": move.source,
                    "target": view.primary,
                    "seconds": round(seconds, 3),
                    "trace_id": trace_id,
                },
            )
            return outcome

    def _last_change(self, name: str) -> float | None:
        """When the cluster's primary last changed (its newest "primary is now" entry), or its last
        switchover by this balancer; the history is read incrementally, newest first."""
        registry = self.ha.registry
        folder = layout.history_path(name)
        children = registry.child_names(folder) if registry.exists(folder) else []
        seen, at = self._changes.get(name, ("", None))
        if children and children[-1] < seen:  # removed and registered again: read it all
            seen, at = "", None
        for child in reversed(children):
            if child <= seen:
                break
            node = registry.node(f"{folder}/{child}")
            if node is None:
                continue
            try:
                entry = _history_dec.decode(node.data or b"")
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue
            if entry.message.startswith(CHANGE_PREFIX):
                at = max(at or 0.0, entry.at)
                break
        self._changes[name] = (children[-1] if children else "", at)
        mine = self._switched_at.get(name)
        if mine is not None and (at is None or mine > at):
            return mine
        return at


def _healthy_replica(i: InstanceRecord, primary: str, lag_limit: float, now: float, fresh_within: float) -> bool:
    """A replica a switchover may pick: seen lately, reachable, replicating from the primary, not lagging."""
    return (
        i.reachable
        and i.role == "replica"
        and i.source == primary
        and i.receiving is not False
        and i.applying is not False
        and i.lag_seconds is not None
        and i.lag_seconds <= lag_limit
        and now - i.probed_at <= fresh_within
    )


def agent_zones(
    locate: Callable[[Address], str], labels: Callable[[str], Mapping[str, str]], ttl: float = 30.0
) -> Callable[[str], str]:
    """zone_of for the balancer: the `zone` label of the agent running an instance, else its host.

    locate: the agent running an address (AgentDirectory.locate; raises when none or several);
    labels: an agent's heartbeat labels. Answers are kept `ttl` seconds.
    """
    cache: dict[str, tuple[float, str]] = {}

    def zone_of(address: str) -> str:
        now = time.monotonic()
        hit = cache.get(address)
        if hit is not None and now - hit[0] < ttl:
            return hit[1]
        host = host_of(address)
        zone = host
        with contextlib.suppress(Exception):
            zone = labels(locate(Address.parse(address))).get("zone") or host
        cache[address] = (now, zone)
        return zone

    return zone_of
