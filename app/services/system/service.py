"""System service handlers: answer NodeInfo over the bus and announce this replica in the KV bucket."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js.errors import NoKeysError
from nats.js.kv import KeyValue
from nats.micro.service import Service

from app import __version__
from app.bus import codec, subjects
from app.bus.connection import Bus
from app.bus.micro import Endpoint, HandlerError, call, start_service
from app.bus.streams import ensure_kv
from app.services.system.messages import InfoRequest, NodeInfo, ReplicaRecord
from app.supervise import supervisor

log = logging.getLogger("fleetmate.system")

ANNOUNCE_EVERY_S = 2.0
REPLICA_TTL_S = 15.0


class SystemService:
    """Answers `fleetmate.system.<node>.info` and keeps this replica's record fresh."""

    def __init__(self, bus: Bus, node_id: str, describe: Callable[[], NodeInfo], replicas: int = 1) -> None:
        self.bus = bus
        self.kv_replicas = replicas
        self.node_id = node_id
        self.describe = describe
        self._service: Service | None = None
        self._kv: KeyValue | None = None
        self._announcer: asyncio.Task[None] | None = None
        self._known: dict[str, ReplicaRecord] = {}
        self._announcements: Subscription | None = None

    async def start(self) -> None:
        """Register on the bus and start announcing."""
        self._kv = await ensure_kv(self.bus.js, subjects.REPLICAS_BUCKET, ttl=REPLICA_TTL_S, replicas=self.kv_replicas)
        self._service = await start_service(
            self.bus.nc,
            name=subjects.SYSTEM_SERVICE,
            version=__version__,
            description="fleetmate replica information",
            endpoints=[Endpoint("info", subjects.system_info(self.node_id), self._info)],
            metadata={"node_id": self.node_id},
        )
        # Announcements travel on core NATS (cheap, every replica hears them); the KV bucket
        # seeds a replica that has just started. Reading the bucket per request created a
        # JetStream consumer per call, which under polling hit the server's consumer limit.
        self._announcements = await self.bus.nc.subscribe(subjects.REPLICAS_ANNOUNCE, cb=self._heard)
        await self._seed()
        try:
            await self._announce_once()
        except Exception as exc:  # a bucket another replica has only just created may not answer yet
            log.warning("first announcement failed; the announce loop retries", extra={"error": repr(exc)})
        self._announcer = supervisor.watch(
            asyncio.create_task(self._announce_loop(), name="system-announce"), "the replica announcer"
        )

    async def _seed(self) -> None:
        assert self._kv is not None
        try:
            keys = await self._kv.keys()
        except NoKeysError:
            return
        for key in keys:
            with contextlib.suppress(Exception):
                entry = await self._kv.get(key)
                if entry.value:
                    record = codec.decode(entry.value, ReplicaRecord)
                    self._known.setdefault(record.node_id, record)

    async def _heard(self, msg: Msg) -> None:
        try:
            record = codec.decode(msg.data, ReplicaRecord)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        if record.seen_at == 0:  # a replica leaving
            self._known.pop(record.node_id, None)
        else:
            self._known[record.node_id] = record

    async def _info(self, data: bytes) -> bytes:
        if data:
            try:
                codec.decode(data, InfoRequest)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                raise HandlerError("400", f"bad InfoRequest: {exc}") from exc
        return codec.encode(self.describe())

    def _record(self) -> ReplicaRecord:
        info = self.describe()
        return ReplicaRecord(
            node_id=info.node_id,
            http_url=info.http_url,
            version=info.version,
            started_at=info.started_at,
            seen_at=time.time(),
            pid=os.getpid(),
            host=socket.gethostname(),
            revision=info.revision,
            applied_seq=info.applied_seq,
            zk_address=info.zk_address,
            zk_secure_address=info.zk_secure_address,
        )

    async def _announce_once(self) -> None:
        assert self._kv is not None
        record = codec.encode(self._record())
        await self.bus.nc.publish(subjects.REPLICAS_ANNOUNCE, record)
        await self._kv.put(self.node_id, record)

    async def _announce_loop(self) -> None:
        while True:
            await asyncio.sleep(ANNOUNCE_EVERY_S)
            try:
                await self._announce_once()
            except Exception as exc:  # the bus may be reconnecting; the next round retries
                log.debug("announce failed", extra={"error": str(exc)})

    async def replicas(self) -> list[ReplicaRecord]:
        """Every replica heard from within the last REPLICA_TTL_S seconds (by its own clock)."""
        return sorted(self.known(), key=lambda r: r.node_id)

    def known(self) -> list[ReplicaRecord]:
        """Every replica heard from within the last REPLICA_TTL_S seconds, in no order (sync)."""
        horizon = time.time() - REPLICA_TTL_S
        return [r for r in self._known.values() if r.seen_at > horizon]

    async def ask(self, node_id: str, timeout: float = 2.0) -> NodeInfo:
        """Ask any replica (this one included) for its NodeInfo over the bus."""
        data = await call(self.bus.nc, subjects.system_info(node_id), codec.encode(InfoRequest()), timeout)
        return codec.decode(data, NodeInfo)

    async def stop(self) -> None:
        """Stop announcing, withdraw the record, and leave the bus."""
        if self._announcer:
            self._announcer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._announcer
        if self._announcements is not None:
            with contextlib.suppress(Exception):
                await self._announcements.unsubscribe()
        with contextlib.suppress(Exception):
            gone = msgspec.structs.replace(self._record(), seen_at=0.0)
            await self.bus.nc.publish(subjects.REPLICAS_ANNOUNCE, codec.encode(gone))
        if self._kv is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._kv.delete(self.node_id), 1.0)
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
