"""The data directory lock: one fleetmate process (replica, worker or `fleetmate restore`) per data directory."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "fleetmate.lock"


class DataDirInUse(RuntimeError):
    """Another process holds the data directory."""


class DataDirLock:
    """An exclusive flock on `<data_dir>/fleetmate.lock`, held while the process uses the directory.

    The kernel drops it when the process ends, kill -9 included, so a stale lock file never
    blocks a restart. The file holds the holder's pid, for the message that names it.
    """

    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self, what: str = "a replica") -> None:
        """Take the lock; DataDirInUse (naming the holder's pid) when another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            who = _read_holder(fd)
            os.close(fd)
            raise DataDirInUse(f"{self.path.parent} is in use by another fleetmate process ({who})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}, {what}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Let the directory go (closing the file drops the lock)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def holder(data_dir: Path) -> str | None:
    """Who holds `data_dir` right now ("pid 123, a replica"), or None when nobody does."""
    path = data_dir / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)  # closing drops the probe's shared lock


def _read_holder(fd: int) -> str:
    with contextlib.suppress(OSError):
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
        if text:
            return text
    return "pid unknown"
