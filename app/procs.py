"""Child processes: die with the parent, and stop with SIGTERM then SIGKILL after a grace period."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal

log = logging.getLogger("fleetmate.procs")

_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child before exec: get SIGTERM when the parent dies (kill -9 included), so no orphan lingers."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


async def terminate(proc: asyncio.subprocess.Process, grace: float, what: str) -> None:
    """SIGTERM, wait up to `grace` seconds, then SIGKILL; returns once the process is gone."""
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.send_signal(signal.SIGTERM)
    try:
        await asyncio.wait_for(proc.wait(), grace)
    except TimeoutError:
        log.warning("process ignored SIGTERM; killing it", extra={"process": what})
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()
