"""Lean asyncio primitives for hot paths: a one-waiter signal and a mailbox bound to their loop.

On Python 3.11, asyncio.get_running_loop() makes a getpid() system call on every call (to
notice a fork), and asyncio.Event.wait, Queue.get, create_task and sleep all call it. In this
VM a system call costs over a microsecond: profiled under ZooKeeper setData load, the one in
each write's future creation alone took ~8% of the loop. These take the loop once.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Signal:
    """An asyncio.Event for a single waiter."""

    __slots__ = ("_flag", "_loop", "_waiter")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop
        self._flag = False
        self._waiter: asyncio.Future[None] | None = None

    def set(self) -> None:
        """Set the flag and wake the waiter."""
        self._flag = True
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def clear(self) -> None:
        """Reset the flag."""
        self._flag = False

    def is_set(self) -> bool:
        """True while the flag is set."""
        return self._flag

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is)."""
        if self._flag:
            return
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None


class Mailbox(Generic[T]):
    """An unbounded single-consumer queue, lighter than asyncio.Queue: with 10,000 watchers every
    event is one put and one wake-up per watcher, so each must cost as little as possible."""

    __slots__ = ("_items", "_loop", "_waiter")

    def __init__(self) -> None:
        self._items: deque[T] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def put_nowait(self, item: T) -> None:
        """Add an item and wake the consumer."""
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> T:
        """The next item, waiting for one."""
        while not self._items:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._items.popleft()

    def get_nowait(self) -> T:
        """The next item; IndexError when none waits."""
        return self._items.popleft()

    def qsize(self) -> int:
        """Items waiting."""
        return len(self._items)

    def empty(self) -> bool:
        """True when nothing waits."""
        return not self._items
