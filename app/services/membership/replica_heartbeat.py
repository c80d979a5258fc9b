"""This replica's own heartbeat: a ReplicaHeartbeat on the bus every membership.heartbeat_interval seconds."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable

import msgspec

from app import __version__
from app.bus import subjects
from app.bus.connection import Bus
from app.services.agent.messages import HostInfo
from app.services.membership.messages import ReplicaHeartbeat
from app.supervise import supervisor

log = logging.getLogger("fleetmate.membership")

_enc = msgspec.json.Encoder()


class ReplicaHeartbeater:
    """Publishes this replica's heartbeat (host figures, HTTP and ZooKeeper addresses) and runs `after_beat`."""

    def __init__(
        self,
        bus: Bus,
        node_id: str,
        started_at: float,
        interval: float,
        host_info: Callable[[], HostInfo],
        addresses: Callable[[], tuple[str, str]],
        after_beat: Callable[[], None],
    ) -> None:
        self.bus = bus
        self.node_id = node_id
        self.started_at = started_at
        self.interval = interval
        self.host_info = host_info
        self.addresses = addresses
        self.after_beat = after_beat
        self._seq = 0
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start beating."""
        self._task = supervisor.watch(
            asyncio.create_task(self._loop(), name="membership-heartbeat"), "the membership heartbeat"
        )

    async def stop(self) -> None:
        """Stop beating."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _loop(self) -> None:
        subject = subjects.agent_heartbeat(self.node_id)
        while True:
            try:
                host = await asyncio.to_thread(self.host_info)
                http_url, zk_address = self.addresses()
                self._seq += 1
                beat = ReplicaHeartbeat(
                    node_id=self.node_id,
                    kind="replica",
                    labels={},
                    seq=self._seq,
                    sent_at=time.time(),
                    started_at=self.started_at,
                    version=__version__,
                    host=host,
                    http_url=http_url,
                    zk_address=zk_address,
                )
                await self.bus.nc.publish(subject, _enc.encode(beat))
            except Exception as exc:  # the bus may be reconnecting; the next beat retries
                log.debug("replica heartbeat failed", extra={"error": repr(exc)})
            self.after_beat()
            await asyncio.sleep(self.interval)
