"""The writes a log published and has not applied yet: registered by the writer, answered by the applier."""

from __future__ import annotations

import asyncio
import math
from typing import Any


class Pending:
    """The futures of one published entry, resolved by the applier when it applies that entry.

    Each future has its deadline (time.monotonic()); `due` is the earliest of those still open, so a
    sweep looks at one number per entry rather than at every write.
    """

    __slots__ = ("deadlines", "due", "futures")

    def __init__(self, futures: list[asyncio.Future[Any]], deadlines: list[float]) -> None:
        self.futures = futures
        self.deadlines = deadlines
        self.due = min(deadlines) if deadlines else math.inf

    def expire(self, now: float) -> None:
        """Fail the futures whose deadline has passed (TimeoutError) and recompute `due`."""
        due = math.inf
        for fut, deadline in zip(self.futures, self.deadlines, strict=True):
            if fut.done():
                continue
            if deadline <= now:
                fut.set_exception(TimeoutError("the write was not applied in time"))
            elif deadline < due:
                due = deadline
        self.due = due

    def answer(self, results: list[Any]) -> None:
        """Give each writer its command's apply result, in order."""
        for fut, result in zip(self.futures, results, strict=False):
            if not fut.done():
                fut.set_result(result)

    def fail(self, exc: BaseException) -> None:
        """Fail every writer still waiting."""
        for fut in self.futures:
            if not fut.done():
                fut.set_exception(exc)


class PendingWrites:
    """Published entries by their message id, until applied (answered) or given up (failed).

    One table per log: the writer registers an entry before publishing it; the applier takes it
    when that entry comes back in the log; the deadline sweep expires what waits too long.
    """

    __slots__ = ("_by_id",)

    def __init__(self) -> None:
        self._by_id: dict[str, Pending] = {}

    def register(self, msg_id: str, futures: list[asyncio.Future[Any]], deadlines: list[float]) -> None:
        """An entry is about to be published under msg_id."""
        self._by_id[msg_id] = Pending(futures, deadlines)

    def take(self, msg_id: str) -> Pending | None:
        """The entry applied under msg_id (None: another replica's, or given up)."""
        return self._by_id.pop(msg_id, None)

    def forget(self, msg_id: str) -> None:
        """The writer gave the entry up (its outcome unknown): its applying answers nobody."""
        self._by_id.pop(msg_id, None)

    def expire(self, now: float) -> None:
        """Fail the writes whose deadline has passed."""
        for pending in list(self._by_id.values()):
            if pending.due <= now:
                pending.expire(now)

    def fail_all(self, exc: BaseException) -> None:
        """Fail every waiting write (the applier stopped)."""
        for pending in self._by_id.values():
            pending.fail(exc)

    def __len__(self) -> int:
        return len(self._by_id)
