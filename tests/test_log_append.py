"""The shared log on a real nats-server: answers, a stalled server times writes out, and retries count once."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import msgspec
import pytest

from app.bus.connection import Bus
from app.log.engine import SharedLog
from tests.harness import NatsServer


class Counter:
    """A tiny deterministic machine: each command adds its amount and returns the new total.

    The part of a LogUser (app.log.user) that SharedLog itself calls; nothing is stored."""

    def __init__(self) -> None:
        self.total = 0

    def apply(self, cmd: int) -> tuple[Any, list[Any]]:
        self.total += cmd
        return self.total, []

    def encode(self, cmds: Sequence[int]) -> bytes:
        return msgspec.msgpack.encode(list(cmds))

    def decode(self, data: bytes) -> list[int]:
        return msgspec.msgpack.decode(data, type=list[int])

    def applied(self, events: list[Any]) -> None:
        pass

    def commit(self, applied_seq: int, events: list[Any]) -> None:
        pass


async def _log(bus: Bus, machine: Counter) -> SharedLog[int]:
    log: SharedLog[int] = SharedLog(
        bus,
        stream="T_LOG",
        subject="t.log",
        replicas=1,
        node_id="t",
        user=machine,  # type: ignore[arg-type]  # the parts SharedLog calls
    )
    await log.start()
    return log


async def test_writes_answer_time_out_while_the_server_is_stalled_and_resume(nats_server: NatsServer) -> None:
    bus = Bus([nats_server.url], "test-log")
    await bus.connect(timeout=10)
    machine = Counter()
    log = await _log(bus, machine)
    try:
        totals = await asyncio.gather(*(log.append(1) for _ in range(50)))
        assert sorted(totals) == list(range(1, 51))  # every write answered with its own apply result

        assert nats_server.proc is not None
        os.kill(nats_server.proc.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(TimeoutError):
                await log.append(100, timeout=0.5)
            waited = time.monotonic() - started
            assert 0.45 <= waited < 2.0  # the deadline sweep runs every 50 ms
        finally:
            os.kill(nats_server.proc.pid, signal.SIGCONT)

        # The timed-out write may still land (its publish is retried under one msg id, so once at
        # most); writes after it are answered again.
        total = await log.append(1, timeout=15)
        assert total in (51, 151)
        await asyncio.sleep(1.5)  # let a late retry of the stalled entry arrive, if it is coming
        assert machine.total in (51, 151)
        assert log.stats()["applied_commands"] in (51, 52)
    finally:
        await log.stop()
        await bus.close()


class Fussy(Counter):
    """A machine with a bug: a command of 13 raises inside apply."""

    def apply(self, cmd: int) -> tuple[Any, list[Any]]:
        if cmd == 13:
            raise ZeroDivisionError("unlucky")
        return super().apply(cmd)


async def test_one_command_that_cannot_be_encoded_or_applied_fails_alone(nats_server: NatsServer) -> None:
    from app.log.batcher import UnencodableCommand
    from app.log.engine import ApplyFailed
    from app.supervise import supervisor

    bus = Bus([nats_server.url], "test-log")
    await bus.connect(timeout=10)
    machine = Fussy()
    log = await _log(bus, machine)
    try:
        # Batched together: 2**64 cannot be written as msgpack; it fails alone, its neighbours apply.
        futures = [log.submit(1), log.submit(2**64), log.submit(13), log.submit(2)]
        done = await asyncio.gather(*futures, return_exceptions=True)
        assert done[0] == 1
        assert isinstance(done[1], UnencodableCommand)
        assert isinstance(done[2], ApplyFailed)  # the same result on every replica; the log goes on
        assert done[3] == 3
        # The writer and the applier are alive: later writes answer at once.
        assert await asyncio.wait_for(log.append(5), 2) == 8
        assert log.failed is None
        assert supervisor.failures == []
    finally:
        await log.stop()
        await bus.close()
