"""ZooKeeper wire-protocol load: fleetmate's ZooKeeper front end beside a real ZooKeeper 3.8, as ratios."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import multiprocessing
import random
import string
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Coroutine
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, cast

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import percentile, progress, write_result
from bench.registry import Fleetmate, OtherLoad, _raise_nofile, machine_load
from bench.zkserver import ZooKeeper, mntr, zookeeper_classpath
from tests.harness import free_port

EPILOG = """\
    python bench/zk.py [--quick] [--duration S] [--targets zookeeper,fleetmate] [--fleetmate-addr HOST:PORT]

The load speaks the ZooKeeper client protocol itself (asyncio + uvloop, several processes, each TCP
connection one session, replies matched by xid, pings when idle, closeSession at the end): kazoo's
threads saturate long before a server does. Each target is started here (free ports, temporary
directories) one after the other, never at the same time, and stopped at the end; --fleetmate-addr
uses a fleetmate that is already running instead.

  setData    64 sessions, 1 and 8 requests in flight per session, random znode of 1,000, 100-byte values
  getData    the same, watch=false
  create     64 sessions x 8 in flight: create a PERSISTENT_SEQUENTIAL child, delete it, repeat
  watch      1,000 and 10,000 sessions each hold a one-shot data watch (getData watch=true, re-armed after
             every notification) on one znode; a writer sets it 20 times, one set every 0.5 s; latency =
             notification received minus the time just before the set was sent (CLOCK_MONOTONIC,
             shared by all processes)

Each load scenario runs a warm-up (not counted), then the measured window: ops/s counts the requests
sent and answered inside it; p50/p99 are their latencies. Checks: after each setData run the znodes'
versions gained == acknowledged setData replies; getData replies carry 100-byte values; every created
sequential node was deleted and no sequence number came back twice.
--quick: 3 s per scenario and 1,000 watchers only. Prints a table; writes bench/results/zk.json.
"""

# ---- the wire format (ZooKeeper's jute encoding: big-endian ints and longs, length-prefixed buffers) ----

OP_CREATE, OP_DELETE, OP_EXISTS, OP_GETDATA, OP_SETDATA, OP_PING, OP_CLOSE = 1, 2, 3, 4, 5, 11, -11
OP_NAMES = {OP_CREATE: "create", OP_DELETE: "delete", OP_EXISTS: "exists", OP_GETDATA: "getData", OP_SETDATA: "setData"}
XID_WATCH, XID_PING = -1, -2
PERSISTENT, PERSISTENT_SEQUENTIAL = 0, 2
PERMS_ALL = 31
EVENT_DATA_CHANGED = 3
ERR_CLOSED = -9999  # ours: the connection went away with the request unanswered
ERROR_NAMES = {
    -1: "SystemError",
    -2: "RuntimeInconsistency",
    -4: "ConnectionLoss",
    -5: "MarshallingError",
    -6: "Unimplemented",
    -7: "OperationTimeout",
    -8: "BadArguments",
    -12: "UnknownSession",
    -100: "APIError",
    -101: "NoNode",
    -102: "NoAuth",
    -103: "BadVersion",
    -108: "NoChildrenForEphemerals",
    -110: "NodeExists",
    -111: "NotEmpty",
    -112: "SessionExpired",
    -114: "InvalidACL",
    -118: "SessionMoved",
    -122: "RequestTimeout",
    -127: "Throttled",
    ERR_CLOSED: "ConnectionClosed(client)",
}

INT = struct.Struct(">i")
REQUEST_HEAD = struct.Struct(">iii")  # frame length, xid, op type
REPLY_HEAD = struct.Struct(">iqi")  # xid, zxid, err
# ConnectRequest in its frame: length 45, protocolVersion, lastZxidSeen, timeOut, sessionId, passwd (16 bytes), readOnly
CONNECT_REQUEST = struct.Struct(">iiqiqi16sB")
CONNECT_REPLY = struct.Struct(">iiq")  # protocolVersion, timeOut, sessionId (then passwd, readOnly)
WATCH_EVENT = struct.Struct(">iii")  # type, state, path length (then the path)
# Stat: czxid, mzxid, ctime, mtime, version, cversion, aversion, ephemeralOwner, dataLength, numChildren, pzxid
STAT = struct.Struct(">qqqqiiiqiiq")
ST_VERSION, ST_CVERSION, ST_DATALEN, ST_CHILDREN = 4, 5, 8, 9
BODY = REPLY_HEAD.size  # offset of a reply's body in its frame
PING_FRAME = REQUEST_HEAD.pack(8, XID_PING, OP_PING)
SESSION_TIMEOUT_MS = 30000
PING_IDLE_S = SESSION_TIMEOUT_MS / 3000


def zbuf(data: bytes) -> bytes:
    return INT.pack(len(data)) + data


ACL_OPEN = INT.pack(1) + INT.pack(PERMS_ALL) + zbuf(b"world") + zbuf(b"anyone")


def set_data_body(path: bytes, data: bytes) -> bytes:
    return zbuf(path) + zbuf(data) + INT.pack(-1)


def get_data_body(path: bytes, watch: bool = False) -> bytes:
    return zbuf(path) + (b"\x01" if watch else b"\x00")


def create_body(path: bytes, data: bytes, flags: int) -> bytes:
    return zbuf(path) + zbuf(data) + ACL_OPEN + INT.pack(flags)


def delete_body(path: bytes) -> bytes:
    return zbuf(path) + INT.pack(-1)


def reply_data(frame: bytes) -> tuple[bytes, tuple[int, ...]]:
    """Data and stat of a getData reply."""
    n = INT.unpack_from(frame, BODY)[0]
    start = BODY + 4
    data = frame[start : start + n] if n > 0 else b""
    return data, STAT.unpack_from(frame, start + max(n, 0))


def reply_string(frame: bytes) -> bytes:
    n = INT.unpack_from(frame, BODY)[0]
    return frame[BODY + 4 : BODY + 4 + n]


def error_name(err: int) -> str:
    return ERROR_NAMES.get(err, str(err))


# ---- the data set --------------------------------------------------------------------------------

KEYS = 1000
VALUE_BYTES = 100
ROOT = b"/bench"
KEY_PATHS = [ROOT + b"/k%04d" % i for i in range(KEYS)]
SEQ_PARENT = ROOT + b"/seq"
SEQ_PREFIX = SEQ_PARENT + b"/n-"
WATCHED = ROOT + b"/watched"
_rng = random.Random(20261130)
VALUES = [(f"{j:02d}-" + "".join(_rng.choices(string.ascii_letters, k=VALUE_BYTES - 3))).encode() for j in range(16)]
SESSIONS = 64
WATCH_WRITES = 20
WATCH_INTERVAL_S = 0.5
WATCH_COLLECT_S = 30.0
WATCHERS_PER_PROCESS = 2500
CONNECTING = 128  # handshakes in progress at once, per process


# ---- one session ------------------------------------------------------------------------------------

Reply = Callable[[int, bytes, float], None]  # err, whole reply frame, receive time
WatchHandler = Callable[[int, int, bytes, float], None]  # event type, state, path, receive time


class SessionError(Exception):
    pass


class Session(asyncio.Protocol):
    """One ZooKeeper session on one TCP connection; requests pipelined, replies matched by xid."""

    def __init__(self) -> None:
        loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.xid = 0
        self.pending: dict[int, Reply] = {}
        self.connected: asyncio.Future[None] = loop.create_future()
        self.handshaken = False
        self.closed = False
        self.session_id = 0
        self.negotiated_ms = 0
        self.last_send = time.monotonic()
        self.on_watch: WatchHandler | None = None
        self.error = ""
        self.stray = 0  # replies whose xid nobody waited for

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # (uvloop's transports are not subclasses)
        self.transport.write(CONNECT_REQUEST.pack(45, 0, 0, SESSION_TIMEOUT_MS, 0, 16, bytes(16), 0))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self.error:
            self.error = f"connection lost: {exc}" if exc else "connection closed by the server"
        if not self.connected.done():
            self.connected.set_exception(SessionError(self.error))
        pending, self.pending = self.pending, {}
        now = time.monotonic()
        for reply in pending.values():
            reply(ERR_CLOSED, b"", now)

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        buf = self.buf
        buf += data
        off, end = 0, len(buf)
        while end - off >= 4:
            size = INT.unpack_from(buf, off)[0]
            stop = off + 4 + size
            if stop > end:
                break
            frame = bytes(buf[off + 4 : stop])
            off = stop
            self._frame(frame, now)
        if off:
            del buf[:off]

    def _frame(self, frame: bytes, now: float) -> None:
        if not self.handshaken:
            _, timeout, sid = CONNECT_REPLY.unpack_from(frame, 0)
            if timeout <= 0:  # the server's way of saying "session expired / refused"
                self.error = f"session refused (negotiated timeout {timeout})"
                if self.transport is not None:
                    self.transport.close()
                return
            self.handshaken, self.session_id, self.negotiated_ms = True, sid, timeout
            self.connected.set_result(None)
            return
        xid, _, err = REPLY_HEAD.unpack_from(frame, 0)
        if xid == XID_WATCH:
            kind, state, n = WATCH_EVENT.unpack_from(frame, BODY)
            start = BODY + WATCH_EVENT.size
            if self.on_watch is not None:
                self.on_watch(kind, state, frame[start : start + n], now)
            return
        if xid == XID_PING:
            return
        reply = self.pending.pop(xid, None)
        if reply is None:
            self.stray += 1
            return
        reply(err, frame, now)

    # requests
    def send(self, op: int, body: bytes, reply: Reply) -> None:
        """Send one request; reply(err, frame, received_at) runs when its answer (or the connection's end) comes."""
        if self.closed or self.transport is None:
            reply(ERR_CLOSED, b"", time.monotonic())
            return
        self.xid += 1
        self.pending[self.xid] = reply
        self.transport.write(REQUEST_HEAD.pack(8 + len(body), self.xid, op) + body)
        self.last_send = time.monotonic()

    def call(self, op: int, body: bytes) -> asyncio.Future[tuple[int, bytes]]:
        fut: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()

        def done(err: int, frame: bytes, _at: float) -> None:
            if not fut.done():
                fut.set_result((err, frame))

        self.send(op, body, done)
        return fut

    def ping(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(PING_FRAME)
            self.last_send = time.monotonic()

    async def close(self, timeout: float = 10.0) -> None:
        """closeSession, then the connection."""
        if self.transport is None or self.closed:
            return
        if self.handshaken:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.call(OP_CLOSE, b""), timeout)
        self.transport.close()


async def connect(host: str, port: int, timeout: float = 60.0) -> Session:
    loop = asyncio.get_running_loop()
    _, session = await asyncio.wait_for(loop.create_connection(Session, host, port), timeout)
    try:
        await asyncio.wait_for(asyncio.shield(session.connected), timeout)
    except BaseException:
        if session.transport is not None:
            session.transport.close()
        raise
    return session


async def connect_many(host: str, port: int, n: int) -> tuple[list[Session], list[str]]:
    """n sessions, CONNECTING handshakes at a time; the sessions that made it and the failures."""
    sem = asyncio.Semaphore(CONNECTING)

    async def one() -> Session | str:
        async with sem:
            try:
                return await connect(host, port)
            except Exception as exc:
                return f"{type(exc).__name__}: {exc}"

    out = await asyncio.gather(*(one() for _ in range(n)))
    return [s for s in out if isinstance(s, Session)], [s for s in out if isinstance(s, str)]


async def close_all(sessions: list[Session], at_once: int = 256) -> None:
    sem = asyncio.Semaphore(at_once)

    async def one(s: Session) -> None:
        async with sem:
            await s.close()

    await asyncio.gather(*(one(s) for s in sessions))


async def keepalive(sessions: list[Session]) -> None:
    """Ping every session that has sent nothing for a third of the session timeout."""
    while True:
        await asyncio.sleep(1.0)
        now = time.monotonic()
        for s in sessions:
            if s.handshaken and now - s.last_send > PING_IDLE_S:
                s.ping()


async def expect_ok(session: Session, op: int, body: bytes, what: str, allow: tuple[int, ...] = ()) -> bytes:
    err, frame = await session.call(op, body)
    if err and err not in allow:
        raise SessionError(f"{what}: {error_name(err)} ({err})")
    return frame


def run_loop(coro: Coroutine[Any, Any, Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---- closed-loop load from one process --------------------------------------------------------------


class Load:
    """`depth` requests in flight on each session until stop_at; then the ones in flight are answered."""

    def __init__(self, kind: str, sessions: list[Session], depth: int, measure_from: float, stop_at: float) -> None:
        self.kind = kind
        self.sessions = sessions
        self.depth = depth
        self.measure_from = measure_from
        self.stop_at = stop_at
        self.rng = random.Random()
        self.latencies: list[float] = []  # ms, of requests sent and answered inside the measured window
        self.ok: dict[str, int] = {}  # every acknowledged request, window or not (the checks need them all)
        self.errors: dict[str, int] = {}
        self.error_samples: list[str] = []
        self.bad_values = 0
        self.sequence: list[int] = []  # sequence numbers of the created nodes
        self.outstanding = 0
        self.drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if kind == "set":
            self.set_bodies = [[set_data_body(p, v) for v in VALUES] for p in KEY_PATHS]
        elif kind == "get":
            self.get_bodies = [get_data_body(p) for p in KEY_PATHS]
        elif kind == "create":
            self.create_body = create_body(SEQ_PREFIX, VALUES[0], PERSISTENT_SEQUENTIAL)
        else:
            raise ValueError(kind)

    def start(self) -> None:
        for s in self.sessions:
            for _ in range(self.depth):
                self._next(s, time.monotonic())
        if not self.outstanding and not self.drained.done():
            self.drained.set_result(None)

    def _next(self, s: Session, now: float) -> None:
        if now >= self.stop_at or s.closed:
            return
        if self.kind == "set":
            self._send(s, OP_SETDATA, self.set_bodies[self.rng.randrange(KEYS)][self.rng.getrandbits(4)])
        elif self.kind == "get":
            self._send(s, OP_GETDATA, self.get_bodies[self.rng.randrange(KEYS)])
        else:
            self._send(s, OP_CREATE, self.create_body)

    def _send(self, s: Session, op: int, body: bytes) -> None:
        self.outstanding += 1
        sent = time.monotonic()
        s.send(op, body, lambda err, frame, at: self._reply(s, op, sent, err, frame, at))

    def _reply(self, s: Session, op: int, sent: float, err: int, frame: bytes, at: float) -> None:
        self.outstanding -= 1
        name = OP_NAMES[op]
        if err == 0:
            self.ok[name] = self.ok.get(name, 0) + 1
            if sent >= self.measure_from and at <= self.stop_at:
                self.latencies.append((at - sent) * 1e3)
            if op == OP_GETDATA and INT.unpack_from(frame, BODY)[0] != VALUE_BYTES:
                self.bad_values += 1
            if op == OP_CREATE:
                path = reply_string(frame)
                suffix = path[len(SEQ_PREFIX) :]
                if path.startswith(SEQ_PREFIX) and len(suffix) == 10 and suffix.isdigit():
                    self.sequence.append(int(suffix))
                else:
                    self.bad_values += 1  # not <prefix><10 digits>, as ZooKeeper names sequential nodes
                self._send(s, OP_DELETE, delete_body(path))  # even after stop_at: leave nothing behind
            else:
                self._next(s, at)
        else:
            key = f"{name}: {error_name(err)}"
            self.errors[key] = self.errors.get(key, 0) + 1
            if len(self.error_samples) < 5:
                self.error_samples.append(f"{key} (session {s.session_id:#x}: {s.error or 'open'})")
            self._next(s, at)
        if not self.outstanding and not self.drained.done():
            self.drained.set_result(None)

    def result(self) -> dict[str, Any]:
        return {
            "latencies": self.latencies,
            "ok": self.ok,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "bad_values": self.bad_values,
            "sequence": self.sequence,
            "stuck": self.outstanding,
        }


async def _load_main(host: str, port: int, n: int, kind: str, depth: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    sessions, failures = await connect_many(host, port, n)
    pinger = asyncio.create_task(keepalive(sessions))
    conn.send(("ready", len(sessions), failures[:3], len(failures)))
    msg = await loop.run_in_executor(None, conn.recv)
    if msg[0] == "go":
        start_at, measure_from, stop_at = msg[1:]
        await asyncio.sleep(max(0.0, start_at - time.monotonic()))
        cpu = time.process_time()
        load = Load(kind, sessions, depth, measure_from, stop_at)
        load.start()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(load.drained), stop_at - time.monotonic() + 30)
        res = load.result()
        res["client_cpu_s"] = time.process_time() - cpu
        res["closed_sessions"] = sum(1 for s in sessions if s.closed)
        res["stray_replies"] = sum(s.stray for s in sessions)
        conn.send(("result", res))
        await loop.run_in_executor(None, conn.recv)  # "bye": alive until the parent has read our CPU time
    pinger.cancel()
    await close_all(sessions)


def _load_worker(host: str, port: int, n: int, kind: str, depth: int, conn: Connection) -> None:
    """Entry point of a load process."""
    _raise_nofile()
    run_loop(_load_main(host, port, n, kind, depth, conn))


# ---- watchers -----------------------------------------------------------------------------------------


class Watcher:
    __slots__ = ("armed", "dups", "error", "other", "ready", "session", "skipped", "times")

    def __init__(self) -> None:
        self.session: Session | None = None
        self.armed = -1  # the znode's version when the watch was (re)set: the next notification is armed + 1
        self.ready = False
        self.error = ""
        self.times: dict[int, float] = {}
        self.dups = 0
        self.other = 0
        self.skipped: set[int] = set()  # versions that came and went while the watch was being re-armed

    def arm(self, s: Session) -> None:
        s.send(OP_GETDATA, WATCHED_GET_WATCH, self._armed)

    def _armed(self, err: int, frame: bytes, _at: float) -> None:
        if err:
            self.error = self.error or f"getData(watch) {error_name(err)}"
            return
        version = reply_data(frame)[1][ST_VERSION]
        if self.ready and version > self.armed:  # sets that came while no watch was armed: never notified
            self.skipped.update(range(self.armed + 1, version + 1))
        self.armed = max(self.armed, version)
        self.ready = True

    def notified(self, kind: int, _state: int, path: bytes, at: float) -> None:
        if kind != EVENT_DATA_CHANGED or path != WATCHED:
            self.other += 1
            return
        version = self.armed + 1
        if version in self.times:
            self.dups += 1
        else:
            self.times[version] = at
        self.armed = version
        if self.session is not None:
            self.arm(self.session)


WATCHED_GET_WATCH = get_data_body(WATCHED, watch=True)


async def _watch_main(host: str, port: int, n: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    started = time.monotonic()
    watchers = [Watcher() for _ in range(n)]
    sem = asyncio.Semaphore(CONNECTING)

    async def one(w: Watcher) -> None:
        async with sem:
            try:
                w.session = s = await connect(host, port)
            except Exception as exc:
                w.error = f"{type(exc).__name__}: {exc}"
                return
            s.on_watch = w.notified
            err, frame = await s.call(OP_GETDATA, WATCHED_GET_WATCH)
            w._armed(err, frame, 0.0)

    await asyncio.gather(*(one(w) for w in watchers))
    sessions = [w.session for w in watchers if w.session is not None]
    pinger = asyncio.create_task(keepalive(sessions))
    failed = [w.error for w in watchers if not w.ready]
    conn.send(("ready", n - len(failed), len(failed), failed[:3], time.monotonic() - started))
    cpu = time.process_time()
    msg = await loop.run_in_executor(None, conn.recv)
    if msg[0] == "collect":
        versions, wait_s = msg[1], msg[2]
        want = set(versions)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if all(w.error or not w.ready or want <= w.times.keys() | w.skipped for w in watchers):
                break
            # one poll over thousands of watchers is cheaper than an event each
            await asyncio.sleep(0.05)
        for w in watchers:
            if w.session is not None and w.session.closed and not w.error:
                w.error = w.session.error
        lost = [w.error for w in watchers if w.error]
        times = {v: [w.times[v] for w in watchers if v in w.times] for v in versions}
        counts = {
            "missing": sum(len(want - w.times.keys()) for w in watchers if w.ready),
            "unexpected": sum(len(w.times.keys() - want) for w in watchers),
            "duplicates": sum(w.dups for w in watchers),
            "skipped_while_rearming": sum(len(w.skipped & want) for w in watchers),
            "lost": sum(len(want - w.times.keys() - w.skipped) for w in watchers if w.ready),
            "other_events": sum(w.other for w in watchers),
            "errors": len(lost),
            "error_samples": lost[:3],
            "client_cpu_s": time.process_time() - cpu,
        }
        conn.send(("result", times, counts))
        await loop.run_in_executor(None, conn.recv)  # "bye": alive until the parent has read our CPU time
    pinger.cancel()
    await close_all(sessions)
    conn.send(("closed",))


def _watch_worker(host: str, port: int, n: int, conn: Connection) -> None:
    """Entry point of a watcher process."""
    _raise_nofile()
    run_loop(_watch_main(host, port, n, conn))


# ---- the targets ------------------------------------------------------------------------------------


class TargetUnavailable(Exception):
    pass


def fleetmate_config_keys() -> set[str]:
    """The FLEETMATE_* variables this tree's fleetmate accepts."""
    done = subprocess.run(
        [sys.executable, "-m", "app", "config", "keys"],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        cwd=Path(__file__).resolve().parent.parent,
    )
    return {line.split()[0] for line in done.stdout.splitlines() if line.startswith("FLEETMATE_")}


async def _handshake(host: str, port: int) -> None:
    s = await connect(host, port, timeout=5.0)
    await s.close()


def wait_handshake(host: str, port: int, timeout: float) -> str:
    """'' once a ZooKeeper session can be opened on host:port, else the last error."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            run_loop(_handshake(host, port))
            return ""
        except Exception as exc:
            last = f"{type(exc).__name__}: {exc}"
        time.sleep(0.2)
    return last or "timed out"


class FleetmateZk(Fleetmate):
    """`fleetmate serve` (bench/registry.py starts it the same way) with its ZooKeeper front end on a free port."""

    host = "127.0.0.1"

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.zk_port = free_port()
        self.keys: set[str] = set()

    @property
    def zk_addr(self) -> tuple[str, int]:
        return self.host, self.zk_port

    def command(self) -> tuple[list[str], dict[str, str]]:
        cmd, env = super().command()
        env["FLEETMATE_ZK_PORT"] = str(self.zk_port)
        if "FLEETMATE_ZK_ENABLED" in self.keys:
            env["FLEETMATE_ZK_ENABLED"] = "true"
        if "FLEETMATE_ZK_MAX_CLIENT_CNXNS" in self.keys:
            # As ZooKeeper's maxClientCnxns=0 in bench/zkserver.py: the load's 64 sessions come from one host.
            env["FLEETMATE_ZK_MAX_CLIENT_CNXNS"] = "0"
        return cmd, env

    def start(self) -> None:
        self.keys = fleetmate_config_keys()
        if "FLEETMATE_ZK_PORT" not in self.keys:
            raise TargetUnavailable(
                "fleetmate has no ZooKeeper front end in this tree: `python -m app config keys` lists no"
                " FLEETMATE_ZK_PORT (app/zk/ not there yet?)"
            )
        super().start()
        problem = wait_handshake(self.host, self.zk_port, 20.0)
        if problem:
            raise TargetUnavailable(
                f"fleetmate is ready on {self.url} but {self.host}:{self.zk_port} (FLEETMATE_ZK_PORT) does not"
                f" accept a ZooKeeper handshake: {problem}"
            )
        progress(f"fleetmate's ZooKeeper front end answers on {self.host}:{self.zk_port}")

    def rss_mb(self) -> float:
        return 0.0

    def stats(self) -> dict[str, str]:
        try:
            return mntr(*self.zk_addr)
        except OSError:
            return {}


class ZooKeeperTarget(ZooKeeper):
    @property
    def zk_addr(self) -> tuple[str, int]:
        return self.host, self.port


class External:
    """A server someone else started (--fleetmate-addr): CPU figures when it runs on this machine.

    The process is the one listening on the port (a supervisor's workers share it: the first
    found); its CPU includes children it started (the embedded nats-server).
    """

    def __init__(self, name: str, addr: str) -> None:
        self.name = name
        host, _, port = addr.rpartition(":")
        self.zk_addr = (host or "127.0.0.1", int(port))
        self._proc: psutil.Process | None = None

    def start(self) -> None:
        problem = wait_handshake(*self.zk_addr, 10.0)
        if problem:
            raise TargetUnavailable(
                f"{self.name} at {self.zk_addr[0]}:{self.zk_addr[1]} does not accept a ZooKeeper handshake: {problem}"
            )
        with contextlib.suppress(psutil.Error):
            for conn in psutil.net_connections("tcp"):
                if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == self.zk_addr[1] and conn.pid:
                    self._proc = psutil.Process(conn.pid)
                    break

    def stop(self) -> None:
        pass

    def alive(self) -> bool:
        return True

    def cpu_s(self) -> float:
        if self._proc is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            total = 0.0
            for proc in (self._proc, *self._proc.children(recursive=True)):
                t = proc.cpu_times()
                total += t.user + t.system
            return total
        return 0.0

    def rss_mb(self) -> float:
        if self._proc is None:
            return 0.0
        with contextlib.suppress(psutil.Error):
            return float(self._proc.memory_info().rss) / (1 << 20)
        return 0.0

    def log_problems(self) -> list[str]:
        return []

    def stats(self) -> dict[str, str]:
        try:
            return mntr(*self.zk_addr)
        except OSError:
            return {}


# ---- set-up and read-back (one session in this process) ---------------------------------------------


async def _create_all(host: str, port: int) -> None:
    s = await connect(host, port)
    exists = (-110,)  # NodeExists: an external server may hold them from an earlier run
    for path in (ROOT, SEQ_PARENT, WATCHED):
        await expect_ok(s, OP_CREATE, create_body(path, VALUES[0], PERSISTENT), f"create {path!r}", exists)
    frames = await asyncio.gather(*(s.call(OP_CREATE, create_body(p, VALUES[0], PERSISTENT)) for p in KEY_PATHS))
    bad = [(p, error_name(err)) for p, (err, _) in zip(KEY_PATHS, frames, strict=True) if err not in (0, *exists)]
    await s.close()
    if bad:
        raise SessionError(f"creating the znodes failed: {bad[:5]}")


async def _read_versions(host: str, port: int) -> tuple[dict[bytes, int], list[str]]:
    """Version of each of the 1,000 znodes, and what looked wrong (errors, values of the wrong size)."""
    s = await connect(host, port)
    replies = await asyncio.gather(*(s.call(OP_GETDATA, get_data_body(p)) for p in KEY_PATHS))
    await s.close()
    versions, wrong = {}, []
    for path, (err, frame) in zip(KEY_PATHS, replies, strict=True):
        if err:
            wrong.append(f"{path.decode()}: {error_name(err)}")
            continue
        data, stat = reply_data(frame)
        versions[path] = stat[ST_VERSION]
        if data not in VALUES or stat[ST_DATALEN] != VALUE_BYTES:
            wrong.append(f"{path.decode()}: value {data[:20]!r}... ({len(data)} bytes, stat says {stat[ST_DATALEN]})")
    return versions, wrong


async def _stat(host: str, port: int, path: bytes) -> tuple[int, ...]:
    s = await connect(host, port)
    frame = await expect_ok(s, OP_EXISTS, get_data_body(path), f"exists {path!r}")
    await s.close()
    return STAT.unpack_from(frame, BODY)


async def _write_watched(host: str, port: int, writes: int, interval: float) -> list[tuple[int, float, float]]:
    """Set the watched znode `writes` times at a steady pace: (version, sent at, took)."""
    s = await connect(host, port)
    out = []
    start = time.monotonic()
    for i in range(writes):
        await asyncio.sleep(max(0.0, start + i * interval - time.monotonic()))
        sent = time.monotonic()
        frame = await expect_ok(s, OP_SETDATA, set_data_body(WATCHED, VALUES[i % len(VALUES)]), "setData watched")
        out.append((STAT.unpack_from(frame, BODY)[ST_VERSION], sent, time.monotonic() - sent))
    await s.close()
    return out


# ---- scenarios ----------------------------------------------------------------------------------------


def _spawn(target: Any, nproc: int, total: int, entry: Callable[..., None], *args: Any) -> tuple[list, list]:
    ctx = multiprocessing.get_context("spawn")
    shares = [total // nproc + (1 if i < total % nproc else 0) for i in range(nproc)]
    pipes, procs = [], []
    for share in shares:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=entry, args=(*target.zk_addr, share, *args, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    return pipes, procs


class OtherLoadBeside(OtherLoad):
    """OtherLoad (bench/registry.py) that also counts our load processes, still running, as ours."""

    def __init__(self, target: Any, procs: list) -> None:
        super().__init__(target)
        self.procs = [psutil.Process(p.pid) for p in procs]

    def _own(self) -> float:  # type: ignore[override]
        total = OtherLoad._own()
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total


def _reap(procs: list) -> None:
    for proc in procs:
        proc.join(60)
        if proc.is_alive():
            proc.terminate()
            proc.join(5)


def load_scenario(target: Any, kind: str, depth: int, duration: float, warmup: float, nproc: int) -> dict[str, Any]:
    label = {"set": "setData", "get": "getData", "create": "create+delete"}[kind]
    progress(f"{target.name}: {label}, {SESSIONS} sessions x {depth} in flight, {warmup:g} s warm-up + {duration:g} s")
    pipes, procs = _spawn(target, nproc, SESSIONS, _load_worker, kind, depth)
    try:
        sessions, failures = 0, []
        for pipe in pipes:
            if not pipe.poll(120):
                raise RuntimeError("a load process did not report")
            _, ok, samples, bad = pipe.recv()
            sessions += ok
            failures += samples if bad else []
        if failures:
            progress(f"  !! {SESSIONS - sessions} sessions failed to open: {failures}")
        start_at = time.monotonic() + 0.2
        measure_from = start_at + warmup
        stop_at = measure_from + duration
        with OtherLoadBeside(target, procs) as other:
            cpu = target.cpu_s()
            for pipe in pipes:
                pipe.send(("go", start_at, measure_from, stop_at))
            parts = []
            for pipe in pipes:
                if not pipe.poll(stop_at - time.monotonic() + 90):
                    raise RuntimeError("a load process did not send its results")
                parts.append(pipe.recv()[1])
            server_cpu = target.cpu_s() - cpu
        for pipe in pipes:
            pipe.send(("bye",))
    finally:
        _reap(procs)
    latencies = [x for p in parts for x in p["latencies"]]
    ok: dict[str, int] = {}
    errors: dict[str, int] = {}
    for p in parts:
        for k, v in p["ok"].items():
            ok[k] = ok.get(k, 0) + v
        for k, v in p["errors"].items():
            errors[k] = errors.get(k, 0) + v
    sequence = [x for p in parts for x in p["sequence"]]
    res = {
        "op": label,
        "sessions": sessions,
        "depth": depth,
        "duration_s": duration,
        "warmup_s": warmup,
        "processes": nproc,
        "requests_in_window": len(latencies),
        "ops_s": len(latencies) / duration,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "acknowledged": ok,
        "errors": sum(errors.values()),
        "error_kinds": errors,
        "error_samples": [s for p in parts for s in p["error_samples"]][:5],
        "session_failures": SESSIONS - sessions,
        "bad_values": sum(p["bad_values"] for p in parts),
        "stuck": sum(p["stuck"] for p in parts),
        "closed_sessions": sum(p["closed_sessions"] for p in parts),
        "stray_replies": sum(p["stray_replies"] for p in parts),
        "server_cpu_s": server_cpu,
        "client_cpu_s": sum(p["client_cpu_s"] for p in parts),
        "other_load_pct": other.pct,
        "sequence_numbers": len(sequence),
        "sequence_distinct": len(set(sequence)),
    }
    flag = ""
    if res["errors"] or res["stuck"] or res["session_failures"] or res["bad_values"] or res["closed_sessions"]:
        flag = (
            f"  !! errors {errors}, stuck {res['stuck']}, sessions failed {res['session_failures']},"
            f" closed {res['closed_sessions']}, bad values {res['bad_values']}; samples {res['error_samples']}"
        )
    progress(
        f"  {res['ops_s']:.0f} ops/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms,"
        f" max {res['max_ms']:.1f} ms; CPU s: server {server_cpu:.1f}, load {res['client_cpu_s']:.1f};"
        f" other processes {other.pct:.0f}%{flag}"
    )
    if not target.alive():
        raise RuntimeError(f"{target.name} died during {label}; see its log")
    return res


def watch_scenario(target: Any, watchers: int) -> dict[str, Any]:
    nproc = max(2, math.ceil(watchers / WATCHERS_PER_PROCESS))
    progress(f"{target.name}: connecting {watchers} watcher sessions from {nproc} processes")
    host, port = target.zk_addr
    pipes, procs = _spawn(target, nproc, watchers, _watch_worker)
    try:
        ready = 0
        connect_s = 0.0
        failures: list[str] = []
        nfailed = 0
        for pipe in pipes:
            if not pipe.poll(600):
                raise RuntimeError("a watcher process did not report")
            _, ok, bad, samples, took = pipe.recv()
            ready += ok
            nfailed += bad
            connect_s = max(connect_s, took)
            failures += samples
        failed = f"; {nfailed} failed, e.g. {failures}" if failures else ""
        progress(f"  {ready}/{watchers} watchers armed in {connect_s:.1f} s{failed}")
        time.sleep(1.0)  # let the server settle after the connection storm
        server_stats = target.stats()
        if server_stats:
            keys = ("zk_num_alive_connections", "zk_watch_count", "zk_outstanding_requests")
            progress("  server says: " + ", ".join(f"{k} {server_stats.get(k)}" for k in keys))
        cpu = target.cpu_s()
        with OtherLoadBeside(target, procs) as other:
            writes = run_loop(_write_watched(host, port, WATCH_WRITES, WATCH_INTERVAL_S))
            versions = [w[0] for w in writes]
            for pipe in pipes:
                pipe.send(("collect", versions, WATCH_COLLECT_S))
            times: dict[int, list[float]] = {v: [] for v in versions}
            tally: dict[str, Any] = {"error_samples": []}
            for pipe in pipes:
                if not pipe.poll(WATCH_COLLECT_S + 60):
                    raise RuntimeError("a watcher process did not send its results")
                _, part, counts = pipe.recv()
                for v, ts in part.items():
                    times[v] += ts
                for k, v in counts.items():
                    tally[k] = tally.get(k, 0) + v if k != "error_samples" else tally[k] + v
        server_cpu = target.cpu_s() - cpu
        closing = time.monotonic()
        for pipe in pipes:
            pipe.send(("bye",))
        for pipe in pipes:
            pipe.poll(300)
        close_s = time.monotonic() - closing
    finally:
        _reap(procs)
    sent_at = {v: s for v, s, _ in writes}
    latencies = [(t - sent_at[v]) * 1e3 for v, ts in times.items() for t in ts]
    last = [(max(ts) - sent_at[v]) * 1e3 for v, ts in times.items() if ts]
    expected = ready * len(writes)
    res = {
        "watchers": watchers,
        "watchers_ready": ready,
        "watchers_failed": nfailed,
        "failure_samples": failures[:5],
        "processes": nproc,
        "connect_s": connect_s,
        "close_s": close_s,
        "server_stats_when_armed": {k: v for k, v in server_stats.items() if "watch" in k or "conn" in k},
        "writes": len(writes),
        "write_interval_s": WATCH_INTERVAL_S,
        "write_latency_ms_p50": percentile([w[2] * 1e3 for w in writes], 50),
        "write_latency_ms_max": max(w[2] * 1e3 for w in writes),
        "expected": expected,
        "delivered": len(latencies),
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "last_watcher_ms_p50": percentile(last, 50),
        "server_cpu_s": server_cpu,
        "other_load_pct": other.pct,
        **{k: v for k, v in tally.items() if k != "error_samples"},
        "error_samples": tally["error_samples"][:5],
        "per_write": [
            {"version": v, "write_ms": round(took * 1e3, 2), "delivered": len(times[v])} for v, _, took in writes
        ],
    }
    flag = "" if res["lost"] == 0 and ready == watchers and not res["errors"] else "  !! INCOMPLETE"
    if res["skipped_while_rearming"]:
        flag += f" ({res['skipped_while_rearming']} sets landed while a watcher was re-arming: never notified)"
    progress(
        f"  delivered {res['delivered']}/{expected}, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms,"
        f" max {res['max_ms']:.1f} ms, last watcher (median per write) {res['last_watcher_ms_p50']:.1f} ms;"
        f" CPU s: server {server_cpu:.1f}, watchers {tally.get('client_cpu_s', 0):.1f};"
        f" sessions closed in {close_s:.1f} s{flag}"
    )
    if not target.alive():
        raise RuntimeError(f"{target.name} died during the watch scenario; see its log")
    return res


def check_set(target: Any, before: dict[bytes, int], res: dict[str, Any]) -> tuple[dict[str, Any], dict[bytes, int]]:
    after, wrong = run_loop(_read_versions(*target.zk_addr))
    gained = sum(after.values()) - sum(before.values())
    acked = res["acknowledged"].get("setData", 0)
    check = {
        "znodes": len(after),
        "versions_gained": gained,
        "acknowledged_setdata": acked,
        "wrong_values": wrong[:5],
        "ok": len(after) == KEYS and gained == acked and not wrong,
    }
    verdict = "ok" if check["ok"] else "!! MISMATCH"
    progress(f"  check: versions gained {gained}, acknowledged setData {acked}, wrong values {len(wrong)} -> {verdict}")
    return check, after


def check_create(target: Any, before: tuple[int, ...], res: dict[str, Any]) -> dict[str, Any]:
    after = run_loop(_stat(*target.zk_addr, SEQ_PARENT))
    created = res["acknowledged"].get("create", 0)
    deleted = res["acknowledged"].get("delete", 0)
    check = {
        "created": created,
        "deleted": deleted,
        "children_left": after[ST_CHILDREN],
        "sequence_numbers_distinct": res["sequence_distinct"] == res["sequence_numbers"],
        "parent_cversion_gained": after[ST_CVERSION] - before[ST_CVERSION],
        "ok": created == deleted and after[ST_CHILDREN] == 0 and res["sequence_distinct"] == res["sequence_numbers"],
    }
    verdict = "ok" if check["ok"] else "!! MISMATCH"
    progress(
        f"  check: created {created}, deleted {deleted}, children left {after[ST_CHILDREN]}, sequence"
        f" numbers distinct {check['sequence_numbers_distinct']},"
        f" parent cversion +{check['parent_cversion_gained']} -> {verdict}"
    )
    return check


# ---- one target, all scenarios ----------------------------------------------------------------------


def run_target(
    target: Any,
    duration: float,
    warmup: float,
    depths: list[int],
    create_depth: int,
    watcher_counts: list[int],
    nproc: int,
) -> dict[str, Any]:
    out: dict[str, Any] = {"scenarios": {}, "checks": {}, "watch": {}, "external": isinstance(target, External)}
    try:
        target.start()
        started = time.monotonic()
        run_loop(_create_all(*target.zk_addr))
        versions, wrong = run_loop(_read_versions(*target.zk_addr))
        progress(f"{target.name}: {len(versions)} znodes ready in {time.monotonic() - started:.1f} s")
        if wrong and len(versions) != KEYS:
            raise SessionError(f"the znodes are not as created: {wrong[:5]}")
        for depth in depths:
            res = load_scenario(target, "set", depth, duration, warmup, nproc)
            out["scenarios"][f"setData_x{depth}"] = res
            out["checks"][f"setData_x{depth}"], versions = check_set(target, versions, res)
        for depth in depths:
            out["scenarios"][f"getData_x{depth}"] = load_scenario(target, "get", depth, duration, warmup, nproc)
        seq_before = run_loop(_stat(*target.zk_addr, SEQ_PARENT))
        res = load_scenario(target, "create", create_depth, duration, warmup, nproc)
        out["scenarios"][f"create_delete_x{create_depth}"] = res
        out["checks"][f"create_delete_x{create_depth}"] = check_create(target, seq_before, res)
        for n in watcher_counts:
            out["watch"][f"watch_{n}"] = watch_scenario(target, n)
        out["rss_mb_at_end"] = target.rss_mb()
    except TargetUnavailable as exc:
        progress(f"!! {target.name}: {exc}")
        out["unavailable"] = str(exc)
    except Exception as exc:
        progress(f"!! {target.name}: {type(exc).__name__}: {exc!r}")
        out["failed"] = f"{type(exc).__name__}: {exc!r}"
    finally:
        out["log_problems"] = target.log_problems()[:50]
        target.stop()
    return out


# ---- report ---------------------------------------------------------------------------------------------


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


LOAD_FIELDS = ("ops_s", "p50_ms", "p99_ms", "max_ms", "errors", "server_cpu_s", "client_cpu_s", "other_load_pct")


def report(results: dict[str, Any], zk_version: str, duration: float) -> tuple[dict[str, Any], list[str], list[str]]:
    zk, fm = results.get("zookeeper", {}), results.get("fleetmate", {})
    names = list(dict.fromkeys([*zk.get("scenarios", {}), *fm.get("scenarios", {})]))
    comparison: dict[str, Any] = {}
    print()
    print(
        f"fleetmate vs ZooKeeper {zk_version or '(not run)'}: {KEYS} znodes, {VALUE_BYTES}-byte values,"
        f" {SESSIONS} sessions, {duration:g} s per row (after a warm-up); xN = requests in flight per session"
    )
    header = (
        f"{'scenario':22}{'zk ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}"
        f"{'fm ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'errors':>8}   {'fm/zk: ops':>10}{'p50':>7}{'p99':>7}"
    )
    print(header)
    print("-" * len(header))

    def cols(r: dict[str, Any] | None) -> str:
        if r is None:
            return f"{'-':>10}{'-':>9}{'-':>9}{'-':>8}"
        return f"{r['ops_s']:>10.0f}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['errors']:>8}"

    for name in names:
        a, b = fm.get("scenarios", {}).get(name), zk.get("scenarios", {}).get(name)
        ratio = {
            "ops_s": _ratio(a and a["ops_s"], b and b["ops_s"]),
            "p50": _ratio(a and a["p50_ms"], b and b["p50_ms"]),
            "p99": _ratio(a and a["p99_ms"], b and b["p99_ms"]),
        }
        comparison[name] = {
            "zookeeper": {k: b[k] for k in LOAD_FIELDS} if b else None,
            "fleetmate": {k: a[k] for k in LOAD_FIELDS} if a else None,
            "ratio_fleetmate_over_zookeeper": ratio,
        }
        print(f"{name:22}{cols(b)}{cols(a)}   {_fmt(ratio['ops_s']):>10}{_fmt(ratio['p50']):>7}{_fmt(ratio['p99']):>7}")
    wnames = list(dict.fromkeys([*zk.get("watch", {}), *fm.get("watch", {})]))
    if wnames:
        print()
        wheader = (
            f"{'watch delivery':22}{'zk delivered':>16}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
            f"{'fm delivered':>16}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}   {'fm/zk: p50':>10}{'p99':>7}"
        )
        print(wheader)
        print("-" * len(wheader))

        def wcols(r: dict[str, Any] | None) -> str:
            if r is None:
                return f"{'-':>16}{'-':>9}{'-':>9}{'-':>9}"
            got = f"{r['delivered']}/{r['watchers'] * r['writes']}"
            return f"{got:>16}{r['p50_ms']:>9.2f}{r['p99_ms']:>9.2f}{r['max_ms']:>9.1f}"

        for name in wnames:
            a, b = fm.get("watch", {}).get(name), zk.get("watch", {}).get(name)
            ratio = {
                "p50": _ratio(a and a["p50_ms"], b and b["p50_ms"]),
                "p99": _ratio(a and a["p99_ms"], b and b["p99_ms"]),
            }
            comparison[name] = {"zookeeper": b, "fleetmate": a, "ratio_fleetmate_over_zookeeper": ratio}
            label = f"{(a or b or {}).get('watchers')} watchers x {WATCH_WRITES}"
            print(f"{label:22}{wcols(b)}{wcols(a)}   {_fmt(ratio['p50']):>10}{_fmt(ratio['p99']):>7}")
        for name in wnames:
            for sysname in ("zookeeper", "fleetmate"):
                w = results.get(sysname, {}).get("watch", {}).get(name)
                if w:
                    print(
                        f"  {name} {sysname}: the writer's own setData p50 {w['write_latency_ms_p50']:.1f} ms,"
                        f" max {w['write_latency_ms_max']:.1f} ms; last watcher reached (median per set)"
                        f" {w['last_watcher_ms_p50']:.1f} ms; skipped while re-arming {w['skipped_while_rearming']};"
                        f" sessions opened in {w['connect_s']:.1f} s"
                    )
    print()
    problems: list[str] = []
    notes: list[str] = []
    for sysname, res in results.items():
        for key in ("unavailable", "failed"):
            if key in res:
                problems.append(f"{sysname}: {key}: {res[key]}")
        for name, check in res.get("checks", {}).items():
            if not check["ok"]:
                problems.append(f"{sysname}: check {name} FAILED: {check}")
        for name, sc in res.get("scenarios", {}).items():
            bad = {k: sc[k] for k in ("errors", "stuck", "session_failures", "bad_values", "closed_sessions") if sc[k]}
            if bad:
                problems.append(f"{sysname}: {name}: {bad} {sc['error_kinds']} {sc['error_samples'][:2]}")
        for name, w in res.get("watch", {}).items():
            if w["lost"] or w["errors"] or w["watchers_ready"] != w["watchers"]:
                problems.append(
                    f"{sysname}: {name}: delivered {w['delivered']}/{w['watchers'] * w['writes']}, watchers armed"
                    f" {w['watchers_ready']}/{w['watchers']}, lost {w['lost']}, errors {w['errors']}"
                    f" {w['error_samples'][:2]} {w['failure_samples'][:2]}"
                )
            if w["skipped_while_rearming"]:
                notes.append(
                    f"{sysname}: {name}: {w['skipped_while_rearming']} notifications never due: the set came while"
                    " the watcher's one-shot watch was being re-armed (its re-read saw the newer version)"
                )
        busy = {
            k: round(v["other_load_pct"])
            for k, v in (res.get("scenarios", {}) | res.get("watch", {})).items()
            if v["other_load_pct"] >= 10
        }
        if busy:
            own = " (a server we did not start counts as another process)" if res.get("external") else ""
            notes.append(f"{sysname}: other processes used >= 10% of the CPUs during {busy}{own}")
        if res.get("log_problems"):
            notes.append(
                f"{sysname}: {len(res['log_problems'])} WARN/ERROR log lines, first: {res['log_problems'][0][:300]}"
            )
    return comparison, problems, notes


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="3 s per scenario, 1,000 watchers only")
    parser.add_argument("--duration", type=float, default=None, help="measured seconds per load scenario (default 10)")
    parser.add_argument("--targets", default="zookeeper,fleetmate", help="comma-separated: zookeeper, fleetmate")
    parser.add_argument(
        "--fleetmate-addr", default=None, metavar="HOST:PORT", help="a running fleetmate's ZooKeeper port"
    )
    parser.add_argument("--depths", default="1,8", help="requests in flight per session for setData/getData (1,8)")
    parser.add_argument(
        "--fleetmate-workers",
        type=int,
        default=None,
        help="fleetmate worker processes (default: its configured default)",
    )
    parser.add_argument("--load-procs", type=int, default=2, help="processes sharing the 64 load sessions (2)")
    parser.add_argument("--watchers", default=None, help="watcher counts (default 1000,10000; --quick 1000)")
    args = parser.parse_args()
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    warmup = 1.0 if args.quick else 2.0
    depths = [int(d) for d in args.depths.split(",")]
    watcher_counts = [int(n) for n in (args.watchers or ("1000" if args.quick else "1000,10000")).split(",")]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    FleetmateZk.workers = args.fleetmate_workers
    if unknown := set(targets) - {"zookeeper", "fleetmate"}:
        parser.error(f"unknown targets {sorted(unknown)}")
    nofile = _raise_nofile()
    if nofile < max(watcher_counts) + 1000:
        progress(f"!! open-file limit is {nofile}: {max(watcher_counts)} watcher sessions may not fit")
    classpath = zookeeper_classpath() if "zookeeper" in targets else ""
    if classpath is None:
        progress("!! no ZooKeeper: needs Debian's zookeeper package (apt-get install zookeeper) and java")
        return 1
    idle_load = machine_load(2.0)
    if idle_load >= 10:
        progress(f"!! other processes use {idle_load:.0f}% of the CPUs before the run: figures will be noisy")
    total = time.monotonic()
    results: dict[str, Any] = {}
    zk_version = ""
    for name in targets:
        progress(f"=== {name} ===")
        target: Any
        if name == "zookeeper":
            target = ZooKeeperTarget(classpath)
            zk_version = target.version
        elif args.fleetmate_addr:
            target = External("fleetmate", args.fleetmate_addr)
        else:
            target = FleetmateZk(sys.executable)
        results[name] = run_target(target, duration, warmup, depths, 8, watcher_counts, args.load_procs)
    elapsed = time.monotonic() - total
    comparison, problems, notes = report(results, zk_version, duration)
    if idle_load >= 10:
        notes.insert(0, f"other processes used {idle_load:.0f}% of the CPUs just before the run")
    passed = [
        f"{s}: {', '.join(n for n, c in r['checks'].items() if c['ok'])}" for s, r in results.items() if r.get("checks")
    ]
    print(f"checks passed: {'; '.join(passed) or 'none'}")
    print("problems: " + ("none" if not problems else "\n  " + "\n  ".join(problems)))
    print("notes: " + ("none" if not notes else "\n  " + "\n  ".join(notes)))
    print(f"total {elapsed:.0f} s")
    path = write_result(
        "zk",
        {
            "duration_s": duration,
            "warmup_s": warmup,
            "quick": args.quick,
            "zookeeper_version": zk_version,
            "targets": targets,
            "fleetmate_addr": args.fleetmate_addr,
            "fleetmate_workers": args.fleetmate_workers,
            "load": {
                "sessions": SESSIONS,
                "processes": args.load_procs,
                "znodes": KEYS,
                "value_bytes": VALUE_BYTES,
                "client": "own ZooKeeper protocol client, asyncio + uvloop, closed loop with N requests in flight",
                "watch_writes": WATCH_WRITES,
                "watch_interval_s": WATCH_INTERVAL_S,
            },
            "comparison": comparison,
            "checks": {s: r.get("checks", {}) for s, r in results.items()},
            "problems": problems,
            "notes": notes,
            "other_load_before_run_pct": idle_load,
            "log_problems": {s: r.get("log_problems", [])[:20] for s, r in results.items()},
            "detail": {
                s: {k: v for k, v in r.items() if k in ("scenarios", "rss_mb_at_end", "unavailable", "failed")}
                for s, r in results.items()
            },
            "elapsed_s": elapsed,
        },
    )
    print(f"wrote {path}")
    return 0 if not problems else 3


if __name__ == "__main__":
    sys.exit(main())
