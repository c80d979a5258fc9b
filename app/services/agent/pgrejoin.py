"""Rejoin a local PostgreSQL former primary as a standby: find its postmaster by port, stop it, pg_rewind, start it.

The HA service fences a failed primary that came back writable; for PostgreSQL the real fence
is to make it a standby of the new primary, which needs its data directory: so the agent on
its host does it. Everything about the instance is read from its running postmaster: the data
directory (its working directory), the binaries (its executable's directory), the OS account
it runs as, and its command-line options, which `pg_ctl start` passes again on the restart.
A postmaster run by systemd is restarted outside systemd's control; such hosts should rejoin
through their service manager instead (not done here).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shlex
import signal
import time
from pathlib import Path

import psutil

from app.adaptors import registry as adaptors
from app.adaptors.base import AdaptorError
from app.adaptors.types import Address, Credentials
from app.services.agent.messages import PgRejoinReport, PgRejoinRequest
from app.services.agent.ports import listening_ports

STOP_TIMEOUT_S = 60.0
LOG_NAME = "fleetmate-rejoin.log"  # in the data directory: what the restarted postmaster prints


class RejoinError(Exception):
    """The rejoin could not be done; the message says which step and what is left (running or stopped)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


class Postmaster:
    """A running postmaster as /proc shows it."""

    def __init__(self, proc: psutil.Process) -> None:
        with proc.oneshot():
            self.pid = proc.pid
            self.data_dir = Path(proc.cwd())  # the postmaster chdirs into its data directory
            self.bin_dir = Path(proc.exe()).parent
            self.user = proc.username()
            self.argv = proc.cmdline()
        if not (self.data_dir / "PG_VERSION").is_file():
            raise RejoinError("409", f"process {self.pid} does not run in a PostgreSQL data directory")

    def options(self) -> list[str]:
        """The command-line options after the program name, without -D (pg_ctl gives it)."""
        out: list[str] = []
        args = iter(self.argv[1:])
        for arg in args:
            if arg in ("-D", "--pgdata"):
                next(args, None)
            elif not arg.startswith(("-D", "--pgdata=")):
                out.append(arg)
        return out


def find_postmaster(port: int) -> Postmaster:
    """The postmaster listening on this TCP port on this host."""
    pids = {p.pid for p in listening_ports(("tcp",)).ports if p.port == port and p.pid is not None}
    if not pids:
        raise RejoinError("404", f"no process on this host listens on TCP port {port}")
    if len(pids) > 1:
        raise RejoinError("409", f"several processes listen on TCP port {port}: {sorted(pids)}")
    pid = pids.pop()
    try:
        proc = psutil.Process(pid)
        if proc.name() not in ("postgres", "postmaster"):
            raise RejoinError("409", f"port {port} belongs to {proc.name()!r} (pid {pid}), not a postmaster")
        return Postmaster(proc)
    except psutil.Error as exc:
        raise RejoinError("409", f"cannot inspect the process on port {port} (pid {pid}): {exc}") from None


def _gone(pid: int, pid_file: Path) -> bool:
    """The postmaster exited (a zombie left for its parent to reap counts) and removed its pid file."""
    try:
        alive = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    return not alive and not pid_file.exists()


async def stop_postmaster(pm: Postmaster, timeout: float = STOP_TIMEOUT_S) -> None:
    """A fast shutdown (SIGINT): clients are disconnected, a shutdown checkpoint is written."""
    pid_file = pm.data_dir / "postmaster.pid"
    with contextlib.suppress(ProcessLookupError):
        os.kill(pm.pid, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while not _gone(pm.pid, pid_file):
        if time.monotonic() >= deadline:
            raise RejoinError("504", f"the postmaster (pid {pm.pid}) did not stop within {timeout:g} s; left running")
        await asyncio.sleep(0.05)


async def start_postmaster(pm: Postmaster, run_as: str | None, timeout: float) -> None:
    """`pg_ctl start -w` with the options it ran with; its output goes to LOG_NAME in the data directory."""
    log_file = pm.data_dir / LOG_NAME
    proc = await asyncio.create_subprocess_exec(
        str(pm.bin_dir / "pg_ctl"),
        "start",
        "-w",
        "-t",
        str(max(1, int(timeout))),
        "-D",
        str(pm.data_dir),
        "-l",
        str(log_file),
        "-o",
        shlex.join(pm.options()),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        stdin=asyncio.subprocess.DEVNULL,
        cwd=pm.data_dir,
        user=run_as,
    )
    output, _ = await proc.communicate()
    if proc.returncode != 0:
        tail = " | ".join(output.decode(errors="replace").strip().splitlines()[-2:])
        with contextlib.suppress(OSError):
            tail += " | " + " | ".join(log_file.read_text(errors="replace").strip().splitlines()[-3:])
        raise RejoinError("500", f"rewound, but pg_ctl start failed ({proc.returncode}): {tail}; left stopped")


async def rejoin(req: PgRejoinRequest) -> PgRejoinReport:
    """Stop the local postmaster on req.port, rewind it onto req.source, start it as a standby."""
    try:
        address, source = Address.parse(req.address), Address.parse(req.source)
    except ValueError as exc:
        raise RejoinError("400", str(exc)) from None
    if address.port != req.port:
        raise RejoinError("400", f"port {req.port} is not the port of {address}")
    started = time.monotonic()
    pm = await asyncio.to_thread(find_postmaster, req.port)
    run_as = pm.user if os.geteuid() == 0 and pm.user != "root" else None
    login = Credentials(req.user, req.password, req.database)
    replication = Credentials(req.replication_user or req.user, req.replication_password)
    adaptor = adaptors.create("postgresql", login, replication, req.connect_timeout)  # loads asyncpg now
    await stop_postmaster(pm)
    try:
        await adaptor.rejoin(
            address,
            source,
            pm.data_dir,
            run_as=run_as,
            bin_dir=pm.bin_dir,
            application_name=req.application_name or None,
            timeout=req.timeout,
        )
    except AdaptorError as exc:
        raise RejoinError("502", f"{exc}; left stopped") from None
    await start_postmaster(pm, run_as, req.timeout)
    return PgRejoinReport(
        address=str(address),
        source=str(source),
        data_dir=str(pm.data_dir),
        bin_dir=str(pm.bin_dir),
        run_as=pm.user,
        seconds=round(time.monotonic() - started, 3),
    )
