"""Lock and leader-election recipes on the registry's public API (ephemeral sequential nodes)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from app.services.registry import paths
from app.services.registry.errors import LockTimeout, NoNode
from app.services.registry.messages import Event
from app.services.registry.service import RegistryService


def _seq(name: str) -> int:
    tail = name[-10:]
    return int(tail) if tail.isdigit() else -1


def contenders(registry: RegistryService, path: str) -> list[str]:
    """Child names of path that are contenders, lowest sequence first."""
    try:
        names = registry.child_names(path)
    except NoNode:
        return []
    return sorted((n for n in names if _seq(n) >= 0), key=_seq)


def _resolver(fut: asyncio.Future[Event]) -> Callable[[Event], None]:
    def fire(event: Event) -> None:
        if not fut.done():
            fut.set_result(event)

    return fire


async def _wait_first(registry: RegistryService, path: str, node: str, wait_s: float) -> bool:
    """Wait until `node` is the lowest contender under path; False when wait_s runs out."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    name = paths.name_of(node)
    while True:
        order = contenders(registry, path)
        if name not in order:
            raise NoNode(f"{node} is gone (its session ended?)", node)
        index = order.index(name)
        if index == 0:
            return True
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        # Watch only the predecessor (no herd effect); read and watch happen in one loop step.
        predecessor = paths.join(path, order[index - 1])
        gone: asyncio.Future[Event] = loop.create_future()
        handle = registry.watch_once(predecessor, "exists", _resolver(gone))
        try:
            await asyncio.wait_for(gone, remaining)
        except TimeoutError:
            registry.cancel_once(predecessor, "exists", handle)
            return False


async def lock(registry: RegistryService, path: str, session_id: int, owner: str, wait_s: float) -> str:
    """Take the lock at path for the session; returns the lock node. Raises LockTimeout."""
    created = await registry.create(
        paths.join(path, "lock-"), owner.encode(), session_id=session_id, sequential=True, parents=True
    )
    try:
        if await _wait_first(registry, path, created.path, wait_s):
            return created.path
    except BaseException:
        with contextlib.suppress(Exception):
            await registry.delete(created.path)
        raise
    holder = contenders(registry, path)
    with contextlib.suppress(Exception):
        await registry.delete(created.path)
    raise LockTimeout(f"{path} is held by {holder[0] if holder else 'nobody'}; gave up after {wait_s:.1f}s", path)


async def join_election(
    registry: RegistryService, path: str, session_id: int, candidate: str, wait_s: float
) -> tuple[str, bool]:
    """Become a candidate at path; wait up to wait_s to lead. Returns (node, elected).

    Unlike a lock, a candidate that is not elected in time stays in line.
    """
    created = await registry.create(
        paths.join(path, "n_"), candidate.encode(), session_id=session_id, sequential=True, parents=True
    )
    elected = await _wait_first(registry, path, created.path, wait_s)
    return created.path, elected


def election_state(registry: RegistryService, path: str) -> tuple[str | None, str | None, list[str]]:
    """(leader candidate, leader node, every candidate in order) from local state."""
    order = contenders(registry, path)
    names = []
    for name in order:
        try:
            data, _ = registry.read(paths.join(path, name))
            names.append((data or b"").decode("utf-8", "replace"))
        except NoNode:
            continue
    if not order:
        return None, None, []
    return names[0], paths.join(path, order[0]), names
