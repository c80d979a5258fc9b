"""The lease interface: public methods here (logging, timing), a few primitives per backend."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from typing import ClassVar

import msgspec

log = logging.getLogger("fleetmate.lease")


class LeaseRecord(msgspec.Struct, frozen=True):
    """Who holds the lease and since when (wall clock, for display only: expiry is the backend's)."""

    holder: str
    acquired_at: float
    http_url: str = ""


class LeaseBackend(ABC):
    """A first-come lease with a TTL, renewed by its holder; the backend enforces the expiry."""

    name: ClassVar[str]

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.held = False

    async def try_acquire(self, record: LeaseRecord) -> bool:
        """Take the lease if nobody holds it; True when we now hold it."""
        got = await self._acquire(record)
        if got:
            self.held = True
            log.info("lease acquired", extra={"backend": self.name, "holder": record.holder})
        return got

    async def renew(self, record: LeaseRecord) -> bool:
        """Extend our lease; False when it is no longer ours (expired and taken, or deleted)."""
        started = time.monotonic()
        ok = await self._renew(record)
        if not ok:
            self.held = False
            log.warning("lease lost", extra={"backend": self.name, "holder": record.holder})
        elif time.monotonic() - started > self.ttl / 2:
            log.warning("lease renewal was slow", extra={"seconds": round(time.monotonic() - started, 3)})
        return ok

    async def release(self, record: LeaseRecord) -> None:
        """Give the lease up at once (graceful shutdown), so another replica takes it without waiting."""
        if self.held:
            self.held = False
            try:
                await self._release(record)
                log.info("lease released", extra={"backend": self.name, "holder": record.holder})
            except Exception as exc:  # it will expire by itself
                log.warning("lease release failed", extra={"error": repr(exc)})

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections (SQL pools, HTTP clients); called once at shutdown."""

    async def current(self) -> LeaseRecord | None:
        """The current holder, or None."""
        return await self._read()

    @abstractmethod
    async def _acquire(self, record: LeaseRecord) -> bool: ...

    @abstractmethod
    async def _renew(self, record: LeaseRecord) -> bool: ...

    @abstractmethod
    async def _release(self, record: LeaseRecord) -> None: ...

    @abstractmethod
    async def _read(self) -> LeaseRecord | None: ...
