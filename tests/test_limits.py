"""What a hostile or broken client meets (docs/limits.md), and that everyone else keeps working:
body size, JSON depth, header read time, connections per address and the rate limit on the ZooKeeper port."""

from __future__ import annotations

import json
import random
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from bench.hostile import (
    WRITER,
    ZkClient,
    close_all,
    closed_by_server,
    connect,
    half_headers,
    http_client,
    raise_nofile,
    split,
    zk_flood,
)
from tests.harness import Fleetmate, run_cli, running, wait_for

NODES = "/api/v1/registry/nodes"
MiB = 1 << 20
# The server starts under the usual shell soft limit of 1,024 descriptors and must raise it itself.
UNDER_1024 = ["sh", "-c", 'ulimit -Sn 1024 && exec "$@"', "sh"]


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    if raise_nofile(10_000) < 10_000:
        pytest.skip("this process cannot open 10,000 descriptors (hard RLIMIT_NOFILE too low)")
    with running(Fleetmate(tmp_path_factory.mktemp("limits"), prefix=UNDER_1024)) as server:
        yield server


@pytest.fixture(scope="module")
def strict(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    env = {
        "FLEETMATE_HTTP_HEADER_READ_TIMEOUT": "1",
        "FLEETMATE_HTTP_BODY_READ_TIMEOUT": "1",
        "FLEETMATE_HTTP_MAX_BODY_BYTES": "65536",
        "FLEETMATE_HTTP_MAX_JSON_DEPTH": "8",
        "FLEETMATE_ZK_MAX_CLIENT_CNXNS": "5",
        "FLEETMATE_REGISTRY_RATE_LIMIT_PER_CLIENT": "20",
        "FLEETMATE_REGISTRY_SESSION_TIMEOUT_MAX_MS": "4000",
    }
    with running(Fleetmate(tmp_path_factory.mktemp("limits-strict"), env=env)) as server:
        yield server


def _http(fm: Fleetmate) -> tuple[str, int]:
    return split(fm.url.removeprefix("http://"))


def _refusal(answer: httpx.Response, status: int, code: str, key: str) -> dict[str, Any]:
    assert answer.status_code == status, answer.text[:300]
    assert answer.headers["content-type"].startswith("application/json")
    body: dict[str, Any] = answer.json()
    assert body["error"] == code
    assert key in body["message"]
    assert body["detail"]["key"] == key
    return body


def _no_sessions_from(fm: Fleetmate, address: str) -> None:
    """Wait until the server has let go of the sessions an earlier test held from address (`stat`
    lists them): under a small zk.max_client_cnxns they would count against the next test."""
    zk = split(fm.zk)
    wait_for(lambda: f" /{address}:" not in _four_letter_from(zk, "stat", WRITER), 10, f"no sessions from {address}")


def _open_files_limits(pid: int) -> tuple[int, int]:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            soft, hard = line.split()[3:5]
            return int(soft), int(hard)
    raise AssertionError("no open-file limit in /proc")


def _four_letter_from(addr: tuple[str, int], word: str, source: str) -> str:
    with connect(addr, source, timeout=5) as sock:
        sock.sendall(word.encode())
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks).decode()


# ---- request bodies -------------------------------------------------------------------------------


def test_a_20_mb_body_is_answered_413_on_both_paths(fm: Fleetmate) -> None:
    api = httpx.Client(base_url=fm.url, timeout=30)
    assert api.post(f"{NODES}/big", json={"data": "small"}).status_code == 201
    body = b'{"data": "' + b"x" * (20 * MiB) + b'"}'
    json_type = {"content-type": "application/json"}
    lean = api.put(f"{NODES}/big", content=body, headers=json_type)  # the lean path's route
    _refusal(lean, 413, "payload_too_large", "http.max_body_bytes")
    assert lean.json()["detail"]["limit"] == 8 * MiB
    assert lean.headers["connection"] == "close"  # its body may be unread: the client takes a new connection
    bridged = api.post(f"{NODES}/big-new", content=body, headers=json_type)  # Litestar's route
    _refusal(bridged, 413, "payload_too_large", "http.max_body_bytes")

    def pieces() -> Iterator[bytes]:  # no Content-Length: refused once past the limit while reading
        for i in range(0, len(body), MiB):
            yield body[i : i + MiB]

    chunked = api.put(f"{NODES}/big", content=pieces(), headers=json_type)
    _refusal(chunked, 413, "payload_too_large", "http.max_body_bytes")
    assert chunked.headers["connection"] == "close"
    chunked = api.post(f"{NODES}/big-new", content=pieces(), headers=json_type)
    _refusal(chunked, 413, "payload_too_large", "http.max_body_bytes")
    assert api.get(f"{NODES}/big").json()["data"] == "small"  # nothing changed
    assert api.get(f"{NODES}/big-new").status_code == 404
    one_mib = api.put(f"{NODES}/big", json={"data": "y" * MiB})  # the largest node data still fits
    assert one_mib.status_code == 200, one_mib.text


def test_a_body_over_a_configured_limit(strict: Fleetmate) -> None:
    api = httpx.Client(base_url=strict.url, timeout=10)
    over = api.post(f"{NODES}/limited", json={"data": "z" * 70_000})
    assert _refusal(over, 413, "payload_too_large", "http.max_body_bytes")["detail"]["limit"] == 65536
    assert api.post(f"{NODES}/limited", json={"data": "z" * 60_000}).status_code == 201


def _raw_answer(sock: Any) -> tuple[int, dict[str, Any]]:
    """Read one HTTP/1.1 answer with a Content-Length body: its status and JSON body."""
    sock.settimeout(10)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    fields = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    while len(body) < int(fields["content-length"]):
        body += sock.recv(65536)
    return int(lines[0].split()[1]), json.loads(body)


def test_a_body_that_trickles_is_answered_408(strict: Fleetmate) -> None:
    for method, path in (("PUT", f"{NODES}/slow"), ("POST", f"{NODES}/slow-new")):
        sock = connect(_http(strict), "127.0.0.1")
        try:
            head = (
                f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            )
            sock.sendall(head.encode() + b'{"data": ')
            t0 = time.monotonic()
            status, body = _raw_answer(sock)
            assert time.monotonic() - t0 < 5
        finally:
            sock.close()
        assert status == 408, body
        assert body["error"] == "request_timeout"
        assert body["detail"] == {"key": "http.body_read_timeout", "limit": 1.0}


def test_json_nested_100000_deep_is_answered_400(fm: Fleetmate) -> None:
    api = httpx.Client(base_url=fm.url, timeout=30)
    assert api.post(f"{NODES}/deep", json={"data": "kept"}).status_code == 201
    json_type = {"content-type": "application/json"}
    deep = b"[" * 100_000 + b"]" * 100_000
    in_object = b'{"data": ' + deep + b"}"
    for method, path, body in (
        ("POST", f"{NODES}/deep-new", deep),  # Litestar decodes it
        ("POST", f"{NODES}/deep-new", in_object),
        ("PUT", f"{NODES}/deep", in_object),  # the lean path's typed decoder refuses it, Litestar reads it
        ("POST", "/api/v1/registry/multi", in_object),
    ):
        answer = api.request(method, path, content=body, headers=json_type)
        refused = _refusal(answer, 400, "bad_request", "http.max_json_depth")
        assert "deeper than 64" in refused["message"]
        assert refused["detail"]["limit"] == 64
    chunked = api.post(f"{NODES}/deep-new", content=iter([in_object[:150_000], in_object[150_000:]]), headers=json_type)
    _refusal(chunked, 400, "bad_request", "http.max_json_depth")
    untyped = api.post(f"{NODES}/deep-new", content=deep, headers={"content-type": "text/plain"})
    _refusal(untyped, 400, "bad_request", "http.max_json_depth")
    assert api.get(f"{NODES}/deep").json()["data"] == "kept"
    # As deep as allowed: decoded, and refused for what it is (not a node body), not for its depth.
    within = b'{"data": ' + b"[" * 63 + b"]" * 63 + b"}"
    answer = api.post(f"{NODES}/deep-new", content=within, headers=json_type)
    assert answer.status_code == 400
    assert "max_json_depth" not in answer.text


def test_json_depth_bound_of_a_configured_limit(strict: Fleetmate) -> None:
    api = httpx.Client(base_url=strict.url, timeout=10)
    nested = {"data": "x", "acl": [[[[[[[[[["too deep"]]]]]]]]]]}
    _refusal(api.post(f"{NODES}/shallow", json=nested), 400, "bad_request", "http.max_json_depth")
    brackets_in_text = {"data": "[[[[[[[[[[{{{{{{{{{{ not structure"}
    assert api.post(f"{NODES}/shallow", json=brackets_in_text).status_code == 201


def _depth(value: Any) -> int:
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    return 0


def _random_json(rng: random.Random, depth: int) -> Any:
    if depth == 0 or rng.random() < 0.2:
        return rng.choice(['a"[b', "}{", 'q\\"[[', 1, None, "\\\\", "]", "é[", 2.5])
    if rng.random() < 0.5:
        return [_random_json(rng, depth - 1) for _ in range(rng.randint(0, 3))]
    return {f"k{i}[{{": _random_json(rng, depth - 1) for i in range(rng.randint(0, 3))}


def test_the_depth_scan_agrees_with_the_nesting_of_decoded_documents() -> None:
    from app.web.limits import json_depth_exceeds  # here: the module's other tests run on older trees too

    rng = random.Random(18)
    for _ in range(3000):
        value = _random_json(rng, rng.randint(0, 12))
        text = json.dumps(value, ensure_ascii=rng.random() < 0.5).encode()
        for limit in (1, 2, 3, 5, 8):
            assert json_depth_exceeds(text, limit) == (_depth(value) > limit), (text, limit)
    assert json_depth_exceeds(b"[" * 100_000, 64)  # unbalanced: as deep as the decoder would recurse
    assert not json_depth_exceeds(b"[" * 64 + b"]" * 64, 64)
    assert json_depth_exceeds(b"[" * 65 + b"]" * 65, 64)
    chains = b"[" + b",".join([b"[" * 9 + b"]" * 9] * 200) + b"]"  # deep and narrow: the running sum
    assert not json_depth_exceeds(chains, 10)
    assert json_depth_exceeds(chains, 9)


# ---- connections ----------------------------------------------------------------------------------


def test_1500_half_sent_headers_leave_the_api_answering(fm: Fleetmate) -> None:
    held = half_headers(_http(fm), 1500)
    try:
        t0 = time.monotonic()
        health = httpx.get(fm.url + "/api/v1/health", timeout=5)
        assert health.status_code == 200
        written = httpx.post(fm.url + f"{NODES}/after-half-headers", json={"data": "ok"}, timeout=5)
        assert written.status_code == 201, written.text
        assert time.monotonic() - t0 < 5
    finally:
        close_all(held)
    # It started under a soft limit of 1,024 descriptors; now its soft limit is the hard one.
    assert fm.proc is not None
    soft, hard = _open_files_limits(fm.proc.pid)
    assert soft == hard
    assert fm.logged("open-file limit")[0]["limit"] == soft


def test_a_half_sent_header_is_closed_after_the_header_read_timeout(strict: Fleetmate) -> None:
    half = half_headers(_http(strict), 5)
    silent = [connect(_http(strict), "127.0.0.1") for _ in range(3)]
    try:
        t0 = time.monotonic()
        assert closed_by_server(half + silent, 6.0) == 8
        assert time.monotonic() - t0 < 6.0
    finally:
        close_all(half + silent)


def test_3000_zookeeper_connections_from_one_address_are_refused_past_the_limit(fm: Fleetmate) -> None:
    zk = split(fm.zk)
    flood = zk_flood(zk, 3000, handshake=False)
    try:
        refused = closed_by_server(flood, 3.0)
        assert 0 < len(flood) - refused <= 60, f"{refused} of 3000 closed at once; 60 may stay"
        other = ZkClient(zk, WRITER)  # another address is served as before
        try:
            assert other.create("/from-another-address", b"x") == 0
            assert other.set_data("/from-another-address", b"y") == 0
        finally:
            other.close()
        assert "maxClientCnxns=60\n" in _four_letter_from(zk, "conf", WRITER)
    finally:
        close_all(flood)
    lines = fm.logged("too many connections from one address; closed")
    assert lines
    refused = [
        line
        for line in fm.get("/metrics").text.splitlines()
        if line.startswith("fleetmate_zk_connections_refused_total ")
    ]
    assert refused
    assert float(refused[0].split()[1]) >= 2900
    assert (lines[0]["address"], lines[0]["max_client_cnxns"]) == ("127.0.0.1", 60)
    assert len(lines) <= 3, "refusals are logged at most every few seconds per address"
    # Once the flood has gone, the address is served again.
    wait_for(lambda: _four_letter_from(zk, "ruok", "127.0.0.1") == "imok", 10, "127.0.0.1 served again")


def test_max_client_cnxns_as_configured(strict: Fleetmate) -> None:
    _no_sessions_from(strict, "127.0.0.1")
    zk = split(strict.zk)
    held = [ZkClient(zk, "127.0.0.1") for _ in range(5)]
    try:
        sixth = zk_flood(zk, 1)
        assert closed_by_server(sixth, 3.0) == 1
        close_all(sixth)
        assert "maxClientCnxns=5\n" in _four_letter_from(zk, "conf", WRITER)
    finally:
        for client in held:
            client.close()


def test_silent_zookeeper_connections_are_closed(strict: Fleetmate) -> None:
    _no_sessions_from(strict, "127.0.0.1")
    zk = split(strict.zk)
    half = connect(zk, "127.0.0.1")
    half.sendall(struct.pack(">i", 44) + bytes(10))  # a session request cut short
    silent = ZkClient(zk, "127.0.0.1")  # a session (4 s timeout here), then nothing, not even pings
    t0 = time.monotonic()
    try:
        assert closed_by_server([silent.sock], 12.0) == 1, "the session expired: its connection is closed"
        assert 3.5 < time.monotonic() - t0 < 12.0
        assert closed_by_server([half], 12.0) == 1, "the handshake must arrive within 10 s"
        assert time.monotonic() - t0 < 13.0
    finally:
        half.close()
        silent.close()


def test_hostile_clients_from_one_address_leave_another_writing(fm: Fleetmate) -> None:
    """5,000 half-sent HTTP requests and 3,000 ZooKeeper connections from 127.0.0.1; 127.0.0.2 writes.
    The latency bound is measured by bench/hostile.py; here every write must succeed promptly."""
    half = half_headers(_http(fm), 5000)
    flood: list[Any] = []
    try:
        flood = zk_flood(split(fm.zk), 3000)
        closed_by_server(flood, 2.0)
        with http_client(fm.url, timeout=5) as api:
            assert api.get("/api/v1/health").status_code == 200
            assert api.post(f"{NODES}/under-attack", json={"data": "0"}).status_code == 201
            client = ZkClient(split(fm.zk), WRITER, timeout=5)
            try:
                assert client.create("/under-attack-zk") == 0
                took = []
                for i in range(100):
                    t0 = time.perf_counter()
                    assert api.put(f"{NODES}/under-attack", json={"data": str(i)}).status_code == 200
                    assert client.set_data("/under-attack-zk", str(i).encode()) == 0
                    took.append(time.perf_counter() - t0)
            finally:
                client.close()
        assert max(took) < 5.0
        assert httpx.get(f"{fm.url}{NODES}/under-attack", timeout=5).json()["data"] == "99"
    finally:
        close_all(half)
        close_all(flood)


# ---- the rate limit on the ZooKeeper port ---------------------------------------------------------


def test_the_rate_limit_slows_a_zookeeper_client_without_failing_it(strict: Fleetmate) -> None:
    _no_sessions_from(strict, "127.0.0.1")
    zk = split(strict.zk)
    fast = ZkClient(zk, "127.0.0.1")
    try:
        assert fast.create("/rated") in (0, -110)
        t0 = time.monotonic()
        codes = [fast.set_data("/rated", str(i).encode()) for i in range(60)]
        took = time.monotonic() - t0
    finally:
        fast.close()
    assert codes == [0] * 60  # every request answered, none refused
    assert took >= 1.5, f"60 requests at 20/s (a burst of 20) took {took:.2f}s"
    # The budget is the address's, shared with its HTTP requests (no token): spent, most of ten
    # HTTP requests get 429, where a budget of its own (a burst of 20) would have admitted all ten.
    with httpx.Client(base_url=strict.url, timeout=5) as api:
        statuses = [api.get(f"{NODES}/rated").status_code for _ in range(10)]
    assert statuses.count(429) >= 5, statuses
    other = ZkClient(zk, WRITER)  # another address has its own budget
    try:
        t0 = time.monotonic()
        assert [other.set_data("/rated", b"o") for _ in range(10)] == [0] * 10
        assert time.monotonic() - t0 < 1.0
    finally:
        other.close()


# ---- where the limits show ------------------------------------------------------------------------


def test_config_show_lists_the_limits(tmp_path: Path) -> None:
    shown = run_cli(["config", "show"], env={"FLEETMATE_DATA_DIR": str(tmp_path)}, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    for line in (
        "max_body_bytes = 8388608",
        "max_json_depth = 64",
        "header_read_timeout = 10.0",
        "max_connections = 10000",
        "max_client_cnxns = 60",
    ):
        assert line in shown.stdout


def test_50_websocket_watchers_that_never_read_leave_writes_alone_and_memory_bounded(fm: Fleetmate) -> None:
    """Finding (3e4b762, kept): 50 watchers that never read, 3,000 writes of 1 KB: +25 MiB, writes unaffected."""
    import psutil
    from websockets.sync.client import connect as ws_connect

    from tests.test_fastpath import _raw_ws

    assert fm.proc is not None
    port = _http(fm)[1]
    with httpx.Client(base_url=fm.url, timeout=10) as http:
        assert http.post("/api/v1/registry/nodes/slow-watchers", json={"data": ""}).status_code == 201
        process = psutil.Process(fm.proc.pid)
        before = process.memory_info().rss
        socks = [_raw_ws(port, "path=/slow-watchers&recursive=true", "unused") for _ in range(50)]
        try:
            data = "x" * 1024
            for i in range(3000):
                answer = http.post(f"/api/v1/registry/nodes/slow-watchers/n{i}", json={"data": data})
                assert answer.status_code == 201, answer.text
            grown = process.memory_info().rss - before
            # Each event is encoded once and shared by every watcher's queue: 50 copies would be ~200 MiB.
            assert grown < 100 << 20, f"grew {grown >> 20} MiB"
            # A watcher that reads gets the current state at once while the 50 still sit on theirs.
            with ws_connect(f"ws://127.0.0.1:{port}/api/v1/watch?path=/slow-watchers/n2999") as ws:
                assert json.loads(ws.recv(timeout=5))["type"] == "ready"
            assert len(http.get("/api/v1/registry/children/slow-watchers").json()["children"]) == 3000
        finally:
            for sock in socks:
                sock.close()
