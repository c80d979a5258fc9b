"""Registry throughput and latency: fleetmate beside etcd 3.4 under the same load, in one run.

    python bench/registry.py [--duration S] [--quick] [--wait-quiet S]

Both servers are started here (free ports, temporary directories), one after the other (never at the
same time), and stopped at the end. 1,000 keys with 100-byte values are created in each before measuring.

  writes   set a random key of the 1,000; 1, 16 and 64 connections (wrk, Lua script)
  reads    get a random key; 64 connections (wrk): linearizable (default) and serializable
  watch    1,000 and 10,000 watchers on one key prefix, each its own WebSocket (fleetmate) or its own
           HTTP watch stream (etcd's JSON gateway, one create_request per stream: no multiplexing);
           a writer sets a key 20 times at a steady pace; latency = receive time at the watcher minus
           the time just before the write request was sent (CLOCK_MONOTONIC, shared by all processes)

Load comes from wrk (C) for reads and writes and from several asyncio processes for the watchers.
--quick: 3 s per wrk run and 1,000 watchers only (a smoke run). The CPU share other processes take
during each scenario is measured and flagged; --wait-quiet S waits up to S seconds before each scenario
for the machine to be quiet (on a shared 2-core machine the comparison is otherwise unreliable).

Prints a table and writes bench/results/registry.json.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import math
import multiprocessing
import os
import random
import re
import resource
import shutil
import string
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import ensure_debian_package, percentile, progress, run_wrk, write_result
from bench.startup import _poll
from tests.harness import free_port

KEYS = 1000
VALUE_BYTES = 100
PREFIX = "/bench"
WRITE_CONNECTIONS = (1, 16, 64)
READ_CONNECTIONS = 64
PAIR_CONNECTIONS = 64
WATCH_WRITES = 20
WATCH_INTERVAL_S = 0.5  # steady pace of the watch writer
WATCH_COLLECT_S = 30.0  # how long watchers may take to receive every write once the writer is done
WATCHERS_PER_PROCESS = 2500
READ_BACK = 8  # keys read back after the write runs
OTHER_LOAD_NOTE_PCT = 10  # flag scenarios during which foreign processes used this much of the CPUs
STEAL_NOTE_PCT = 5  # a scenario with this much steal time is noted: it is not comparable
WRK_FIELDS = ("ops_s", "p50_ms", "p99_ms", "requests", "non2xx", "socket_errors", "other_load_pct", "steal_pct")

KEY_NAMES = [f"{PREFIX}/k{i:04d}" for i in range(KEYS)]
_rng = random.Random(20261123)
VALUES = [f"{j:02d}-" + "".join(_rng.choices(string.ascii_letters, k=VALUE_BYTES - 3)) for j in range(16)]


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def lua_string(text: str) -> str:
    """A Lua string literal for ASCII text (JSON's escapes for quotes and backslashes are Lua's too)."""
    if not (text.isascii() and text.isprintable()):
        raise ValueError(f"not printable ASCII: {text!r}")
    return json.dumps(text)


def lua_script(method: str, paths: list[str], prefixes: list[str] | None, values: list[str], suffix: str) -> str:
    """wrk script: each request picks a random key i (and value j); body = prefixes[i] .. values[j] .. suffix."""
    lines = [
        f"local method = {lua_string(method)}",
        'local headers = {["Content-Type"] = "application/json"}',
        "local paths = {" + ",".join(map(lua_string, paths)) + "}",
        "local pre = {" + ",".join(map(lua_string, prefixes or [])) + "}",
        "local vals = {" + ",".join(map(lua_string, values)) + "}",
        f"local suf = {lua_string(suffix)}",
        "local nthreads = 0",
        "function setup(thread)",
        "  nthreads = nthreads + 1",
        "  thread:set('seed', nthreads)",
        "end",
        "function init(args)",
        "  math.randomseed(os.time() * 1000 + seed)",
        "end",
        "function request()",
        "  local i = math.random(#paths)",
        "  local body = nil",
        "  if pre[i] then body = pre[i] .. vals[math.random(#vals)] .. suf end",
        "  return wrk.format(method, paths[i], headers, body)",
        "end",
        "",
    ]
    return "\n".join(lines)


def _raise_nofile() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def _scrape(url: str, pattern: str) -> float:
    """Sum of the Prometheus samples whose line matches pattern (a regex on the series name and labels)."""
    text = httpx.get(url, timeout=10, trust_env=False).text
    total = 0.0
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        series, _, value = line.rpartition(" ")
        if re.fullmatch(pattern, series):
            total += float(value)
    return total


# ---- the two systems ----------------------------------------------------------------------------


class Server:
    """A server process started in a temporary directory; its log lands in that directory."""

    name = ""
    kind = ""

    def __init__(self, binary: str) -> None:
        self.binary = binary
        self.tmp = Path(tempfile.mkdtemp(prefix=f"{self.kind}-bench-"))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = self.tmp / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(base_url=self.url, timeout=30, trust_env=False)

    def command(self) -> tuple[list[str], dict[str, str]]:
        raise NotImplementedError

    def start(self) -> None:
        cmd, env = self.command()
        started = time.monotonic()
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.tmp)
        _poll(self.ready_url(), started + 60)
        progress(f"{self.name} ready on {self.url} (pid {self.proc.pid}) in {time.monotonic() - started:.2f} s")

    def stop(self) -> None:
        self.client.close()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                progress(f"{self.name} did not exit within 20 s of SIGTERM; killing it")
                self.proc.kill()
                self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def cpu_s(self) -> float:
        """CPU seconds (user + system) used so far by the server and its child processes."""
        if self.proc is None:
            return 0.0
        procs = [psutil.Process(self.proc.pid)]
        procs += procs[0].children(recursive=True)
        total = 0.0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                t = proc.cpu_times()
                total += t.user + t.system
        return total

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def ready_url(self) -> str:
        raise NotImplementedError

    def log_problems(self) -> list[str]:
        """Warning and error lines of the server's log so far."""
        raise NotImplementedError

    # data plane
    async def create_all(self) -> None:
        raise NotImplementedError

    def write_script(self) -> str:
        raise NotImplementedError

    def read_script(self, serializable: bool) -> str:
        raise NotImplementedError

    def versions(self) -> dict[str, int]:
        """Number of sets each of the 1,000 keys has seen since it was created."""
        raise NotImplementedError

    def read_value(self, key: str) -> str:
        raise NotImplementedError

    def server_writes(self) -> int:
        """Successful writes as the server counts them (its /metrics)."""
        raise NotImplementedError

    def settled_writes(self) -> int:
        """server_writes() once it stops moving (writes wrk left in flight are done)."""
        last = self.server_writes()
        for _ in range(50):
            time.sleep(0.2)
            now = self.server_writes()
            if now == last:
                return now
            last = now
        return last

    def put(self, key: str, value: str) -> int:
        """Set key (synchronously); the revision of the write."""
        raise NotImplementedError


class Fleetmate(Server):
    name = "fleetmate"
    kind = "fleetmate"
    workers: int | None = None  # None: the configured default

    def command(self) -> tuple[list[str], dict[str, str]]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
        if self.workers is not None:
            env["FLEETMATE_WORKERS"] = str(self.workers)
        env.update(
            FLEETMATE_DATA_DIR=str(self.tmp / "data"),
            FLEETMATE_HTTP_PORT=str(self.port),
            FLEETMATE_NATS_PORT="0",
            FLEETMATE_ZK_PORT=str(free_port()),  # never assume 2181 is free
            FLEETMATE_LOG_LEVEL="warning",
            FLEETMATE_NODE_ID="bench",
        )
        return [sys.executable, "-m", "app", "serve"], env

    def ready_url(self) -> str:
        return f"{self.url}/api/v1/ready"

    def log_problems(self) -> list[str]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            try:
                level = json.loads(line).get("level", "")
            except ValueError:
                level = "raw"
            if level not in ("debug", "info") and "Embedded server is experimental" not in line:
                out.append(line)  # (granian warns about its embedded mode on every start: not news)
        return out

    async def create_all(self) -> None:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, trust_env=False) as client:

            async def one(key: str) -> None:
                async with sem:
                    r = await client.post(f"/api/v1/registry/nodes{key}", json={"data": VALUES[0], "parents": True})
                if r.status_code != 201:
                    raise RuntimeError(f"create {key}: {r.status_code} {r.text}")

            await asyncio.gather(*(one(k) for k in KEY_NAMES))

    def write_script(self) -> str:
        paths = [f"/api/v1/registry/nodes{k}" for k in KEY_NAMES]
        return lua_script("PUT", paths, ['{"data":"'] * KEYS, VALUES, '"}')

    def read_script(self, serializable: bool) -> str:
        query = "?serializable=true" if serializable else ""
        return lua_script("GET", [f"/api/v1/registry/nodes{k}{query}" for k in KEY_NAMES], None, [""], "")

    def versions(self) -> dict[str, int]:
        r = self.client.get(f"/api/v1/registry/children{PREFIX}", params={"stat": "true"})
        r.raise_for_status()
        return {f"{PREFIX}/{c['name']}": c["stat"]["version"] for c in r.json()["children"]}

    def read_value(self, key: str) -> str:
        r = self.client.get(f"/api/v1/registry/nodes{key}")
        r.raise_for_status()
        body = r.json()
        data: str = body["data"] if body["encoding"] == "utf-8" else base64.b64decode(body["data"]).decode()
        return data

    def server_writes(self) -> int:
        # Commands applied to the log: every worker applies all of them (each is a replica), so
        # whichever worker answers the scrape counts every write; the keys exist, so each set succeeds.
        return int(_scrape(f"{self.url}/metrics", r"fleetmate_registry_log_applied_commands_total"))

    def put(self, key: str, value: str) -> int:
        r = self.client.put(f"/api/v1/registry/nodes{key}", json={"data": value})
        r.raise_for_status()
        revision: int = r.json()["stat"]["mzxid"]
        return revision


class Etcd(Server):
    name = "etcd"
    kind = "etcd"

    def __init__(self, binary: str) -> None:
        super().__init__(binary)
        self.peer = free_port()

    def command(self) -> tuple[list[str], dict[str, str]]:
        client, peer = f"http://127.0.0.1:{self.port}", f"http://127.0.0.1:{self.peer}"
        cmd = [
            self.binary,
            "--name", "bench",
            "--data-dir", str(self.tmp / "etcd"),
            "--listen-client-urls", client,
            "--advertise-client-urls", client,
            "--listen-peer-urls", peer,
            "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"bench={peer}",
        ]  # fmt: skip
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        return cmd, env

    def ready_url(self) -> str:
        return f"{self.url}/health"

    def log_problems(self) -> list[str]:
        out = []
        for line in self.log.read_text(errors="replace").splitlines():
            if not re.search(r" [WEC] \| |\"level\":\"(warn|error|fatal|panic)\"", line):
                continue
            if "simple token is not cryptographically signed" not in line:  # the default auth token type
                out.append(line)
        return out

    async def create_all(self) -> None:
        sem = asyncio.Semaphore(32)
        async with httpx.AsyncClient(base_url=self.url, timeout=30, trust_env=False) as client:

            async def one(key: str) -> None:
                async with sem:
                    r = await client.post("/v3/kv/put", json={"key": b64(key), "value": b64(VALUES[0])})
                if r.status_code != 200:
                    raise RuntimeError(f"put {key}: {r.status_code} {r.text}")

            await asyncio.gather(*(one(k) for k in KEY_NAMES))

    def write_script(self) -> str:
        prefixes = ['{"key":"' + b64(k) + '","value":"' for k in KEY_NAMES]
        return lua_script("POST", ["/v3/kv/put"] * KEYS, prefixes, [b64(v) for v in VALUES], '"}')

    def read_script(self, serializable: bool) -> str:
        tail = ',"serializable":true}' if serializable else "}"
        prefixes = ['{"key":"' + b64(k) + '"' for k in KEY_NAMES]
        return lua_script("POST", ["/v3/kv/range"] * KEYS, prefixes, [""], tail)

    def versions(self) -> dict[str, int]:
        r = self.client.post("/v3/kv/range", json={"key": b64(PREFIX + "/"), "range_end": b64(PREFIX + "0")})
        r.raise_for_status()
        # etcd's version is 1 after the create and counts every put since
        return {base64.b64decode(kv["key"]).decode(): int(kv["version"]) - 1 for kv in r.json().get("kvs", [])}

    def read_value(self, key: str) -> str:
        r = self.client.post("/v3/kv/range", json={"key": b64(key)})
        r.raise_for_status()
        kvs = r.json().get("kvs", [])
        return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else ""

    def server_writes(self) -> int:
        # puts applied to the store: a put whose HTTP client went away (wrk stopping) is applied but
        # ends as grpc_code="Canceled" in the gateway, so the gRPC counters would miss it
        return int(_scrape(f"{self.url}/metrics", "etcd_mvcc_put_total"))

    def put(self, key: str, value: str) -> int:
        r = self.client.post("/v3/kv/put", json={"key": b64(key), "value": b64(value)})
        r.raise_for_status()
        return int(r.json()["header"]["revision"])


class OtherLoad:
    """CPU used by processes outside this benchmark while a scenario runs (the machine may be shared).

    Machine-wide busy time minus this process, its reaped children (wrk, watcher processes) and the
    server with its children; `pct` is that share of all cores over the scenario's wall time.
    `steal_pct`: the share the hypervisor gave to other guests (on this VM it comes and goes, and
    a run with much of it is not comparable with one without).
    """

    def __init__(self, server: Server) -> None:
        self.server = server
        self.pct = 0.0
        self.steal_pct = 0.0

    @staticmethod
    def _steal() -> float:
        return float(getattr(psutil.cpu_times(), "steal", 0.0))

    @staticmethod
    def _busy() -> float:
        t = psutil.cpu_times()
        return t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0)

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __enter__(self) -> OtherLoad:
        self.start = (time.monotonic(), self._busy(), self._own(), self.server.cpu_s())
        self.steal0 = self._steal()
        return self

    def __exit__(self, *exc: object) -> None:
        wall, busy, own, srv = self.start
        foreign = (self._busy() - busy) - (self._own() - own) - (self.server.cpu_s() - srv)
        cores_s = (time.monotonic() - wall) * (os.cpu_count() or 1)
        self.pct = max(0.0, 100.0 * foreign / cores_s)
        self.steal_pct = max(0.0, 100.0 * (self._steal() - self.steal0) / cores_s)


def machine_load(seconds: float) -> float:
    """Share of all CPUs (percent) that other processes use over a few idle seconds."""
    busy = OtherLoad._busy()
    time.sleep(seconds)
    return 100.0 * (OtherLoad._busy() - busy) / (seconds * (os.cpu_count() or 1))


def wait_quiet(limit_s: float) -> None:
    """Wait (at most limit_s) until other processes use under OTHER_LOAD_NOTE_PCT of the CPUs."""
    if limit_s <= 0:
        return
    deadline = time.monotonic() + limit_s
    said = False
    while (load := machine_load(1.0)) >= OTHER_LOAD_NOTE_PCT:
        if time.monotonic() > deadline:
            progress(f"  other processes still use {load:.0f}% of the CPUs after {limit_s:g} s: going ahead")
            return
        if not said:
            progress(f"  other processes use {load:.0f}% of the CPUs: waiting for them (up to {limit_s:g} s)")
            said = True


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    try:
        server.start()
        yield server
    finally:
        server.stop()


# ---- wrk scenarios ------------------------------------------------------------------------------


def wrk_scenario(
    wrk: str, server: Server, script: str, label: str, connections: int, duration: float
) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", prefix="bench-") as f:
        f.write(script)
        f.flush()
        progress(f"{server.name}: {label}, {connections} connections, {duration:g} s")
        with OtherLoad(server) as other:
            res = run_wrk(wrk, server.url, f.name, connections, duration)
    res["ok"] = res["requests"] - res["non2xx"]
    res["other_load_pct"] = other.pct
    res["steal_pct"] = other.steal_pct
    bad = res["non2xx"] + sum(res["socket_errors"].values())
    if bad:
        progress(f"  !! {server.name} {label}: non-2xx {res['non2xx']}, socket errors {res['socket_errors']}")
    progress(
        f"  {res['ops_s']:.0f} ops/s, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms"
        f" ({res['requests']} requests, non-2xx {res['non2xx']}; other processes used {other.pct:.0f}% of the CPUs,"
        f" steal {other.steal_pct:.0f}%)"
    )
    if not server.alive():
        raise RuntimeError(f"{server.name} died during {label}; see its log")
    return res


def check_writes(server: Server, res: dict[str, Any], before: dict[str, int]) -> dict[str, Any]:
    """Compare the versions the keys gained (and the server's own count) with what wrk saw succeed."""
    served = server.settled_writes() - before["served"]
    versions = server.versions()
    gained = sum(versions.values()) - before["versions"]
    # wrk stops with up to one request per connection in flight (plus any it timed out on): those
    # are applied by the server but not counted by wrk.
    slack = res["connections"] + res["socket_errors"]["timeout"]
    check = {
        "keys": len(versions),
        "versions_gained": gained,
        "wrk_2xx": res["ok"],
        "server_writes": served,
        "in_flight_at_stop": gained - res["ok"],
        "ok": len(versions) == KEYS and gained == served and 0 <= gained - res["ok"] <= slack,
    }
    before["versions"] += gained
    before["served"] += served
    verdict = "ok" if check["ok"] else "MISMATCH"
    progress(
        f"  check: versions gained {gained}, server-counted writes {served}, wrk 2xx {res['ok']}"
        f" (+{gained - res['ok']} in flight at stop) -> {verdict}"
    )
    return check


def read_back(server: Server) -> dict[str, Any]:
    keys = random.sample(KEY_NAMES, READ_BACK)
    wrong = {}
    for key in keys:
        value = server.read_value(key)
        if len(value.encode()) != VALUE_BYTES or value not in VALUES:
            wrong[key] = value
    if wrong:
        progress(f"  !! {server.name}: wrong values read back: {wrong}")
    return {"keys": len(keys), "wrong": wrong, "ok": not wrong}


# ---- watchers -----------------------------------------------------------------------------------


class Watcher:
    __slots__ = ("dups", "error", "other", "ready", "times")

    def __init__(self) -> None:
        self.ready = False
        self.error = ""
        self.times: dict[int, float] = {}
        self.dups = 0
        self.other = 0

    def event(self, revision: int, at: float) -> None:
        if revision in self.times:
            self.dups += 1
        else:
            self.times[revision] = at


_decode = msgspec.json.Decoder()


async def _fleetmate_watch(w: Watcher, port: int, sem: asyncio.Semaphore) -> None:
    from websockets.asyncio.client import connect

    url = f"ws://127.0.0.1:{port}/api/v1/watch?path={PREFIX}&recursive=true"
    try:
        async with sem:
            ws = await connect(url, compression=None, proxy=None, ping_interval=None, open_timeout=120, max_queue=None)
            first = _decode.decode(await ws.recv())
            if first.get("type") != "ready":
                w.error = f"first message {first}"
                await ws.close()
                return
            w.ready = True
        async with ws:
            async for msg in ws:
                at = time.monotonic()
                body = _decode.decode(msg)
                kind = body.get("type")
                if kind in ("changed", "created", "deleted", "children"):
                    w.event(body["revision"], at)
                elif kind == "error":
                    w.error = f"error message {body}"
                    return
                else:
                    w.other += 1
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        w.error = f"{type(exc).__name__}: {exc}"


def _etcd_lines(w: Watcher, buf: bytes, at: float) -> bytes:
    while (nl := buf.find(b"\n")) >= 0:
        line, buf = buf[:nl], buf[nl + 1 :]
        if not line.strip():
            continue
        body = _decode.decode(line)
        result = body.get("result")
        if result is None:
            w.error = f"error message {body}"
            continue
        if result.get("created"):
            w.ready = True
        if result.get("canceled"):
            w.error = f"watch canceled: {result}"
        for ev in result.get("events") or ():
            w.event(int(ev["kv"]["mod_revision"]), at)
    return buf


async def _etcd_watch(w: Watcher, port: int, sem: asyncio.Semaphore) -> None:
    body = json.dumps({"create_request": {"key": b64(PREFIX + "/"), "range_end": b64(PREFIX + "0")}}).encode()
    request = (
        f"POST /v3/watch HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    writer = None
    try:
        await sem.acquire()
        held = True
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=1 << 20)
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200") or b"chunked" not in head.lower():
                w.error = f"unexpected answer {head[:200]!r}"
                return
            buf = b""
            while True:
                size = int((await reader.readline()).split(b";")[0], 16)
                if size == 0:
                    w.error = w.error or "stream ended"
                    return
                chunk = await reader.readexactly(size + 2)
                buf = _etcd_lines(w, buf + chunk[:-2], time.monotonic())
                if w.error:
                    return
                if held and w.ready:
                    sem.release()
                    held = False
        finally:
            if held:
                sem.release()
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        w.error = f"{type(exc).__name__}: {exc}"
    finally:
        if writer is not None:
            writer.close()


async def _watch_main(kind: str, port: int, n: int, conn: Connection) -> None:
    loop = asyncio.get_running_loop()
    watchers = [Watcher() for _ in range(n)]
    sem = asyncio.Semaphore(64)
    run = _fleetmate_watch if kind == "fleetmate" else _etcd_watch
    started = time.monotonic()
    tasks = [asyncio.create_task(run(w, port, sem)) for w in watchers]
    deadline = started + 300
    # polling: one counter over thousands of tasks is cheaper than an event per watcher
    while time.monotonic() < deadline and sum(1 for w in watchers if w.ready or w.error) < n:  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    failed = [w.error for w in watchers if not w.ready]
    conn.send(("ready", n - len(failed), len(failed), failed[:3], time.monotonic() - started))
    cpu = time.process_time()
    msg = await loop.run_in_executor(None, conn.recv)
    if msg[0] == "collect":
        revisions, wait_s = msg[1], msg[2]
        want = set(revisions)
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if all(w.error or want <= w.times.keys() for w in watchers):
                break
            await asyncio.sleep(0.05)
        times = {r: [w.times[r] for w in watchers if r in w.times] for r in revisions}
        lost = [w.error for w in watchers if w.error]
        conn.send(
            (
                "result",
                times,
                {
                    "missing": sum(len(want - w.times.keys()) for w in watchers),
                    "unexpected": sum(len(w.times.keys() - want) for w in watchers),
                    "duplicates": sum(w.dups for w in watchers),
                    "other_messages": sum(w.other for w in watchers),
                    "errors": len(lost),
                    "error_samples": lost[:3],
                    "client_cpu_s": time.process_time() - cpu,
                },
            )
        )
    for t in tasks:
        t.cancel()
    await asyncio.wait(tasks, timeout=10)


def _watch_worker(kind: str, port: int, n: int, conn: Connection) -> None:
    """Entry point of a watcher process."""
    _raise_nofile()
    try:
        import uvloop

        uvloop.run(_watch_main(kind, port, n, conn))
    except ImportError:
        asyncio.run(_watch_main(kind, port, n, conn))


def watch_scenario(server: Server, watchers: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    nproc = max(2, math.ceil(watchers / WATCHERS_PER_PROCESS))
    shares = [watchers // nproc + (1 if i < watchers % nproc else 0) for i in range(nproc)]
    progress(f"{server.name}: connecting {watchers} watchers from {nproc} processes")
    pipes, procs = [], []
    for share in shares:
        ours, theirs = ctx.Pipe()
        proc = ctx.Process(target=_watch_worker, args=(server.kind, server.port, share, theirs), daemon=True)
        proc.start()
        pipes.append(ours)
        procs.append(proc)
    try:
        ready = connect_s = 0.0
        failures: list[str] = []
        for pipe in pipes:
            if not pipe.poll(360):
                raise RuntimeError("a watcher process did not report")
            _, ok, bad, samples, took = pipe.recv()
            ready += ok
            connect_s = max(connect_s, took)
            failures += samples if bad else []
        failed = f"; failures: {failures}" if failures else ""
        progress(f"  {int(ready)}/{watchers} watchers ready in {connect_s:.1f} s{failed}")
        time.sleep(1.0)  # let the server settle after the connection storm
        cpu = server.cpu_s()
        writes: list[tuple[int, float, float]] = []
        start = time.monotonic()
        for i in range(WATCH_WRITES):
            time.sleep(max(0.0, start + i * WATCH_INTERVAL_S - time.monotonic()))
            sent = time.monotonic()
            revision = server.put(KEY_NAMES[i % KEYS], VALUES[i % len(VALUES)])
            writes.append((revision, sent, time.monotonic() - sent))
        writer_s = time.monotonic() - start
        revisions = [w[0] for w in writes]
        for pipe in pipes:
            pipe.send(("collect", revisions, WATCH_COLLECT_S))
        times: dict[int, list[float]] = {r: [] for r in revisions}
        tally: dict[str, Any] = {"error_samples": []}
        for pipe in pipes:
            if not pipe.poll(WATCH_COLLECT_S + 60):
                raise RuntimeError("a watcher process did not send its results")
            _, part, counts = pipe.recv()
            for r, ts in part.items():
                times[r] += ts
            for k, v in counts.items():
                tally[k] = tally.get(k, 0) + v if k != "error_samples" else tally[k] + v
        server_cpu = server.cpu_s() - cpu
    finally:
        for proc in procs:
            proc.join(20)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
    sent_at = {r: s for r, s, _ in writes}
    latencies = [(t - sent_at[r]) * 1e3 for r, ts in times.items() for t in ts]
    per_write_last = [(max(ts) - sent_at[r]) * 1e3 for r, ts in times.items() if ts]
    per_write = [
        {
            "revision": r,
            "write_ms": round(took * 1e3, 2),
            "delivered": len(times[r]),
            "first_ms": round((min(times[r]) - sent) * 1e3, 2) if times[r] else None,
            "p50_ms": round((percentile(times[r], 50) - sent) * 1e3, 2) if times[r] else None,
            "last_ms": round((max(times[r]) - sent) * 1e3, 2) if times[r] else None,
        }
        for r, sent, took in writes
    ]
    expected = watchers * len(writes)
    res = {
        "watchers": watchers,
        "processes": nproc,
        "connect_s": connect_s,
        "watchers_ready": int(ready),
        "writes": len(writes),
        "write_interval_s": WATCH_INTERVAL_S,
        "write_latency_ms_p50": percentile([w[2] * 1e3 for w in writes], 50),
        "write_latency_ms_max": max(w[2] * 1e3 for w in writes),
        "writer_span_s": writer_s,
        "expected": expected,
        "delivered": len(latencies),
        "delivered_pct": 100.0 * len(latencies) / expected,
        "p50_ms": percentile(latencies, 50),
        "p99_ms": percentile(latencies, 99),
        "max_ms": max(latencies, default=float("nan")),
        "last_watcher_ms_p50": percentile(per_write_last, 50),
        "last_watcher_ms_max": max(per_write_last, default=float("nan")),
        "server_cpu_s": server_cpu,
        **{k: v for k, v in tally.items() if k != "error_samples"},
        "error_samples": tally["error_samples"][:5],
        "per_write": per_write,
    }
    flag = "" if res["delivered"] == expected else "  !! INCOMPLETE"
    progress(
        f"  delivered {res['delivered']}/{expected}, p50 {res['p50_ms']:.2f} ms, p99 {res['p99_ms']:.2f} ms,"
        f" max {res['max_ms']:.1f} ms, all watchers reached (median per write) {res['last_watcher_ms_p50']:.1f} ms;"
        f" CPU s: server {server_cpu:.1f}, watcher clients {tally.get('client_cpu_s', 0):.1f}{flag}"
    )
    if not server.alive():
        raise RuntimeError(f"{server.name} died during the watch scenario; see its log")
    return res


# ---- one system, all scenarios ------------------------------------------------------------------


def run_system(server: Server, wrk: str, duration: float, watcher_counts: list[int], quiet_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"scenarios": {}, "checks": {}, "watch": {}}
    with running(server):
        started = time.monotonic()
        asyncio.run(server.create_all())
        versions = server.versions()
        progress(f"{server.name}: {len(versions)} keys created in {time.monotonic() - started:.1f} s")
        before = {"versions": sum(versions.values()), "served": server.settled_writes()}
        script = server.write_script()
        for c in WRITE_CONNECTIONS:
            wait_quiet(quiet_s)
            res = wrk_scenario(wrk, server, script, "writes", c, duration)
            out["scenarios"][f"writes_c{c}"] = res
            out["checks"][f"writes_c{c}"] = check_writes(server, res, before)
        out["checks"]["read_back"] = read_back(server)
        for serializable in (False, True):
            name = "reads_serializable" if serializable else "reads_linearizable"
            wait_quiet(quiet_s)
            res = wrk_scenario(wrk, server, server.read_script(serializable), name, READ_CONNECTIONS, duration)
            out["scenarios"][f"{name}_c{READ_CONNECTIONS}"] = res
        for n in watcher_counts:
            wait_quiet(quiet_s)
            with OtherLoad(server) as other:
                res = watch_scenario(server, n)
            res["other_load_pct"] = other.pct
            progress(f"  other processes used {other.pct:.0f}% of the CPUs")
            out["watch"][f"watch_{n}"] = res
        out["log_problems"] = server.log_problems()
    for res in out["scenarios"].values():
        if not (res["non2xx"] or sum(res["socket_errors"].values())):
            res.pop("raw", None)  # keep wrk's own output only when something went wrong
    return out


def interleaved_writes(
    wrk: str, etcd_bin: str, pairs: int, connections: int, duration: float, quiet_s: float
) -> list[dict[str, Any]]:
    """Write runs alternating between fleetmate and etcd, both started side by side (one loaded at
    a time): this VM's speed drifts by a fifth from minute to minute, so only runs next to each
    other compare fairly. One row per pair: both results and their ratio."""
    rows: list[dict[str, Any]] = []
    fm, et = Fleetmate(sys.executable), Etcd(etcd_bin)
    with running(fm), running(et):
        for server in (fm, et):
            asyncio.run(server.create_all())
        for i in range(pairs):
            row: dict[str, Any] = {"pair": i + 1}
            order = (fm, et) if i % 2 == 0 else (et, fm)  # neither always goes first
            for server in order:
                before = {"versions": sum(server.versions().values()), "served": server.settled_writes()}
                wait_quiet(quiet_s)
                res = wrk_scenario(wrk, server, server.write_script(), f"writes (pair {i + 1})", connections, duration)
                check = check_writes(server, res, before)
                res.pop("raw", None)
                row[server.name] = {**{k: res[k] for k in WRK_FIELDS}, "check_ok": check["ok"]}
            row["ratio_ops"] = _ratio(row["fleetmate"]["ops_s"], row["etcd"]["ops_s"])
            row["ratio_p99"] = _ratio(row["fleetmate"]["p99_ms"], row["etcd"]["p99_ms"])
            rows.append(row)
    return rows


def _ratio(a: float, b: float) -> float | None:
    return a / b if b and not math.isnan(a) and not math.isnan(b) else None


def _fmt(v: float | None, digits: int = 2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=None, help="seconds per write/read scenario (default 10)")
    parser.add_argument("--quick", action="store_true", help="3 s per wrk run and 1,000 watchers only")
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help=f"wait up to S seconds before each scenario for other processes to use < {OTHER_LOAD_NOTE_PCT}%% of CPUs",
    )
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help=f"interleaved fleetmate/etcd write runs at {PAIR_CONNECTIONS} connections after the main run"
        " (default 4, 1 with --quick, 0 to skip)",
    )
    parser.add_argument(
        "--workers", type=int, default=None, help="fleetmate worker processes (default: the configured default)"
    )
    args = parser.parse_args()
    Fleetmate.workers = args.workers
    duration = args.duration if args.duration is not None else (3.0 if args.quick else 10.0)
    watcher_counts = [1000] if args.quick else [1000, 10000]
    nofile = _raise_nofile()
    if nofile < max(watcher_counts) + 1000:
        progress(f"!! open-file limit is {nofile}: {max(watcher_counts)} watchers may not fit")

    wrk = ensure_debian_package("wrk", "wrk")
    etcd_bin = ensure_debian_package("etcd", "etcd-server")
    if not wrk or not etcd_bin:
        progress(f"need wrk and etcd (wrk: {wrk}, etcd: {etcd_bin})")
        return 1
    idle_load = machine_load(2.0)
    if idle_load >= OTHER_LOAD_NOTE_PCT:
        progress(f"!! other processes use {idle_load:.0f}% of the CPUs before the run: figures will be noisy")
    etcd_version = subprocess.run([etcd_bin, "--version"], capture_output=True, text=True, check=False).stdout
    total = time.monotonic()
    results: dict[str, Any] = {}
    systems: list[tuple[type[Server], str]] = [(Fleetmate, sys.executable), (Etcd, etcd_bin)]
    for kind, binary in systems:
        server = kind(binary)  # one at a time: its temporary directory exists only while it runs
        progress(f"=== {server.name} ===")
        results[server.name] = run_system(server, wrk, duration, watcher_counts, args.wait_quiet)
    pairs = args.pairs if args.pairs is not None else (1 if args.quick else 4)
    progress(f"=== interleaved writes, {pairs} pairs ===")
    interleaved = interleaved_writes(wrk, etcd_bin, pairs, PAIR_CONNECTIONS, duration, args.wait_quiet)
    elapsed = time.monotonic() - total

    fm, et = results["fleetmate"], results["etcd"]
    rows = []
    header = (
        f"{'scenario':28}{'fm ops/s':>10}{'p50 ms':>9}{'p99 ms':>9}{'non2xx':>8}"
        f"{'etcd ops/s':>12}{'p50 ms':>9}{'p99 ms':>9}{'non2xx':>8}   {'fm/etcd: ops':>12}{'p50':>7}{'p99':>7}"
    )
    print()
    print(f"fleetmate vs etcd {etcd_version.split()[2] if etcd_version else ''}: {KEYS} keys, "
          f"{VALUE_BYTES}-byte values, wrk {duration:g} s per row, 2 wrk threads (1 at 1 connection)")  # fmt: skip
    print(header)
    print("-" * len(header))
    comparison: dict[str, Any] = {}
    for name, a in fm["scenarios"].items():
        b = et["scenarios"][name]
        ratio = {
            "ops_s": _ratio(a["ops_s"], b["ops_s"]),
            "p50": _ratio(a["p50_ms"], b["p50_ms"]),
            "p99": _ratio(a["p99_ms"], b["p99_ms"]),
        }
        comparison[name] = {
            "fleetmate": {k: a[k] for k in WRK_FIELDS},
            "etcd": {k: b[k] for k in WRK_FIELDS},
            "ratio_fleetmate_over_etcd": ratio,
        }
        label = name.replace("_c", " c=")
        rows.append(
            f"{label:28}{a['ops_s']:>10.0f}{a['p50_ms']:>9.2f}{a['p99_ms']:>9.2f}{a['non2xx']:>8}"
            f"{b['ops_s']:>12.0f}{b['p50_ms']:>9.2f}{b['p99_ms']:>9.2f}{b['non2xx']:>8}"
            f"   {_fmt(ratio['ops_s']):>12}{_fmt(ratio['p50']):>7}{_fmt(ratio['p99']):>7}"
        )
    print("\n".join(rows))
    print()
    wheader = (
        f"{'watch (delivery latency)':28}{'fm delivered':>16}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'etcd delivered':>18}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}   {'fm/etcd: p50':>12}{'p99':>7}"
    )
    print(wheader)
    print("-" * len(wheader))
    for name, a in fm["watch"].items():
        b = et["watch"][name]
        ratio = {"p50": _ratio(a["p50_ms"], b["p50_ms"]), "p99": _ratio(a["p99_ms"], b["p99_ms"])}
        comparison[name] = {
            "fleetmate": a,
            "etcd": b,
            "ratio_fleetmate_over_etcd": ratio,
        }
        label = f"{a['watchers']} watchers x {a['writes']} writes"
        print(
            f"{label:28}{a['delivered']:>9}/{a['expected']:<6}{a['p50_ms']:>9.2f}{a['p99_ms']:>9.2f}{a['max_ms']:>9.1f}"
            f"{b['delivered']:>11}/{b['expected']:<6}{b['p50_ms']:>9.2f}{b['p99_ms']:>9.2f}{b['max_ms']:>9.1f}"
            f"   {_fmt(ratio['p50']):>12}{_fmt(ratio['p99']):>7}"
        )
    for name, a in fm["watch"].items():
        b = et["watch"][name]
        print(
            f"  {a['watchers']} watchers, the writer's own sets (asked pace {WATCH_INTERVAL_S:g} s):"
            f" fleetmate p50 {a['write_latency_ms_p50']:.0f} ms, max {a['write_latency_ms_max']:.0f} ms,"
            f" {a['writes']} sets in {a['writer_span_s']:.1f} s;"
            f" etcd p50 {b['write_latency_ms_p50']:.0f} ms, max {b['write_latency_ms_max']:.0f} ms,"
            f" {b['writes']} sets in {b['writer_span_s']:.1f} s"
        )
    if interleaved:
        print()
        print(f"interleaved writes c={PAIR_CONNECTIONS} (both servers up, runs alternate)")
        for row in interleaved:
            a, b = row["fleetmate"], row["etcd"]
            print(
                f"  pair {row['pair']}: fleetmate {a['ops_s']:.0f} ops/s p99 {a['p99_ms']:.2f} ms;"
                f" etcd {b['ops_s']:.0f} ops/s p99 {b['p99_ms']:.2f} ms; fm/etcd ops {_fmt(row['ratio_ops'])},"
                f" p99 {_fmt(row['ratio_p99'])} (steal {a['steal_pct']:.0f}% / {b['steal_pct']:.0f}%)"
            )
        ops = sorted(r["ratio_ops"] for r in interleaved if r["ratio_ops"] is not None)
        p99 = sorted(r["ratio_p99"] for r in interleaved if r["ratio_p99"] is not None)
        if ops and p99:
            print(f"  median of pairs: ops {percentile(ops, 50):.2f}x, p99 {percentile(p99, 50):.2f}x;"
                  f" range ops {ops[0]:.2f}-{ops[-1]:.2f}x, p99 {p99[0]:.2f}-{p99[-1]:.2f}x")  # fmt: skip
    print()
    problems = []  # failed checks, errors, lost events: the run's figures are not to be trusted
    notes = []  # worth knowing: server log warnings, other load on the machine
    for sysname, res in results.items():
        for name, check in res["checks"].items():
            if not check["ok"]:
                problems.append(f"{sysname}: check {name} failed: {check}")
        for name, sc in res["scenarios"].items():
            if sc["non2xx"] or sum(sc["socket_errors"].values()):
                problems.append(f"{sysname}: {name}: non-2xx {sc['non2xx']}, socket errors {sc['socket_errors']}")
        for name, w in res["watch"].items():
            if w["delivered"] != w["expected"] or w["errors"]:
                problems.append(f"{sysname}: {name}: delivered {w['delivered']}/{w['expected']}, errors {w['errors']}")
        if res["log_problems"]:
            notes.append(f"{sysname}: {len(res['log_problems'])} warning/error log lines, first: "
                         f"{res['log_problems'][0][:300]}")  # fmt: skip
        busy = {
            k: round(v["other_load_pct"])
            for k, v in (res["scenarios"] | res["watch"]).items()
            if v["other_load_pct"] >= OTHER_LOAD_NOTE_PCT
        }
        if busy:
            notes.append(f"{sysname}: other processes used >= {OTHER_LOAD_NOTE_PCT}% of the CPUs during {busy}")
        stolen = {k: round(v["steal_pct"]) for k, v in res["scenarios"].items() if v["steal_pct"] >= STEAL_NOTE_PCT}
        if stolen:
            notes.append(f"{sysname}: the hypervisor took >= {STEAL_NOTE_PCT}% of the CPUs (steal) during {stolen}")
    for row in interleaved:
        for sysname in ("fleetmate", "etcd"):
            if not row[sysname]["check_ok"]:
                problems.append(f"{sysname}: interleaved pair {row['pair']}: write check failed")
    if idle_load >= OTHER_LOAD_NOTE_PCT:
        notes.insert(0, f"other processes used {idle_load:.0f}% of the CPUs just before the run")
    checks = "; ".join(
        f"{s}: every write run's version gain == server-counted writes == wrk 2xx + in flight at stop, "
        f"{res['checks']['read_back']['keys']} keys read back with 100-byte values"
        for s, res in results.items()
        if all(c["ok"] for c in res["checks"].values())
    )
    print(f"checks: {checks or 'see problems'}")
    print("problems: " + ("none" if not problems else "\n  " + "\n  ".join(problems)))
    print("notes: " + ("none" if not notes else "\n  " + "\n  ".join(notes)))
    print(f"total {elapsed:.0f} s")

    path = write_result(
        "registry",
        {
            "duration_s": duration,
            "quick": args.quick,
            "keys": KEYS,
            "value_bytes": VALUE_BYTES,
            "etcd_version": etcd_version.strip().splitlines()[0] if etcd_version else "",
            "load": {
                "reads_writes": "wrk --latency -t2 (-t1 for 1 connection), Lua script picking random keys",
                "watch": "asyncio processes; fleetmate one WebSocket per watcher, "
                "etcd one HTTP /v3/watch stream per watcher (no multiplexing)",
                "watch_writes": WATCH_WRITES,
                "watch_interval_s": WATCH_INTERVAL_S,
            },
            "comparison": comparison,
            "interleaved_writes": {"connections": PAIR_CONNECTIONS, "pairs": interleaved},
            "checks": {s: res["checks"] for s, res in results.items()},
            "problems": problems,
            "notes": notes,
            "other_load_before_run_pct": idle_load,
            "log_problems": {s: res["log_problems"][:20] for s, res in results.items()},
            "detail": {s: {"scenarios": res["scenarios"]} for s, res in results.items()},
            "elapsed_s": elapsed,
        },
    )
    print(f"wrote {path}")
    return 0 if not problems else 3


if __name__ == "__main__":
    sys.exit(main())
