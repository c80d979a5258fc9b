"""Long-lived tasks under watch: one that ends unexpectedly is logged with its traceback, makes the
replica not ready with the reason, and makes the process exit non-zero so its service manager
(systemd, Kubernetes) restarts it. Never a silent stall."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, TypeVar

log = logging.getLogger("fleetmate.supervise")

T = TypeVar("T", bound="asyncio.Task[Any]")


class Supervisor:
    """Watches tasks that should run until cancelled; `failures` names those that did not."""

    def __init__(self) -> None:
        self.failures: list[str] = []
        self.on_failure: Callable[[str], None] | None = None

    def watch(self, task: T, what: str, *, may_return: bool = False) -> T:
        """Watch task (returned, for use at the creation site): an exception ends it as a failure, and
        so does returning, unless may_return (a loop that ends itself when asked to stop)."""
        task.add_done_callback(lambda t: self._ended(t, what, may_return))
        return task

    def _ended(self, task: asyncio.Task[Any], what: str, may_return: bool) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None and may_return:
            return
        reason = f"{what} stopped: {exc!r}" if exc is not None else f"{what} ended unexpectedly"
        log.critical("a long-lived task stopped; this replica cannot go on", extra={"task": what}, exc_info=exc)
        self.fail(reason)

    def fail(self, reason: str) -> None:
        """Record a failure that makes this process unfit to serve."""
        self.failures.append(reason)
        if self.on_failure is not None:
            self.on_failure(reason)

    @property
    def failure(self) -> str | None:
        """The first failure, or None."""
        return self.failures[0] if self.failures else None


# One per process: the tasks of every service report here.
supervisor = Supervisor()
