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
    """A tiny deterministic machine: each command adds its amount and returns the new total."""

    def __init__(self) -> None:
        self.total = 0

    def apply(self, cmd: int) -> tuple[Any, list[Any]]:
        self.total += cmd
        return self.total, []


def _encode(cmds: Sequence[int]) -> bytes:
    return msgspec.msgpack.encode(list(cmds))


def _decode(data: bytes) -> list[int]:
    return msgspec.msgpack.decode(data, type=list[int])


async def _log(bus: Bus, machine: Counter) -> SharedLog[int]:
    log: SharedLog[int] = SharedLog(
        bus,
        stream="T_LOG",
        subject="t.log",
        replicas=1,
        node_id="t",
        machine=machine,
        encode=_encode,
        decode=_decode,
        commit=lambda seq, events: None,
        on_applied=lambda events: None,
        applied_seq=0,
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
