"""`fleetmate serve --workers N`: N worker processes, each a full replica of the log, sharing the HTTP port.

The supervisor owns the embedded nats-server, picks the HTTP port once, starts the
workers (Granian binds with SO_REUSEPORT, so the kernel spreads connections), restarts a
worker that dies, and stops everything on SIGTERM or Ctrl-C. Workers need nothing new for
correctness: they agree through the log like any replicas, and one of them holds the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

from app import logs
from app.bus.embedded import EmbeddedNats, EmbeddedNatsError, server_token
from app.config import Config
from app.procs import die_with_parent, terminate
from app.storage.datadir import DataDirInUse, DataDirLock
from app.web.server import PortInUse, resolve_port

log = logging.getLogger("fleetmate.supervisor")

READY_TIMEOUT_S = 120.0
STOP_GRACE_S = 10.0


class Worker:
    """One worker process and how to start it again."""

    def __init__(self, index: int, node_id: str, env: dict[str, str], args: list[str]) -> None:
        self.index = index
        self.node_id = node_id
        self.env = env
        self.args = args
        self.proc: asyncio.subprocess.Process | None = None
        self.ready = asyncio.Event()
        self.restarts = 0

    async def start(self) -> None:
        """Spawn the process; `ready` is set when it reports its node started."""
        self.ready.clear()
        read_fd, write_fd = os.pipe()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "app",
            "serve",
            "--worker",
            "--ready-fd",
            str(write_fd),
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            pass_fds=(write_fd,),
            start_new_session=True,  # Ctrl-C reaches the supervisor, which stops workers in order
            preexec_fn=die_with_parent,
        )
        os.close(write_fd)
        loop = asyncio.get_running_loop()

        def on_readable() -> None:
            data = b""
            with contextlib.suppress(OSError):
                data = os.read(read_fd, 64)
            loop.remove_reader(read_fd)
            os.close(read_fd)
            if data.startswith(b"ready"):
                self.ready.set()

        loop.add_reader(read_fd, on_readable)

    async def stop(self) -> None:
        """SIGTERM, then SIGKILL after the grace period."""
        if self.proc is not None:
            await terminate(self.proc, STOP_GRACE_S, self.node_id)


def _worker_env(
    cfg: Config,
    index: int,
    node_id: str,
    port: int,
    nats_url: str,
    http_url: str,
    zk_port: int,
    overrides: dict[str, str] | None = None,
    zk_secure_port: int = 0,
) -> dict[str, str]:
    env = dict(os.environ)
    env.update(overrides or {})  # the supervisor's own flags, as variables
    env.update(
        FLEETMATE_NODE_ID=node_id,
        FLEETMATE_DATA_DIR=str(cfg.data_path / "workers" / node_id),
        FLEETMATE_HTTP_PORT=str(port),
        FLEETMATE_ZK_PORT=str(zk_port),
        FLEETMATE_ZK_SECURE_PORT=str(zk_secure_port),
        FLEETMATE_HTTP_ADVERTISE_URL=cfg.http.advertise_url or http_url,
        FLEETMATE_WORKERS="1",
    )
    if nats_url:
        env["FLEETMATE_NATS_URL"] = nats_url
    if cfg.metrics.path:
        env["FLEETMATE_METRICS_PATH"] = str(worker_metrics_path(cfg.metrics.path, node_id))
    return env


def worker_metrics_path(path: str, node_id: str) -> Path:
    """Each worker its own DuckDB file (one writer per file): metrics.duckdb -> metrics-<node_id>.duckdb."""
    given = Path(path).expanduser()
    return given.with_name(f"{given.stem}-{node_id}{given.suffix}")


async def supervise(cfg: Config, count: int, config_path: str | None, overrides: dict[str, str] | None = None) -> int:
    """Run `count` workers until a stop signal; 0 on a clean stop, 1 when start-up failed.

    overrides: FLEETMATE_* variables for every worker (the supervisor's command-line flags).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    started = time.monotonic()
    try:
        port = resolve_port(cfg.http.host, cfg.http.port)
    except (PortInUse, OSError) as exc:
        log.error("cannot listen for HTTP", extra={"key": "http.port", "error": str(exc)})
        return 1
    zk_port = zk_secure_port = 0
    if cfg.zk.enabled:
        key = "zk.port"
        try:
            if cfg.zk.plaintext_enabled:
                zk_port = resolve_port(cfg.zk.host, cfg.zk.port)
            if cfg.zk.secure_enabled:
                key = "zk.secure_port"
                zk_secure_port = resolve_port(cfg.zk.host, cfg.zk.secure_port)
        except (PortInUse, OSError) as exc:
            log.error("cannot listen for ZooKeeper clients", extra={"key": key, "error": str(exc)})
            return 1
    host = cfg.http.host
    http_url = f"{'https' if cfg.http.tls_cert else 'http'}://{host}:{port}"
    dir_lock = DataDirLock(cfg.data_path)  # each worker locks its own directory under workers/
    try:
        dir_lock.acquire(f"the supervisor of {count} workers")
    except DataDirInUse as exc:
        log.error("start-up failed", extra={"error": str(exc)})
        return 1
    embedded: EmbeddedNats | None = None
    nats_url = ""
    if cfg.embedded_nats:
        try:
            token = server_token(
                host=cfg.nats.host, token=cfg.nats.token, token_file=cfg.nats.token_file, data_dir=cfg.data_path
            )
            embedded = EmbeddedNats(
                data_dir=cfg.data_path,
                name=cfg.node_id,
                host=cfg.nats.host,
                port=cfg.nats.port,
                sync_always=cfg.nats.sync_always,
                min_free_bytes=cfg.disk.min_free_mb << 20,
                token=token,
            )
            nats_url = await embedded.start()
        except EmbeddedNatsError as exc:
            log.error("start-up failed", extra={"error": str(exc)})
            return 1
    args = ["--config", config_path] if config_path else []
    workers = []
    for i in range(count):
        node_id = f"{cfg.node_id}-w{i + 1}"
        env = _worker_env(cfg, i, node_id, port, nats_url, http_url, zk_port, overrides, zk_secure_port)
        if embedded is not None and embedded.token:
            env["FLEETMATE_NATS_TOKEN"] = embedded.token  # workers connect to the embedded server as clients
        workers.append(Worker(i, node_id, env, args))
    code = 0
    try:
        for worker in workers:
            await worker.start()
        ready: asyncio.Future[Any] = asyncio.gather(*(w.ready.wait() for w in workers))
        stop_wait: asyncio.Future[Any] = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait({ready, stop_wait}, timeout=READY_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            logs.announce(  # at every log level: the addresses to reach this replica
                log,
                "fleetmate ready",
                {
                    "node_id": cfg.node_id,
                    "http": http_url,
                    "zk": f"{cfg.zk.host}:{zk_port}" if zk_port else "",
                    "zk_secure": f"{cfg.zk.host}:{zk_secure_port}" if zk_secure_port else "",
                    "nats": nats_url or ",".join(cfg.nats.url),
                    "workers": count,
                    "startup_s": round(time.monotonic() - started, 3),
                },
            )
            await _watch(workers, stop)
        elif not stop.is_set():
            log.error("workers did not become ready in time", extra={"timeout_s": READY_TIMEOUT_S})
            code = 1
        ready.cancel()
        stop_wait.cancel()
    finally:
        log.info("stopping workers")
        await asyncio.gather(*(w.stop() for w in workers))
        if embedded is not None:
            await embedded.stop()
        log.info("fleetmate stopped", extra={"node_id": cfg.node_id})
    return code


async def _watch(workers: list[Worker], stop: asyncio.Event) -> None:
    """Restart any worker that exits until stop is set."""
    stop_wait = asyncio.ensure_future(stop.wait())
    waits = {asyncio.ensure_future(w.proc.wait()): w for w in workers if w.proc is not None}
    try:
        while not stop.is_set():
            done, _ = await asyncio.wait({stop_wait, *waits}, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                worker = waits.pop(fut, None)
                if worker is None or stop.is_set():
                    continue
                worker.restarts += 1
                log.error(
                    "worker exited unexpectedly; restarting",
                    extra={"worker": worker.node_id, "exit_code": fut.result(), "restarts": worker.restarts},
                )
                await asyncio.sleep(min(5.0, 0.2 * worker.restarts))
                await worker.start()
                assert worker.proc is not None
                waits[asyncio.ensure_future(worker.proc.wait())] = worker
    finally:
        stop_wait.cancel()
        for fut in waits:
            fut.cancel()


def run(cfg: Config, count: int, config_path: str | None, overrides: dict[str, str] | None = None) -> int:
    """Run the supervisor on uvloop when available."""
    try:
        import uvloop

        return uvloop.run(supervise(cfg, count, config_path, overrides))
    except ImportError:
        return asyncio.run(supervise(cfg, count, config_path, overrides))
