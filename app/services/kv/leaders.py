"""The partitions' NATS leaders spread over the NATS servers: the lease holder moves one at a time when unbalanced.

Each partition is a replicated stream with its own Raft leader, the server every append goes
through. Streams created one after another often end up led by one server; then that server does
all the work and its loss stalls every partition at once. Every BALANCE_EVERY_S the lease holder
counts the leaders per server and, when the most loaded leads two more than the least, asks one of
its partitions to step down in favour of the least loaded (a JetStream leader step-down with a
preferred server): one move per round, so a NATS election never stalls more than one partition.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import Counter

import msgspec

from app.bus.connection import Bus

log = logging.getLogger("fleetmate.kv")

BALANCE_EVERY_S = 5.0


class _Peer(msgspec.Struct):
    name: str
    current: bool = False


class _Cluster(msgspec.Struct):
    leader: str = ""
    replicas: list[_Peer] = []


class _Info(msgspec.Struct):
    cluster: _Cluster = msgspec.field(default_factory=_Cluster)


_info = msgspec.json.Decoder(_Info)


def plan_move(leaders: dict[str, _Cluster]) -> tuple[str, str] | None:
    """(stream, server to lead it) that evens the leaders per server, or None when within one."""
    servers: set[str] = set()
    for c in leaders.values():
        servers.add(c.leader)
        servers.update(p.name for p in c.replicas)
    servers.discard("")
    if len(servers) < 2:
        return None
    load = Counter({s: 0 for s in servers})
    load.update(c.leader for c in leaders.values() if c.leader)
    most = max(servers, key=lambda s: (load[s], s))
    for target in sorted(servers, key=lambda s: (load[s], s)):
        if load[most] - load[target] < 2:
            return None
        for stream, c in sorted(leaders.items()):
            if c.leader == most and any(p.name == target and p.current for p in c.replicas):
                return stream, target
    return None


class LeaderBalancer:
    """Run by the lease holder only (see the module docstring)."""

    def __init__(self, bus: Bus, streams: list[str]) -> None:
        self.bus = bus
        self.streams = streams
        self.moves = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Begin balancing (on gaining the lease)."""
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="kv-leader-balance")

    async def stop(self) -> None:
        """Stop balancing (on losing the lease, or stopping)."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(BALANCE_EVERY_S)
            try:
                await self.balance_once()
            except Exception as exc:  # the next round tries again
                log.warning("partition leader balancing failed", extra={"error": repr(exc)})

    async def leaders(self) -> dict[str, _Cluster]:
        """Each partition stream's leader and replicas, as JetStream reports them now."""
        out = {}
        for stream in self.streams:
            reply = await self.bus.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=2.0)
            out[stream] = _info.decode(reply.data).cluster
        return out

    async def balance_once(self) -> tuple[str, str] | None:
        """One round: the move made, if any."""
        move = plan_move(await self.leaders())
        if move is None:
            return None
        stream, target = move
        body = msgspec.json.encode({"placement": {"preferred": target}})
        await self.bus.nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", body, timeout=5.0)
        self.moves += 1
        log.info("partition leader moved", extra={"stream": stream, "to": target})
        return move
