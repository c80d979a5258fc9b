"""Lease on one S3 object: conditional writes to take and renew, expiry judged on each contender's monotonic clock.

S3 has no server-side TTL and the hosts' wall clocks may disagree, so no contender reads an
expiry time written by another. The holder rewrites the object every renewal, and every write
carries a fresh nonce, so its ETag (an MD5 of the content on most servers) changes each time.
A contender remembers the ETag it saw and when it first saw it on its own monotonic clock;
only when that same ETag has stood unchanged for longer than the TTL (the larger of its own
and the holder's) does it treat the lease as expired and replace the object with
`If-Match: <that ETag>`. If anyone wrote in between, the server answers 412 and the contender
lost. Only clock rates matter, never offsets: a holder renewing at all keeps the ETag moving.

Take when absent: `If-None-Match: *`. Renew: `If-Match: <our last ETag>`; 412 (or 404) means
the lease was taken. Release: rewrite the object marked released, again with If-Match, so a
successor may take it at once and the term keeps growing; a stale releaser changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
from typing import ClassVar

import msgspec

from app.config import S3Config
from app.log.lease.base import LeaseBackend, LeaseRecord
from app.storage.s3client import PreconditionFailed, S3Client


class LeaseObject(msgspec.Struct, frozen=True):
    """The object's content: who holds the lease, the holder's TTL, its term, and a nonce per write."""

    record: LeaseRecord
    ttl: float
    term: int
    nonce: str
    released: bool = False


_dec = msgspec.json.Decoder(LeaseObject)


class S3Lease(LeaseBackend):
    """The object `<prefix>lease/<name>`, replaced only by conditional PUTs (see the module docstring)."""

    name: ClassVar[str] = "s3"

    def __init__(self, cfg: S3Config, lease_name: str, ttl: float, client: S3Client | None = None) -> None:
        super().__init__(ttl)
        self.client = client or S3Client(cfg, connect_timeout=max(1.0, ttl / 4), read_timeout=max(1.0, ttl / 2))
        self.key = self.client.key("lease", lease_name)
        self.term = 0
        self._etag: str | None = None  # of our own last write, while we hold the lease
        self._seen: tuple[str, float] | None = None  # (ETag, first seen on our monotonic clock)
        self._bucket_ready = False
        self._lock = asyncio.Lock()

    async def _ready(self) -> None:
        async with self._lock:
            if not self._bucket_ready:
                await self.client.ensure_bucket()
                self._bucket_ready = True

    def _encode(self, record: LeaseRecord, term: int, released: bool = False) -> bytes:
        body = LeaseObject(record, self.ttl, term, secrets.token_hex(8), released)
        return msgspec.json.encode(body)

    def _observe(self, etag: str, body: LeaseObject | None) -> bool:
        """Note the ETag seen now; True when that same ETag has stood for longer than the TTL."""
        now = time.monotonic()
        if self._seen is None or self._seen[0] != etag:
            self._seen = (etag, now)
            return False
        ttl = max(self.ttl, body.ttl if body else 0.0)
        return now - self._seen[1] > ttl

    @staticmethod
    def _decode(data: bytes) -> LeaseObject | None:
        try:
            return _dec.decode(data)
        except msgspec.DecodeError:
            return None  # not ours to read: judged by its ETag like any other holder's

    async def _acquire(self, record: LeaseRecord) -> bool:
        await self._ready()
        found = await self.client.get(self.key)
        if found is None:
            term, etag = self.term + 1, None
        else:
            data, etag = found
            body = self._decode(data)
            term = max(self.term, body.term if body else 0) + 1
            # Free at once: released, or held under our own id by an earlier run of this replica.
            free = body is not None and (body.released or body.record.holder == record.holder)
            if not free and not self._observe(etag, body):
                return False
        try:
            self._etag = await self.client.put_if(self.key, self._encode(record, term), etag=etag)
        except PreconditionFailed:
            return False  # someone else wrote first
        self.term = term
        self._seen = None
        return True

    async def _renew(self, record: LeaseRecord) -> bool:
        if self._etag is None:
            return False
        try:
            self._etag = await self.client.put_if(self.key, self._encode(record, self.term), etag=self._etag)
        except PreconditionFailed:
            self._etag = None
            return False
        return True

    async def _release(self, record: LeaseRecord) -> None:
        etag, self._etag = self._etag, None
        if etag is not None:
            with contextlib.suppress(PreconditionFailed):  # no longer ours: nothing to give back
                await self.client.put_if(self.key, self._encode(record, self.term, released=True), etag=etag)

    async def _read(self) -> LeaseRecord | None:
        await self._ready()
        found = await self.client.get(self.key)
        if found is None:
            return None
        data, etag = found
        body = self._decode(data)
        if etag == self._etag:
            return body.record if body else None
        if body is None or body.released or self._observe(etag, body):
            return None
        return body.record

    async def close(self) -> None:
        """Drop pooled connections."""
        await self.client.close()
