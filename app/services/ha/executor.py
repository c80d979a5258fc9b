"""RecoveryExecutor: runs a dead primary's recovery (plan, promote, repoint, record), fences a returning old
primary (read-only, then a replica: repointed, or for PostgreSQL rewound by the agent on its host), and runs
the failover hooks.

The leader's automatic recovery writes with its lease term (duty); an operator's manual failover,
served by any replica, writes without one.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
from collections.abc import Callable
from typing import Any

from app.adaptors.base import Adaptor, AdaptorError
from app.adaptors.types import Address, InstanceStatus
from app.config import HaConfig
from app.services.agent.messages import PgRejoinRequest
from app.services.ha.agents import AgentCallFailed, AgentDirectory
from app.services.ha.analysis import Analysis
from app.services.ha.catalog import ClusterCatalog
from app.services.ha.credentials import credentials_for
from app.services.ha.errors import UnknownCluster
from app.services.ha.layout import ClusterRecord
from app.services.ha.recovery import Blocked, ClusterPolicy, RecoveryPlan, plan_recovery
from app.services.registry.errors import RegistryError
from app.telemetry import tracer

log = logging.getLogger("fleetmate.ha")

LOCATE_PATIENCE_S = 15.0  # how long a fence waits for an agent to report the instance's socket
FENCE_RETRY_S = 30.0  # a failed fence of an old primary is tried again after this long


class RecoveryExecutor:
    """Recovery, fencing, agent-driven rejoin and hooks for every cluster of this replica."""

    def __init__(
        self,
        catalog: ClusterCatalog,
        cfg: HaConfig,
        agents: AgentDirectory | None,
        clock: Callable[[], float],
    ) -> None:
        self.catalog = catalog
        self.cfg = cfg
        self.agents = agents
        self.clock = clock
        self.recoveries = 0
        self._blocked_said: dict[str, str] = {}
        self._fencing: dict[str, asyncio.Task[None]] = {}  # cluster -> the fence running for it
        self._fence_failed_at: dict[tuple[str, str], float] = {}

    def policy(self, name: str, record: ClusterRecord) -> ClusterPolicy:
        """The cluster's recovery policy now: its rules, live downtimes and the configured limits."""
        now = self.clock()
        recorded = {i.address: i for i in self.catalog.instances(name)}
        primary = recorded.get(self.catalog.primary(name))
        auto = self.cfg.auto_recover if record.auto_recover is None else record.auto_recover
        return ClusterPolicy(
            rules={Address.parse(a): rule for a, rule in record.rules.items()},
            downtime=frozenset(Address.parse(a) for a, until in record.downtime.items() if until > now),
            require_complete=primary is not None and primary.sync_replication,
            block_seconds=self.cfg.recovery_block_seconds,
            auto_recover=auto,
        )

    async def unmark_old_primary(self, name: str, address: Address) -> None:
        """Take an instance about to be promoted off the list of failed primaries to fence, before it
        is promoted: else the leader could see it writable and fence it before the primary key moves."""
        if not await self.catalog.unmark_old_primary(name, address):
            raise AdaptorError(
                address, "could not take it off the failed primaries to fence (the record kept changing)"
            )

    # ---- recovery -------------------------------------------------------------------------------

    async def recover(
        self,
        name: str,
        record: ClusterRecord,
        finding: Analysis,
        probes: dict[Address, InstanceStatus],
        adaptor: Adaptor,
        policy: ClusterPolicy | None = None,
        duty: bool = True,
    ) -> str | None:
        """Plan and run the recovery of a dead primary; the reason it was blocked or failed, None when done.

        duty: the leader's automatic recovery (its writes fenced by its term); False for an
        operator's manual failover, served by any replica with `policy` relaxed by the request.
        """
        note = functools.partial(self.catalog.note, duty=duty)
        with tracer().start_as_current_span("ha.recover", attributes={"ha.cluster": name, "ha.manual": not duty}):
            policy = policy or self.policy(name, record)
            plan = plan_recovery(name, finding, probes, policy, self.clock(), record.last_recovery_at)
            if isinstance(plan, Blocked):
                if self._blocked_said.get(name) != plan.reason:
                    self._blocked_said[name] = plan.reason
                    await note(name, "blocked", plan.reason, str(finding.instance))
                return plan.reason
            self._blocked_said.pop(name, None)
            what = "recovering dead primary" if duty else "manual failover of dead primary"
            await note(name, "recovery", f"{what} {finding.instance}", str(finding.instance))
            waiting = [s.instance for s in plan.steps if s.kind == "wait_applied"]
            results = await asyncio.gather(
                *(adaptor.wait_applied(a, self.cfg.apply_timeout) for a in waiting), return_exceptions=True
            )
            applied = set()
            for address, result in zip(waiting, results, strict=True):
                if isinstance(result, InstanceStatus):
                    probes[address] = result
                    applied.add(address)
                else:
                    await note(name, "failed", f"{address} did not apply its backlog: {result}", str(address))
                    probes[address] = await adaptor.probe(address)
            final = plan_recovery(name, finding, probes, policy, self.clock(), record.last_recovery_at, applied)
            if isinstance(final, Blocked):
                await note(name, "blocked", final.reason, str(finding.instance))
                return final.reason
            return await self._execute(name, final, adaptor, duty)

    async def _execute(self, name: str, plan: RecoveryPlan, adaptor: Adaptor, duty: bool = True) -> str | None:
        note = functools.partial(self.catalog.note, duty=duty)
        old, new = plan.failed_primary, plan.candidate
        if not await self.hook(name, "pre_failover", self.cfg.pre_failover_hook, old, new, duty):
            return "the pre-failover hook failed"
        try:
            await self.unmark_old_primary(name, new)
            await adaptor.promote(new, synchronous=plan.synchronous)
        except AdaptorError as exc:
            await note(name, "failed", f"promoting {new} failed: {exc}", str(new))
            return f"promoting {new} failed: {exc}"
        await note(name, "step", f"promoted {new} ({plan.reason})", str(new))
        for step in plan.steps:
            if step.kind != "repoint":
                continue
            try:
                await adaptor.repoint(step.instance, new)
                await note(name, "step", f"{step.instance} replicates from {new}", str(step.instance))
            except AdaptorError as exc:
                await note(name, "failed", f"repointing {step.instance} failed: {exc}", str(step.instance))
        await self.catalog.publish_failover(name, old, new, duty)
        self.recoveries += 1
        log.warning("failover done", extra={"cluster": name, "old_primary": str(old), "new_primary": str(new)})
        await self.hook(name, "post_failover", self.cfg.post_failover_hook, old, new, duty)
        return None

    # ---- fencing --------------------------------------------------------------------------------

    def start_fence(
        self, name: str, record: ClusterRecord, old: Address, primary: Address, adaptor: Adaptor, writable: bool
    ) -> None:
        """Fence a returning old primary in the background (a PostgreSQL rejoin takes a while);
        one fence per cluster at a time, and a failed one is retried after FENCE_RETRY_S."""
        running = self._fencing.get(name)
        if running is not None and not running.done():
            return
        failed_at = self._fence_failed_at.get((name, str(old)))
        if failed_at is not None and self.clock() - failed_at < FENCE_RETRY_S:
            return
        self._fencing[name] = asyncio.create_task(
            self._fence(name, record, old, primary, adaptor, writable), name="ha-fence"
        )

    def fences(self) -> list[asyncio.Task[None]]:
        """Take the fences in flight (to cancel them: this replica stops leading)."""
        tasks = list(self._fencing.values())
        self._fencing.clear()
        return tasks

    async def _fence(
        self, name: str, record: ClusterRecord, old: Address, primary: Address, adaptor: Adaptor, writable: bool
    ) -> None:
        """A failed primary came back writable: make it read-only, then a replica of the current primary
        (PostgreSQL: rewound into a standby by the agent on its host, when ha.rejoin is on)."""
        note = self.catalog.note
        try:
            if str(old) not in self.catalog.record(name).old_primaries or self.catalog.primary(name) == str(old):
                return  # promoted again meanwhile (a switchover or failover onto it): nothing to fence
        except UnknownCluster:
            return  # forgotten meanwhile
        try:
            if writable:
                await adaptor.set_read_only(old, True)
                await note(name, "fenced", f"{old} came back writable: set read-only", str(old))
            if record.engine == "postgresql":
                if not self.cfg.rejoin:
                    if writable:
                        await note(name, "fenced", f"{old} left read-only (ha.rejoin is off)", str(old))
                    return
                await self._rejoin(name, record, old, primary)
            else:
                await adaptor.repoint(old, primary)
                await note(name, "fenced", f"{old} replicates from {primary}", str(old))
            self._fence_failed_at.pop((name, str(old)), None)
        except (AdaptorError, AgentCallFailed) as exc:
            self._fence_failed_at[(name, str(old))] = self.clock()
            with contextlib.suppress(RegistryError):
                await note(name, "failed", f"fencing {old} is incomplete: {exc}", str(old))

    async def _locate_agent(self, address: Address, patience: float = LOCATE_PATIENCE_S) -> str:
        """The agent running address; waits a little, since an instance that just started shows up
        in its agent's facts only at the agent's next heartbeat."""
        assert self.agents is not None
        deadline = asyncio.get_running_loop().time() + patience
        while True:
            try:
                return self.agents.locate(address)
            except AgentCallFailed:
                if asyncio.get_running_loop().time() >= deadline:
                    raise
            await asyncio.sleep(0.5)

    async def _rejoin(self, name: str, record: ClusterRecord, old: Address, primary: Address) -> None:
        """Ask the agent on the old primary's host to pg_rewind it into a standby of primary."""
        if self.agents is None:
            raise AgentCallFailed("no agent directory: cannot rejoin")
        node = await self._locate_agent(old)
        login, replication = credentials_for(self.cfg, record.name, record.user, record.database)
        request = PgRejoinRequest(
            address=str(old),
            port=old.port,
            source=str(primary),
            user=login.user,
            password=login.password,
            database=login.database or "postgres",
            replication_user=replication.user,
            replication_password=replication.password,
            connect_timeout=self.cfg.connect_timeout,
            timeout=self.cfg.rejoin_timeout,
        )
        note = self.catalog.note
        await note(name, "fenced", f"{old}: agent {node} rewinds it into a standby of {primary}", str(old))
        report = await self.agents.pg_rejoin(node, request)
        await note(
            name,
            "fenced",
            f"{old} rejoined as a standby of {primary} (pg_rewind by agent {node}, {report.seconds:.1f} s)",
            str(old),
        )

    # ---- hooks ----------------------------------------------------------------------------------

    async def hook(self, name: str, which: str, command: str, old: Address, new: Address, duty: bool = True) -> bool:
        """Run a failover hook; False when a pre-failover hook failed (the failover stops)."""
        if not command:
            return True
        env: dict[str, Any] = {
            **os.environ,
            "FLEETMATE_HA_CLUSTER": name,
            "FLEETMATE_HA_OLD_PRIMARY": str(old),
            "FLEETMATE_HA_NEW_PRIMARY": str(new),
        }
        try:
            proc = await asyncio.create_subprocess_shell(
                command, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), self.cfg.hook_timeout)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                raise RuntimeError(f"timed out after {self.cfg.hook_timeout:g}s") from None
            if proc.returncode != 0:
                tail = out.decode(errors="replace").strip().splitlines()[-1:] or [""]
                raise RuntimeError(f"exit code {proc.returncode}: {tail[0]}")
        except (OSError, RuntimeError) as exc:
            await self.catalog.note(name, "failed", f"{which} hook failed: {exc}", duty=duty)
            return which != "pre_failover"
        await self.catalog.note(name, "step", f"{which} hook ran", duty=duty)
        return True
