"""Leadership: keep trying to take the lease, renew it while held, and hand duties on and off."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from app.log.lease.base import LeaseBackend, LeaseRecord
from app.supervise import supervisor

log = logging.getLogger("fleetmate.lease")


class Leadership:
    """Runs `on_gain` when this replica takes the lease and `on_lose` when it must stop leading.

    A holder that cannot renew steps down once `ttl * 0.8` has passed since its last
    successful renewal, before the backend lets anyone else take the lease; the terms in
    the log fence whatever a paused holder still appends after that.
    """

    def __init__(
        self,
        backend: LeaseBackend,
        record: LeaseRecord,
        renew_interval: float,
        on_gain: Callable[[], Awaitable[None]],
        on_lose: Callable[[], Awaitable[None]],
    ) -> None:
        self.backend = backend
        self.record = record
        self.renew_interval = renew_interval
        self.on_gain = on_gain
        self.on_lose = on_lose
        self.leading = False
        self.changes = 0
        self._last_ok = 0.0
        self.holder: LeaseRecord | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    def start(self) -> None:
        """Start the loop."""
        self._task = supervisor.watch(
            asyncio.create_task(self._run(), name="leadership"), "the lease loop", may_return=True
        )

    async def _run(self) -> None:
        while not self._stopping:
            try:
                if self.leading:
                    if await self.backend.renew(self.record):
                        self._last_ok = time.monotonic()
                    else:
                        await self._step_down("the lease was taken or expired")
                elif await self.backend.try_acquire(self.record):
                    self._last_ok = time.monotonic()
                    self.leading = True
                    self.changes += 1
                    try:
                        await self.on_gain()
                    except Exception as exc:
                        log.error("taking the lead failed; giving the lease back", extra={"error": repr(exc)})
                        await self._step_down("start-up as leader failed")
                        await self.backend.release(self.record)
                self.holder = self.record if self.leading else await self.backend.current()
            except Exception as exc:  # the bus may be away: keep trying, but never lead blind
                log.warning("lease round failed", extra={"error": repr(exc)})
            if self.leading and time.monotonic() - self._last_ok > self.backend.ttl * 0.8:
                await self._step_down("could not renew the lease in time")
            await asyncio.sleep(self.renew_interval)

    async def _step_down(self, why: str) -> None:
        if not self.leading:
            return
        self.leading = False
        self.changes += 1
        log.warning("stepping down", extra={"reason": why})
        await self.on_lose()

    async def stop(self) -> None:
        """Stop the loop; a leader stops its duties and releases the lease for a fast hand-over."""
        # The flag ends the loop even if a library swallowed the cancellation (seen: the task
        # stayed "cancelling" in its sleep), and the wait is bounded either way.
        self._stopping = True
        if self._task:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=self.renew_interval + 5)
            if not done:
                log.warning("leadership loop did not stop in time")
            else:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    self._task.result()
        if self.leading:
            self.leading = False
            await self.on_lose()
            await self.backend.release(self.record)
