"""The lean paths: node get/set answer as the Litestar routes do (anything unusual goes to them); the watch socket."""

from __future__ import annotations

import json
import re
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
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 4000
