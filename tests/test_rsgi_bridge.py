"""Requests that go through the RSGI-to-ASGI bridge (app/web/rsgi.py) to Litestar, on a real server.

The lean path answers plain node gets and sets itself; everything else (other routes, odd bodies,
websockets other than the watch socket, refused handshakes) crosses the bridge, and must behave
as it did under an ASGI server.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from tests.harness import Fleetmate, running, wait_for

ADMIN = "admin-token-bridge-1"
NODES = "/api/v1/registry/nodes"


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("bridge")
    with running(Fleetmate(tmp, env={"FLEETMATE_AUTH_TOKENS": f"admin:{ADMIN}"})) as server:
        yield server


def _client(fm: Fleetmate) -> httpx.Client:
    return httpx.Client(base_url=fm.url, headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10)


def _left_requests(api: httpx.Client) -> float:
    """How many PUTs and multi POSTs the request figures have counted, whatever their status."""
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in api.get("/metrics").text.splitlines()
        if line.startswith("fleetmate_http_requests_total{")
        and ('method="PUT"' in line or 'route="/api/v1/registry/multi"' in line)
    )


def test_percent_encoded_paths_reach_the_same_node(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/with%20space", json={"data": "x"}).status_code == 201
    assert api.put(f"{NODES}/with%20space", json={"data": "y"}).status_code == 200  # lean path
    got = api.get(f"{NODES}/with space", params={"encoding": "utf-8"})  # bridged (extra parameter)
    assert got.status_code == 200
    assert (got.json()["path"], got.json()["data"]) == ("/with space", "y")


def test_a_chunked_body_and_a_large_body_arrive_whole(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/chunked", json={"data": ""}).status_code == 201
    payload = json.dumps({"data": "z" * 200_000}).encode()

    def pieces() -> Iterator[bytes]:
        for i in range(0, len(payload), 7_000):
            yield payload[i : i + 7_000]

    assert (
        api.put(f"{NODES}/chunked", content=pieces(), headers={"content-type": "application/json"}).status_code == 200
    )
    assert api.get(f"{NODES}/chunked").json()["data"] == "z" * 200_000
    created = api.post(f"{NODES}/large", json={"data": "q" * 500_000})  # bridged: Litestar reads the body
    assert created.status_code == 201, created.text
    assert len(api.get(f"{NODES}/large").json()["data"]) == 500_000


def test_a_body_the_lean_path_cannot_decode_reaches_litestar_whole(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/odd", json={"data": "kept"}).status_code == 201
    bad = api.put(f"{NODES}/odd", content=b'{"data": 12}', headers={"content-type": "application/json"})
    assert bad.status_code == 400
    assert "data" in bad.text
    assert api.get(f"{NODES}/odd").json()["data"] == "kept"


def test_headers_status_and_errors_cross_the_bridge(fm: Fleetmate) -> None:
    api = _client(fm)
    health = api.get("/api/v1/health")
    assert health.status_code == 200
    assert health.headers["content-type"].startswith("application/json")
    missing = api.get("/api/v1/no-such-route")
    assert missing.status_code == 404
    refused = httpx.get(f"{fm.url}/api/v1/registry/children/", timeout=10)  # no token
    assert refused.status_code == 401
    schema = api.get("/schema/openapi.json")
    assert schema.status_code == 200
    assert "/api/v1/registry/nodes/{path}" in schema.json()["paths"]


def test_a_framework_websocket_route_works_and_refuses_without_a_token(fm: Fleetmate) -> None:
    url = fm.url.replace("http://", "ws://") + "/api/v1/nodes/watch"
    with pytest.raises(InvalidStatus) as refused:
        connect(url, open_timeout=5)
    assert refused.value.response.status_code in (401, 403)
    with connect(url, open_timeout=5, additional_headers={"Authorization": f"Bearer {ADMIN}"}) as ws:
        first = json.loads(ws.recv(timeout=5))
        assert first["type"] == "ready"


def test_a_client_that_leaves_mid_body_changes_nothing_and_logs_no_error(fm: Fleetmate) -> None:
    api = _client(fm)
    assert api.post(f"{NODES}/left", json={"data": "before"}).status_code == 201
    port = int(fm.url.rsplit(":", 1)[1])
    errors_before = [line for line in fm.lines if line.get("level") in ("error", "critical")]
    counted_before = _left_requests(api)
    for path in (f"{NODES}/left", "/api/v1/registry/multi"):  # the lean path, then Litestar
        method = "PUT" if path.endswith("/left") else "POST"
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN}\r\n"
                "Content-Type: application/json\r\nContent-Length: 400\r\n\r\n".encode()
                + b'{"data": "af'
            )
            time.sleep(0.2)  # the server is reading the body when the client leaves (no answer to wait for)
    wait_for(lambda: _left_requests(api) >= counted_before + 2, 10, "both requests over and counted")
    assert api.get(f"{NODES}/left").json()["data"] == "before"
    errors_after = [line for line in fm.lines if line.get("level") in ("error", "critical")]
    assert errors_after == errors_before
    assert api.get("/api/v1/health").status_code == 200
