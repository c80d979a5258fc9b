"""Lease on a JetStream KV bucket: create-if-absent to take, compare-and-set to renew, bucket TTL to expire."""

from __future__ import annotations

from typing import ClassVar

import msgspec
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from app.bus.connection import Bus
from app.bus.streams import ensure_kv
from app.log.lease.base import LeaseBackend, LeaseRecord

_dec = msgspec.json.Decoder(LeaseRecord)


class NatsLease(LeaseBackend):
    """The key expires with the bucket's max age unless its holder rewrites it in time.

    Every put is a new message, so a renewal restarts the TTL; `update(last=rev)` fails
    when anyone else wrote the key since, which is how a holder learns it lost the lease.
    """

    name: ClassVar[str] = "nats"

    def __init__(self, bus: Bus, bucket: str, key: str, ttl: float, replicas: int = 1) -> None:
        super().__init__(ttl)
        self.bus = bus
        self.bucket = bucket
        self.key = key
        self.replicas = replicas
        self._kv: KeyValue | None = None
        self._rev = 0

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await ensure_kv(self.bus.js, self.bucket, ttl=self.ttl, replicas=self.replicas)
        return self._kv

    async def _acquire(self, record: LeaseRecord) -> bool:
        kv = await self._bucket()
        try:
            self._rev = await kv.create(self.key, msgspec.json.encode(record))
        except KeyWrongLastSequenceError:
            return await self._take_over_own(kv, record)
        return True

    async def _take_over_own(self, kv: KeyValue, record: LeaseRecord) -> bool:
        # A lease still held under our own id belongs to an earlier run of this replica
        # (killed before it could release): take it over instead of waiting out the TTL.
        try:
            entry = await kv.get(self.key)
        except (KeyNotFoundError, KeyDeletedError):
            return False
        if not entry.value or _dec.decode(entry.value).holder != record.holder or entry.revision is None:
            return False
        try:
            self._rev = await kv.update(self.key, msgspec.json.encode(record), last=entry.revision)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _renew(self, record: LeaseRecord) -> bool:
        kv = await self._bucket()
        try:
            self._rev = await kv.update(self.key, msgspec.json.encode(record), last=self._rev)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def _release(self, record: LeaseRecord) -> None:
        kv = await self._bucket()
        await kv.delete(self.key, last=self._rev)

    async def _read(self) -> LeaseRecord | None:
        kv = await self._bucket()
        try:
            entry = await kv.get(self.key)
        except (KeyNotFoundError, KeyDeletedError):
            return None
        if not entry.value:
            return None
        return _dec.decode(entry.value)
