"""The lean paths: node get/set answer as the Litestar routes do (anything unusual goes to them); the watch socket."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.sync.client import connect

from tests.harness import Fleetmate, running

READ = "read-token-fast-1"
ADMIN = "admin-token-fast-2"
NODES = "/api/v1/registry/nodes"


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("fastpath")
    with running(Fleetmate(tmp, env={"FLEETMATE_AUTH_TOKENS": f"read:{READ},admin:{ADMIN}"})) as server:
        yield server


def _client(fm: Fleetmate, token: str | None = ADMIN) -> httpx.Client:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=fm.url, headers=headers, timeout=10)


def _fast_hits(fm: Fleetmate) -> float:
    match = re.search(r"^fleetmate_http_fast_path_total ([0-9.e+]+)$", fm.get("/metrics").text, re.M)
    assert match
    return float(match.group(1))


def test_reads_match_the_framework_route(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/fp", json={"data": "héllo wörld"}).status_code == 201
    assert api.post(f"{NODES}/fp/bin", json={"data": "AAEC/w==", "encoding": "base64"}).status_code == 201
    for path in ("/fp", "/fp/bin"):
        before = _fast_hits(fm)
        fast = api.get(f"{NODES}{path}")
        assert _fast_hits(fm) == before + 1
        # An extra parameter the lean path does not handle sends the request to Litestar.
        framework = api.get(f"{NODES}{path}", params={"encoding": "base64" if path.endswith("bin") else "utf-8"})
        assert _fast_hits(fm) == before + 1
        assert fast.status_code == framework.status_code == 200
        assert fast.json() == framework.json()
        assert fast.headers["content-type"] == framework.headers["content-type"] == "application/json"
        assert api.get(f"{NODES}{path}", params={"serializable": "true"}).json() == fast.json()
    # A missing node: the framework renders the 404.
    missing = api.get(f"{NODES}/fp/none")
    assert missing.status_code == 404
    assert missing.json()["error"] == "NoNode"


def test_writes_match_the_framework_route(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/fw", json={"data": "0"}).status_code == 201
    before = _fast_hits(fm)
    fast = api.put(f"{NODES}/fw", json={"data": "1"})
    assert _fast_hits(fm) == before + 1
    framework = api.put(f"{NODES}/fw", params={"via": "framework"}, json={"data": "2"})
    assert _fast_hits(fm) == before + 1
    assert fast.status_code == framework.status_code == 200
    assert fast.json()["stat"]["version"] == 1
    assert framework.json()["stat"]["version"] == 2
    assert set(fast.json()) == set(framework.json()) == {"path", "stat"}
    # Errors raised by the service: the same status and body on both paths.
    for body, path in (({"data": "x", "version": 0}, "/fw"), ({"data": "x"}, "/fw/none")):
        a = api.put(f"{NODES}{path}", json=body)
        b = api.put(f"{NODES}{path}", params={"via": "framework"}, json=body)
        assert a.status_code == b.status_code
        assert a.status_code in (404, 412)
        assert a.json() == b.json()
    assert api.get(f"{NODES}/fw").json()["data"] == "2"


def test_bad_bodies_go_to_the_framework_and_change_nothing(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/fb", json={"data": "keep"}).status_code == 201
    for raw in (b"not json", b'{"data": 5}', b'{"data": "x", "surprise": 1}', b'{"data": "x", "version": -2}'):
        r = api.put(f"{NODES}/fb", content=raw, headers={"Content-Type": "application/json"})
        assert r.status_code == 400, raw
        assert r.json()["error"] == "bad_request"
    bad_b64 = api.put(f"{NODES}/fb", json={"data": "!!", "encoding": "base64"})
    assert bad_b64.status_code == 400
    node = api.get(f"{NODES}/fb").json()
    assert node["data"] == "keep"
    assert node["stat"]["version"] == 0


def test_tokens_are_checked_on_the_lean_path(fm: Fleetmate) -> None:
    assert _client(fm).post(f"{NODES}/ft", json={"data": "t"}).status_code == 201
    assert _client(fm, READ).get(f"{NODES}/ft").status_code == 200
    refused = _client(fm, READ).put(f"{NODES}/ft", json={"data": "no"})
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    for token in (None, "wrong-token-123"):
        assert _client(fm, token).get(f"{NODES}/ft").status_code == 401
        assert _client(fm, token).put(f"{NODES}/ft", json={"data": "no"}).status_code == 401
    assert _client(fm).get(f"{NODES}/ft").json()["data"] == "t"


def test_both_paths_share_one_route_label(fm: Fleetmate) -> None:
    _client(fm).get(f"{NODES}/fp")
    text = fm.get("/metrics").text
    routes = set(re.findall(r'fleetmate_http_requests_total\{method="GET",route="([^"]+)"', text))
    assert "/api/v1/registry/nodes/{path}" in routes
    assert not any("path:path" in r for r in routes)


def _ws(fm: Fleetmate, query: str, token: str | None) -> Any:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return connect(
        fm.url.replace("http", "ws", 1) + "/api/v1/watch?" + query, open_timeout=5, additional_headers=headers
    )


def test_watch_socket_checks_tokens(fm: Fleetmate) -> None:
    for token in (None, "wrong-token-123"):
        with pytest.raises(InvalidStatus) as refused:
            _ws(fm, "path=/", token)
        assert refused.value.response.status_code == 403
    for token in (READ, ADMIN):
        with _ws(fm, "path=/", token) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "ready"


@pytest.mark.parametrize(
    ("query", "message"),
    [
        ("path=relative", "path"),
        ("path=/&since=-1", "since must be >= 0"),
        ("path=/&since=abc", "since must be an integer"),
        ("path=/&recursive=maybe", "recursive must be true or false"),
        ("path=/&once=true&kind=everything", "kind must be one of"),
        ("path=/&colour=red", "unknown parameter(s): colour"),
    ],
)
def test_watch_socket_bad_queries_get_a_clear_error(fm: Fleetmate, query: str, message: str) -> None:
    with _ws(fm, query, READ) as ws:
        error = json.loads(ws.recv(timeout=5))
        assert error["type"] == "error"
        assert error["error"] == "BadArguments"
        assert message in error["message"]
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=5)
        assert closed.value.rcvd is not None  # a close frame (RSGI carries no close code)


def _raw_ws(port: int, query: str, token: str) -> Any:
    """A WebSocket client on a plain socket with a tiny receive buffer, which reads only when told."""
    import base64
    import os
    import socket

    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(
        (
            f"GET /api/v1/watch?{query} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {token}\r\n\r\n"
        ).encode()
    )
    head = b""
    while b"\r\n\r\n" not in head:
        head += sock.recv(1)
    assert head.startswith(b"HTTP/1.1 101"), head
    return sock


def _parse(buf: bytes) -> list[tuple[int, bytes]]:
    """The complete frames in buf: (opcode, payload); server frames are not masked."""
    frames, i = [], 0
    while i + 2 <= len(buf):
        opcode, length, at = buf[i] & 0x0F, buf[i + 1] & 0x7F, i + 2
        if length == 126:
            length, at = int.from_bytes(buf[at : at + 2]), at + 2
        elif length == 127:
            length, at = int.from_bytes(buf[at : at + 8]), at + 8
        if at + length > len(buf):
            break
        frames.append((opcode, buf[at : at + length]))
        i = at + length
    return frames


def _frames(sock: Any) -> list[tuple[int, bytes]]:
    """Every frame up to the server's close frame (the client never answers it) or the end of the stream."""
    sock.settimeout(30)
    buf = b""
    while True:
        chunk = sock.recv(1 << 16)
        if not chunk:
            return _parse(buf)
        buf += chunk
        frames = _parse(buf)
        if frames and frames[-1][0] == 8:
            return frames


def test_a_watcher_that_stops_reading_is_cut_off_after_its_pending_limit(tmp_path: Path) -> None:
    env = {"FLEETMATE_AUTH_TOKENS": f"admin:{ADMIN}", "FLEETMATE_REGISTRY_WATCH_MAX_PENDING": "20"}
    with running(Fleetmate(tmp_path, env=env)) as server:
        path = "/" + "s" * 3900  # ~4 KB per event frame fills the socket buffers quickly
        client = _client(server)
        assert client.post(f"{NODES}{path}", json={"data": ""}).status_code == 201
        port = int(server.url.rsplit(":", 1)[1])
        sock = _raw_ws(port, f"path={path}", ADMIN)
        sets, per_multi = 0, 100
        for _ in range(40):
            ops = [{"op": "set", "path": path, "data": str(i)} for i in range(per_multi)]
            assert client.post("/api/v1/registry/multi", json={"ops": ops}).status_code == 200
            sets += per_multi
        frames = _frames(sock)
        sock.close()
        texts = [json.loads(payload) for opcode, payload in frames if opcode == 1]
        assert texts[0]["type"] == "ready"
        assert texts[-1]["type"] == "error", texts[-1]
        assert texts[-1]["error"] == "slow_consumer", texts[-1]
        assert "resume with since" in texts[-1]["message"]
        versions = [t["version"] for t in texts[1:-1]]
        assert versions == list(range(1, len(versions) + 1)), "events in order, none missing before the cut"
        assert len(versions) < sets, "the watcher was cut before the last event"
        assert frames[-1][0] == 8  # then a close frame
        # The writes all landed, and a new watch works.
        assert client.get(f"{NODES}{path}").json()["stat"]["version"] == sets
        with _ws(server, f"path={path}", ADMIN) as ws:
            assert json.loads(ws.recv(timeout=5))["type"] == "ready"


def test_kv_gets_and_puts_match_the_framework_routes(fm: Fleetmate) -> None:
    """MatrixKV's /set and /get and /api/v1/kv/put and /get on the lean path, with an extra parameter on Litestar."""
    api = _client(fm)

    def put(key: str, value: str, **params: str) -> httpx.Response:
        return api.post("/api/v1/kv/put", params=params, json={"key": key, "value": value})

    for _ in range(100):  # the store is placed a moment after the replica is ready
        if put("fk/a", "1").status_code == 200:
            break
        time.sleep(0.1)
    before = _fast_hits(fm)
    fast = put("fk/a", "2")
    assert _fast_hits(fm) == before + 1
    framework = put("fk/a", "3", via="framework")
    assert _fast_hits(fm) == before + 1
    assert fast.status_code == framework.status_code == 200
    assert set(fast.json()) == set(framework.json())
    assert framework.json()["revision"] > fast.json()["revision"]
    for params in ({"key": "fk/a"}, {"key": "fk/a", "serializable": "true"}, {"key": "fk/none"}, {"key": ""}):
        a = api.get("/api/v1/kv/get", params=params)
        b = api.get("/api/v1/kv/get", params={**params, "via": "framework"})
        assert a.status_code in (200, 400, 404)
        assert (a.status_code, a.json()) == (b.status_code, b.json())
    assert _fast_hits(fm) == before + 5
    mk = api.post("/set", json={"key": "fk/m", "value": "v"})
    assert mk.json() == api.post("/set", params={"via": "framework"}, json={"key": "fk/m", "value": "v"}).json()
    assert mk.json() == {"key": "fk/m", "error": ""}
    assert api.get("/get", params={"key": "fk/m"}).json() == {"key": "fk/m", "value": "v", "error": ""}
    for raw in (b"not json", b'{"key": 5}', b""):
        a = api.post("/set", content=raw)
        b = api.post("/set", params={"via": "framework"}, content=raw)
        assert (a.status_code, a.json()) == (b.status_code, b.json())
        assert a.json()["error"]
    refused = _client(fm, READ).post("/api/v1/kv/put", json={"key": "fk/a", "value": "no"})
    assert refused.status_code == 403
    assert api.get("/api/v1/kv/get", params={"key": "fk/a"}).json()["value"] == "3"
    routes = set(
        re.findall(r'fleetmate_http_requests_total\{method="(?:GET|POST)",route="([^"]+)"', fm.get("/metrics").text)
    )
    assert {"/api/v1/kv/put", "/api/v1/kv/get", "/set", "/get"} <= routes
