"""Free space where fleetmate writes: refuse client writes below disk.min_free_mb, resume once space is back.

A replica writes its data directory (the registry's SQLite file, DuckDB, the embedded
nats-server's JetStream store, snapshots in a file store there). A disk that fills under it
must not lose or corrupt anything, nor stop reads: clients' writes are refused (503
`DiskFull`) while the free space is below `disk.min_free_mb`, so the space left is kept for
what must go on (leases, heartbeats, leader duties, the commit of what was already
acknowledged); a write that fails on the disk anyway (ENOSPC, EIO) refuses them too, until
the space is back. Nothing needs an operator: the guard looks again every
`disk.check_interval` seconds and lets writes in as soon as there is room.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path

from app.errors import FleetmateError

log = logging.getLogger("fleetmate.disk")

MIB = 1 << 20


class DiskFull(FleetmateError):
    """A client write refused: the data directory is short of space (reads still work)."""

    code = "DiskFull"
    status = 503


def free_bytes(path: Path) -> int:
    """Bytes an unprivileged writer may still use on the file system holding `path` (statvfs)."""
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def describe_shortage(path: Path, free: int, min_free: int) -> str:
    """The sentence a refused client and the log read."""
    return (
        f"disk full: {path} has {free / MIB:.1f} MiB free, below disk.min_free_mb ({min_free // MIB} MiB); "
        "writes resume by themselves once space is freed"
    )


class DiskGuard:
    """Whether client writes are let in; one per process (`guard`), fed by `run()` and by failed writes."""

    def __init__(self) -> None:
        self.path: Path | None = None
        self.min_free = 0
        self.reason: str | None = None  # set: client writes are refused with it
        self._write_error: str | None = None
        self.refused = 0  # client writes refused since start (for /metrics)
        self.since = 0.0  # when the current shortage began (0: none)

    def configure(self, path: Path, min_free_bytes: int) -> None:
        """Watch `path` (the data directory), keeping `min_free_bytes` free."""
        self.path, self.min_free = path, min_free_bytes
        self.reason, self._write_error, self.since = None, None, 0.0

    def check_writable(self) -> None:
        """Raise DiskFull when client writes are refused now."""
        if self.reason is not None:
            self.refused += 1
            raise DiskFull(self.reason)

    def write_failed(self, where: str, exc: BaseException) -> None:
        """A write to the disk failed (ENOSPC, EIO): refuse client writes until a check finds room again."""
        if self._write_error is None:
            log.error("a write to the disk failed; refusing client writes", extra={"where": where, "error": str(exc)})
        self._write_error = (
            f"disk full: writing {where} failed ({exc}); writes resume by themselves once space is freed"
        )
        self._set(self._write_error)

    def check(self) -> bool:
        """Look at the free space now; True when client writes are let in."""
        if self.path is None:
            return True
        try:
            free = free_bytes(self.path)
        except OSError as exc:  # the directory itself is gone or unreadable: refuse, and say so
            self._set(f"disk full: cannot read the free space of {self.path}: {exc.strerror or exc}")
            return False
        # After a failed write, at least 1 MiB must be back even with disk.min_free_mb = 0.
        floor = max(self.min_free, MIB) if self._write_error else self.min_free
        if free < floor:
            self._set(describe_shortage(self.path, free, floor))
            return False
        if self.reason is not None:
            log.warning(
                "space is back; client writes are let in again",
                extra={
                    "path": str(self.path),
                    "free_mib": round(free / MIB, 1),
                    "after_s": round(time.time() - self.since, 1),
                },
            )
        self.reason, self._write_error, self.since = None, None, 0.0
        return True

    def _set(self, reason: str) -> None:
        if self.reason is None:
            self.since = time.time()
            log.error("refusing client writes", extra={"reason": reason})
        # A failed write keeps its own message until the space is back: it says what failed.
        self.reason = self._write_error or reason

    async def run(self, interval: float) -> None:
        """Check every `interval` seconds, for as long as the process serves."""
        while True:
            self.check()
            await asyncio.sleep(interval)


guard = DiskGuard()
