"""`fleetmate serve`: run one replica in the foreground until SIGTERM or Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
import sys

from app import telemetry, tls
from app.bus.connection import BusError
from app.bus.embedded import EmbeddedNatsError
from app.config import Config, zk_tls_files
from app.log.engine import LogFailed
from app.log.snapshots import NoUsableSnapshot
from app.node import Node
from app.openfiles import raise_open_files
from app.storage.datadir import DataDirInUse
from app.supervise import supervisor
from app.web.app import create_app
from app.web.server import HttpServer, PortInUse, resolve_port
from app.zk.server import ZkServer

log = logging.getLogger("fleetmate.serve")

EXIT_OK = 0
EXIT_FAILED = 1


async def serve(cfg: Config, worker: bool = False, ready_fd: int | None = None) -> int:
    """Start everything, wait for a stop signal or a fatal error, and shut down cleanly.

    As a worker (started by the supervisor of `--workers N`) the HTTP port is shared with
    the other workers (Granian binds with SO_REUSEPORT), so it is not probed first; when
    the node is ready a line goes to `ready_fd`.
    """
    provider = telemetry.setup(cfg.telemetry, cfg.node_id)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)

    node = Node(cfg)
    try:
        port = cfg.http.port if worker else resolve_port(cfg.http.host, cfg.http.port)
    except (PortInUse, OSError) as exc:
        log.error("cannot listen for HTTP", extra={"key": "http.port", "error": str(exc)})
        return EXIT_FAILED
    http_tls = (cfg.http.tls_cert, cfg.http.tls_key, cfg.http.tls_client_ca)
    app = create_app(node)
    http = HttpServer(
        app,
        cfg.http.host,
        port,
        cfg.log_level,
        tls=http_tls,
        header_read_timeout=cfg.http.header_read_timeout,
        max_connections=cfg.http.max_connections,
    )
    node.http_url = cfg.http.advertise_url or http.url
    zk: ZkServer | None = None
    if cfg.zk.enabled:
        # Bound before the node is ready (like HTTP): early clients are closed and retry.
        zk = ZkServer(node, cfg.zk.host, cfg.zk.port, reuse_port=worker, limiter=app.limiter)
        if not await _listen_zk(cfg, node, zk, port):
            return EXIT_FAILED
    http_task = http.start()
    log.info("http gateway listening", extra={"url": http.url})

    code = EXIT_OK
    start_task = asyncio.create_task(node.start(), name="node-start")
    stop_task = asyncio.create_task(stop.wait(), name="stop-signal")
    # A long-lived task that stops (app.supervise) ends the process non-zero: its service manager
    # restarts it, where a stalled writer or applier would otherwise hang every client.
    fatal = asyncio.Event()
    supervisor.on_failure = lambda reason: fatal.set()
    if supervisor.failures:
        fatal.set()
    fatal_task = asyncio.create_task(fatal.wait(), name="fatal")
    try:
        done, _ = await asyncio.wait(
            {start_task, stop_task, http_task, fatal_task}, return_when=asyncio.FIRST_COMPLETED
        )
        if start_task in done and start_task.exception() is None:
            gc.freeze()  # what start-up built lives as long as the process: keep it out of collections
            if ready_fd is not None:
                with contextlib.suppress(OSError):
                    os.write(ready_fd, b"ready\n")
                    os.close(ready_fd)
            done, _ = await asyncio.wait({stop_task, http_task, fatal_task}, return_when=asyncio.FIRST_COMPLETED)
        failure = start_task.exception() if start_task.done() else None
        if fatal_task in done:
            log.error("exiting: a long-lived task stopped", extra={"reason": supervisor.failure})
            code = EXIT_FAILED
        elif failure is not None:
            if isinstance(failure, BusError | EmbeddedNatsError | NoUsableSnapshot | LogFailed | DataDirInUse):
                log.error("start-up failed", extra={"error": str(failure)})
            else:
                log.error("start-up failed", exc_info=failure)
            code = EXIT_FAILED
        elif http_task in done:
            log.error("http server stopped unexpectedly")
            code = EXIT_FAILED
        else:
            log.info("stop requested; shutting down")
    finally:
        for task in (start_task, stop_task, fatal_task):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        await http.stop()
        if zk is not None:
            await zk.stop()
        await node.stop()
        provider.shutdown()
    return code


async def _listen_zk(cfg: Config, node: Node, zk: ZkServer, http_port: int) -> bool:
    """Bind the plaintext and/or the TLS ZooKeeper port; False (logged, naming the key) when one fails."""
    key = "zk.port"
    node.zk_counters = lambda: {"refused": zk.refused, "throttled": zk.throttled}
    try:
        if cfg.zk.plaintext_enabled:
            await zk.start(avoid={http_port})
            node.zk_address = zk.address
        if cfg.zk.secure_enabled:
            key = "zk.secure_port"
            cert, tls_key, names = zk_tls_files(cfg)
            context = tls.server_context(cert, tls_key, cfg.zk.tls_client_ca, keys=names)
            await zk.start_secure(cfg.zk.secure_port, context, avoid={http_port, zk.port})
            node.zk_secure_address = zk.secure_address
    except tls.TlsFileError as exc:  # checked at start-up; changed since
        log.error("cannot load the ZooKeeper TLS files", extra={"key": exc.key, "error": exc.problem})
        return False
    except OSError as exc:
        log.error("cannot listen for ZooKeeper clients", extra={"key": key, "error": str(exc)})
        return False
    return True


# Collector thresholds for a long-running server. With CPython's default (700 allocations)
# the cyclic collector ran every few requests and its gen-2 passes set the p99: measured
# with wrk at 64 connections, linearizable reads went from p99 48 ms to 15 ms and sets
# from 3.9k/s (p99 56 ms) to 4.4k/s (p99 25 ms). Reference counting still frees almost
# everything at once; only cyclic garbage waits longer.
GC_THRESHOLDS = (50_000, 50, 100)
# How long a thread waiting for the GIL waits before asking its holder to let go (Python's
# default: 5 ms). Granian's threads take the GIL briefly for every request (to hand it to the
# event loop, to hand back a request body); with the default such a hand-off could wait the
# whole 5 ms for the loop thread. Interleaved runs of sets at 16 clients, 5 pairs: 1.09x the
# rate with 0.5 ms (median; p99 0.78x), and the default's runs now and then collapsed (1.7k
# sets/s against 4.3k). At 64 clients 0.5 ms against 1 ms made no measurable difference.
GIL_SWITCH_INTERVAL_S = 0.0005


def run(cfg: Config, worker: bool = False, ready_fd: int | None = None) -> int:
    """Run serve() on uvloop when available, with collector thresholds and a GIL switch interval for a server."""
    gc.set_threshold(*GC_THRESHOLDS)
    sys.setswitchinterval(GIL_SWITCH_INTERVAL_S)
    raise_open_files(cfg.http.max_connections)
    try:
        import uvloop

        return uvloop.run(serve(cfg, worker, ready_fd))
    except ImportError:
        return asyncio.run(serve(cfg, worker, ready_fd))
    finally:
        sys.stderr.flush()
