"""Hostile clients against one fleetmate: while one address holds thousands of half-sent HTTP requests
and floods the ZooKeeper port, another address writes over HTTP and ZooKeeper; its write latencies
are measured with and without the attack.

    python bench/hostile.py [--half-open 5000] [--zk-connections 3000] [--seconds 15] [--scan-only] [--quick]

Prints a table and writes bench/results/hostile.json, with what the JSON depth check
(app/web/limits.py) costs on typical and hostile bodies (--scan-only: just that). The attacker is 127.0.0.1, the writer
127.0.0.2 (any 127/8 address is this host on Linux). The attack is kept up for the whole run:
half-open connections the server closes (http.header_read_timeout) are opened again.
tests/test_limits.py uses the same clients to check the functional outcome.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import resource
import selectors
import socket
import struct
import sys
import tempfile
import threading
import time
import timeit
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # `python bench/hostile.py` as well as -m

from bench.common import progress, summary, write_result
from tests.harness import Fleetmate, running

ATTACKER = "127.0.0.1"
WRITER = "127.0.0.2"
# A request header cut short: the server waits for the rest (or for its header read timeout).
HALF_HEADER = b"PUT /api/v1/registry/nodes/x HTTP/1.1\r\nHost: fleetmate\r\nContent-Type: application/json\r\n"


def raise_nofile(need: int) -> int:
    """Raise this process's open-file soft limit towards `need` (up to the hard limit); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        soft = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    return soft


def split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host, int(port)


def connect(addr: tuple[str, int], source: str, timeout: float = 10.0) -> socket.socket:
    """A TCP connection from `source` (a local address) to addr."""
    return socket.create_connection(addr, timeout=timeout, source_address=(source, 0))


def half_headers(addr: tuple[str, int], count: int, source: str = ATTACKER) -> list[socket.socket]:
    """`count` connections that each send half a request header and then nothing."""
    out = []
    for _ in range(count):
        sock = connect(addr, source)
        sock.sendall(HALF_HEADER)
        out.append(sock)
    return out


def _string(text: str) -> bytes:
    raw = text.encode()
    return struct.pack(">i", len(raw)) + raw


def _buffer(raw: bytes) -> bytes:
    return struct.pack(">i", len(raw)) + raw


_CONNECT_BODY = struct.pack(">iqiq", 0, 0, 10000, 0) + _buffer(bytes(16)) + b"\x00"
CONNECT = struct.pack(">i", len(_CONNECT_BODY)) + _CONNECT_BODY  # a new session, 10 s timeout


def zk_flood(addr: tuple[str, int], count: int, source: str = ATTACKER, handshake: bool = True) -> list[socket.socket]:
    """`count` ZooKeeper connections; each sends a session request unless handshake is False.
    A connection the server closed at once still counts (it is in the list)."""
    out = []
    for _ in range(count):
        sock = connect(addr, source)
        if handshake:
            with contextlib.suppress(OSError):
                sock.sendall(CONNECT)
        out.append(sock)
    return out


def closed_by_server(socks: list[socket.socket], wait_s: float) -> int:
    """How many of socks the server closes (EOF or reset) within wait_s; what they send is read and dropped."""
    sel = selectors.DefaultSelector()
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
    closed = 0
    deadline = time.monotonic() + wait_s
    try:
        while closed < len(socks):
            left = deadline - time.monotonic()
            if left <= 0:
                break
            for key, _ in sel.select(min(left, 0.2)):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                try:
                    data = sock.recv(65536)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(sock)
                    closed += 1
    finally:
        sel.close()
        for sock in socks:
            sock.setblocking(True)
    return closed


def close_all(socks: list[socket.socket]) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.close()


class ZkClient:
    """One ZooKeeper session over a connection from `source`: create and setData, one at a time."""

    def __init__(self, addr: tuple[str, int], source: str, timeout: float = 10.0) -> None:
        self.sock = connect(addr, source, timeout)
        self.sock.sendall(CONNECT)
        reply = self._frame()
        self.session_id = struct.unpack_from(">iiq", reply)[2]
        self.xid = 0

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            chunk = self.sock.recv(n - len(out))
            if not chunk:
                raise ConnectionError("server closed the connection")
            out += chunk
        return out

    def _frame(self) -> bytes:
        return self._exact(struct.unpack(">i", self._exact(4))[0])

    def request(self, op: int, body: bytes) -> int:
        """Send a request and return its reply's error code (0: done)."""
        self.xid += 1
        packet = struct.pack(">ii", self.xid, op) + body
        self.sock.sendall(struct.pack(">i", len(packet)) + packet)
        while True:
            frame = self._frame()
            xid, _, err = struct.unpack_from(">iqi", frame)
            if xid == self.xid:
                return int(err)

    def create(self, path: str, data: bytes = b"") -> int:
        acl = struct.pack(">ii", 1, 31) + _string("world") + _string("anyone")
        return self.request(1, _string(path) + _buffer(data) + acl + struct.pack(">i", 0))

    def set_data(self, path: str, data: bytes) -> int:
        return self.request(5, _string(path) + _buffer(data) + struct.pack(">i", -1))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.close()


def http_client(url: str, source: str = WRITER, timeout: float = 10.0) -> httpx.Client:
    """An HTTP client whose connections come from `source`."""
    return httpx.Client(base_url=url, timeout=timeout, transport=httpx.HTTPTransport(local_address=source))


class HalfOpenKeeper(threading.Thread):
    """Holds `count` half-sent requests open, opening a new one for each the server closes."""

    def __init__(self, addr: tuple[str, int], count: int) -> None:
        super().__init__(daemon=True, name="half-open")
        self.addr = addr
        self.count = count
        self.stopping = threading.Event()
        self.reopened = 0
        self.failed = 0
        self.socks = half_headers(addr, count)

    def run(self) -> None:
        sel = selectors.DefaultSelector()
        for sock in self.socks:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        try:
            while not self.stopping.is_set():
                for key, _ in sel.select(0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    try:
                        if sock.recv(65536):
                            continue
                    except BlockingIOError:
                        continue
                    except OSError:
                        pass
                    sel.unregister(sock)
                    sock.close()
                    try:
                        fresh = half_headers(self.addr, 1)[0]
                    except OSError:
                        self.failed += 1
                        continue
                    fresh.setblocking(False)
                    sel.register(fresh, selectors.EVENT_READ)
                    self.reopened += 1
        finally:
            for key in list(sel.get_map().values()):
                with contextlib.suppress(OSError):
                    key.fileobj.close()  # type: ignore[union-attr]
            sel.close()


def measure_writes(url: str, zk: tuple[str, int], seconds: float) -> dict[str, Any]:
    """Sequential writes from WRITER for `seconds`, alternating HTTP PUT and ZooKeeper setData; latencies in ms."""
    http_ms: list[float] = []
    zk_ms: list[float] = []
    errors = 0
    with http_client(url) as api:
        created = api.post("/api/v1/registry/nodes/hostile-http", json={"data": "0"})
        if created.status_code not in (201, 409):
            raise RuntimeError(f"create over HTTP: {created.status_code} {created.text}")
        client = ZkClient(zk, WRITER)
        try:
            client.create("/hostile-zk")
            end = time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                i += 1
                t0 = time.perf_counter()
                answer = api.put("/api/v1/registry/nodes/hostile-http", json={"data": str(i)})
                http_ms.append((time.perf_counter() - t0) * 1000)
                errors += answer.status_code != 200
                t0 = time.perf_counter()
                errors += client.set_data("/hostile-zk", str(i).encode()) != 0
                zk_ms.append((time.perf_counter() - t0) * 1000)
        finally:
            client.close()
    return {"http_put_ms": summary(http_ms), "zk_set_ms": summary(zk_ms), "errors": errors}


def scan_costs() -> dict[str, dict[str, float]]:
    """Microseconds the JSON depth check takes per body, for bodies clients send and hostile ones."""
    from app.web.limits import json_depth_exceeds

    data_1mib = base64.b64encode(os.urandom(1 << 20)).decode()
    text = json.dumps([{"k": [i, {"x": [1, 2, {"y": "z"}]}]} for i in range(20000)])
    bodies = {
        "set body, 11 bytes of data": {"data": "hello world"},
        "set body, 1 MiB of data as base64": {"data": data_1mib, "encoding": "base64"},
        "set body, 1 MiB of JSON text as data": {"data": text},
        "multi of 100 sets": {"ops": [{"op": "set", "path": f"/a/{i}", "data": "x" * 20} for i in range(100)]},
    }
    encoded = {name: json.dumps(body).encode() for name, body in bodies.items()}
    encoded["100,000 nested arrays (refused)"] = b"[" * 100_000 + b"]" * 100_000
    encoded["8 MiB of depth-64 chains (accepted)"] = (b"[" * 64 + b"]" * 64) * (8 << 20 >> 7)
    out = {}
    for name, body in encoded.items():
        number = max(1, min(100_000, 20_000_000 // max(1, len(body))))
        best = min(timeit.repeat(lambda body=body: json_depth_exceeds(body, 64), number=number, repeat=5))
        out[name] = {"bytes": len(body), "us": round(best / number * 1e6, 2)}
    return out


def run(half_open: int, zk_connections: int, seconds: float) -> dict[str, Any]:
    """One fleetmate; a baseline round of writes, then the same under attack."""
    limit = raise_nofile(half_open + zk_connections + 2048)
    progress(f"open-file limit of this process: {limit}")
    with tempfile.TemporaryDirectory(prefix="bench-hostile-") as tmp:
        fm = Fleetmate(Path(tmp), env={"FLEETMATE_LOG_LEVEL": "warning"})
        with running(fm):
            zk = split(fm.zk)
            http = split(fm.url.removeprefix("http://"))
            progress("baseline: writes with no attack")
            baseline = measure_writes(fm.url, zk, seconds)
            progress(f"attack: {half_open} half-sent HTTP requests, {zk_connections} ZooKeeper connections")
            t0 = time.perf_counter()
            keeper = HalfOpenKeeper(http, half_open)
            opened_s = time.perf_counter() - t0
            keeper.start()
            flood = zk_flood(zk, zk_connections)
            refused = closed_by_server(flood, 3.0)
            progress(f"ZooKeeper connections closed at once: {refused} of {zk_connections}")
            try:
                attacked = measure_writes(fm.url, zk, seconds)
            finally:
                keeper.stopping.set()
                keeper.join(10)
                close_all(flood)
            return {
                "half_open": half_open,
                "zk_connections": zk_connections,
                "seconds": seconds,
                "half_open_opened_s": round(opened_s, 2),
                "half_open_reopened": keeper.reopened,
                "half_open_failed": keeper.failed,
                "zk_refused": refused,
                "baseline": baseline,
                "attacked": attacked,
            }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--half-open", type=int, default=5000, help="half-sent HTTP requests held open (5000)")
    parser.add_argument("--zk-connections", type=int, default=3000, help="ZooKeeper connections opened (3000)")
    parser.add_argument("--seconds", type=float, default=15.0, help="seconds of writes per round (15)")
    parser.add_argument("--scan-only", action="store_true", help="only the cost of the JSON depth check")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 500 half-open, 300 ZooKeeper, 5 s rounds")
    args = parser.parse_args()
    if args.quick:
        args.half_open, args.zk_connections, args.seconds = 500, 300, 5.0
    scan = scan_costs()
    print(f"{'JSON depth check (limit 64)':<40} {'bytes':>10} {'us':>10}")
    for name, cost in scan.items():
        print(f"{name:<40} {cost['bytes']:>10} {cost['us']:>10.2f}")
    if args.scan_only:
        return 0
    result = {**run(args.half_open, args.zk_connections, args.seconds), "json_depth_check": scan}
    print(f"{'round':<10} {'op':<14} {'n':>6} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    for name in ("baseline", "attacked"):
        for op in ("http_put_ms", "zk_set_ms"):
            s = result[name][op]
            print(f"{name:<10} {op:<14} {s['n']:>6} {s['p50']:>8.2f} {s['p99']:>8.2f} {s['max']:>8.2f}")
        print(f"{name:<10} errors: {result[name]['errors']}")
    print(f"ZooKeeper connections refused at once: {result['zk_refused']} of {result['zk_connections']}")
    path = write_result("hostile-quick" if args.quick else "hostile", result)
    print(f"wrote {path}")
    return 0 if result["attacked"]["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
