"""Leader duties for the registry: track keepalives, expire timed-out sessions, reap empty containers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from app.services.registry.errors import RegistryError, StaleTerm
from app.services.registry.messages import Command, ExpireSession, LeaderElected, ReapContainer
from app.services.registry.state import RegistryState
from app.supervise import supervisor

log = logging.getLogger("fleetmate.registry")

TICK_S = 0.2


class SessionKeeper:
    """Runs on the leader. Keepalives are not log commands: they only refresh `last_seen` here.

    On taking the lead every known session gets a fresh timeout from that moment, as
    ZooKeeper and etcd do, so a leader change never expires a live client.
    """

    def __init__(
        self,
        state: RegistryState,
        append: Callable[[Command], Awaitable[Any]],
        node_id: str,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        reap_every_s: float = 60.0,
    ) -> None:
        self.state = state
        self.append = append
        self.node_id = node_id
        self.clock = clock
        self.wall_clock = wall_clock  # TTL nodes compare with mtime, which is wall-clock ms
        self.reap_every_s = reap_every_s  # as ZooKeeper's container manager: a round, then a pause
        self.term = 0
        self.last_seen: dict[int, float] = {}
        self._task: asyncio.Task[None] | None = None
        self.expired = 0
        self.fenced = 0

    async def lead(self) -> None:
        """Append leader_elected for a new term and start the expiry loop."""
        while True:
            term = self.state.term + 1
            result = await self.append(LeaderElected(term, self.node_id, int(time.time() * 1000)))
            if not isinstance(result, RegistryError):
                break  # another replica raced us to this term: try the next
        self.term = term
        now = self.clock()
        self.last_seen = dict.fromkeys(self.state.sessions, now)
        self._task = supervisor.watch(asyncio.create_task(self._run(), name="session-keeper"), "the session keeper")
        log.info("leading the registry", extra={"term": term, "sessions": len(self.last_seen)})

    @property
    def leading(self) -> bool:
        """True while this keeper runs as the leader's."""
        return self._task is not None and not self._task.done()

    def touch(self, session_id: int, idle_s: float = 0.0) -> int | None:
        """Record a keepalive for activity idle_s seconds ago; returns the session's timeout, or
        None when it does not exist. A keepalive older than one already recorded changes nothing."""
        record = self.state.sessions.get(session_id)
        if record is None:
            return None
        active = self.clock() - max(0.0, idle_s)
        if active > self.last_seen.get(session_id, active - 1):
            self.last_seen[session_id] = active
        return record.timeout_ms

    def overdue(self) -> list[int]:
        """Sessions whose timeout has passed since their last keepalive (or since we took the lead)."""
        now = self.clock()
        out = []
        for sid, record in self.state.sessions.items():
            seen = self.last_seen.setdefault(sid, now)  # a session we never heard of starts now
            if now - seen > record.timeout_ms / 1000:
                out.append(sid)
        for sid in [s for s in self.last_seen if s not in self.state.sessions]:
            del self.last_seen[sid]
        return out

    async def _run(self) -> None:
        last_reap = self.clock()
        while True:
            await asyncio.sleep(TICK_S)
            try:
                for sid in self.overdue():
                    result = await self.append(ExpireSession(sid, self.term))
                    if not isinstance(result, RegistryError):
                        self.expired += 1
                        log.info("session expired", extra={"session_id": f"0x{sid:x}", "term": self.term})
                    elif isinstance(result, StaleTerm):
                        self.fenced += 1
                        log.warning("expiry refused: a newer leader exists", extra={"term": self.term})
                    self.last_seen.pop(sid, None)
                if self.clock() - last_reap >= self.reap_every_s:
                    last_reap = self.clock()
                    now_ms = int(self.wall_clock() * 1000)
                    for path in self.state.containers_to_reap(now_ms):
                        await self.append(ReapContainer(path, self.term, now_ms))
            except Exception as exc:  # the bus may be reconnecting; try again next tick
                log.warning("session keeper round failed", extra={"error": repr(exc)})

    async def stop(self) -> None:
        """Stop leading."""
        task, self._task = self._task, None
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.last_seen.clear()
