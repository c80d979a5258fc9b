"""Hostile input against a running server: thousands of requests generated from the OpenAPI document,
ZooKeeper frames mutated from recorded kazoo requests, and random WebSocket messages. No 5xx, the
server stays up, and a canary write afterwards answers within a second."""

from __future__ import annotations

import json
import socket
import struct
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kazoo.client import KazooClient
from kazoo.protocol import serialization as ser
from kazoo.security import OPEN_ACL_UNSAFE, make_digest_acl
from websockets.sync.client import connect

from tests.harness import Fleetmate, running
from tests.harness.zkwire import WireClient, split_addr

EXAMPLES_PER_OPERATION = 60
# Operations that reach outside fleetmate (an HA cluster's database, an agent) are fuzzed too, but
# their generated addresses must not make every example wait for a connect timeout.
ENV = {
    "FLEETMATE_REGISTRY_SESSION_TIMEOUT_MIN_MS": "1000",
    "FLEETMATE_HA_CONNECT_TIMEOUT": "0.5",
}


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    with running(Fleetmate(tmp_path_factory.mktemp("fuzz"), env=ENV)) as server:
        yield server


def _canary(fm: Fleetmate) -> None:
    """A write from another client answers within a second: nothing the fuzzing did stopped the log."""
    started = time.monotonic()
    reply = httpx.put(f"{fm.url}/api/v1/registry/nodes/canary", json={"data": str(started)}, timeout=1)
    if reply.status_code == 404:
        reply = httpx.post(f"{fm.url}/api/v1/registry/nodes/canary", json={"data": "x"}, timeout=1)
    assert reply.status_code in (200, 201), reply.text
    assert time.monotonic() - started < 1.0
    assert fm.alive


def _schema(fm: Fleetmate) -> Any:
    raw = httpx.get(f"{fm.url}/schema/openapi.json", timeout=10).json()
    # Litestar documents {path:path} parameters as format "uri", which no generator can fit into a
    # URL path; generate znode-like paths instead (valid ones and ones the registry must refuse).
    for item in raw["paths"].values():
        for operation in item.values():
            for param in operation.get("parameters", []) if isinstance(operation, dict) else []:
                if param.get("in") == "path" and param.get("name") == "path":
                    param["schema"] = {"type": "string", "pattern": r"^[a-z0-9._%-]{1,12}(/[a-z0-9._-]{0,8}){0,3}$"}
    return schemathesis.openapi.from_dict(raw)


def test_generated_requests_from_the_openapi_document_never_get_a_5xx(fm: Fleetmate) -> None:
    schema = _schema(fm)
    failures: list[str] = []
    sent = 0
    for result in schema.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(operation.as_strategy())
        def run(case: Any) -> None:
            nonlocal sent
            sent += 1
            response = case.call(base_url=fm.url, timeout=15)
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} {case.query} {case.body!r}: {response.text[:200]}"
                )

        run()
    assert sent > 1000
    assert failures == [], "\n".join(failures[:20])
    _canary(fm)


def _recorded_requests() -> list[bytes]:
    """Request bodies (xid, op, record) as kazoo serializes them, for the operations it sends."""
    acl = list(OPEN_ACL_UNSAFE)
    requests: list[Any] = [
        ser.Create("/fz/a", b"data", acl, 0),
        ser.Create("/fz/s-", None, acl, 3),
        ser.Delete("/fz/a", -1),
        ser.Exists("/fz", True),
        ser.GetData("/fz", True),
        ser.SetData("/fz", b"v", 0),
        ser.GetACL("/fz"),
        ser.SetACL("/fz", acl, -1),
        ser.GetChildren("/fz", True),
        ser.GetChildren2("/fz", False),
        ser.Sync("/fz"),
        ser.CheckVersion("/fz", 0),
        ser.Transaction([ser.Create("/fz/t", b"", acl, 0), ser.Delete("/fz/t", -1)]),
        ser.Auth(0, "digest", "user:pass"),
        ser.PingInstance,
    ]
    out = []
    for xid, request in enumerate(requests, start=1):
        body = bytearray(struct.pack(">ii", xid, request.type))
        if request is not ser.PingInstance:
            body += request.serialize()
        out.append(bytes(body))
    # setWatches after a reconnect (kazoo builds it inside its connection code, not as a record).
    strings = struct.pack(">i", 1) + struct.pack(">i", 3) + b"/fz"
    out.append(struct.pack(">iiq", -8, 101, 0) + strings * 3)
    return out


RECORDED = _recorded_requests()


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    packet = bytearray(draw(st.sampled_from(RECORDED)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(("flip", "int", "cut", "insert")))
        at = draw(st.integers(0, max(0, len(packet) - 1)))
        if kind == "flip" and packet:
            packet[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "int" and len(packet) >= at + 4:
            value = draw(st.sampled_from((-1, -2, 0, 1, 2**31 - 1, -(2**31), 65536, 1 << 24)))
            packet[at : at + 4] = struct.pack(">i", value)
        elif kind == "cut":
            del packet[at:]
        else:
            packet[at:at] = draw(st.binary(min_size=1, max_size=16))
    return bytes(packet)


def test_mutated_zookeeper_frames_close_only_their_connection(tmp_path: Path) -> None:
    # A server of its own: the OpenAPI fuzzing may have set any ACL on the root (REST writes are
    # not bound by ZooKeeper ACLs), which would refuse this test's ZooKeeper creates.
    with running(Fleetmate(tmp_path, env=ENV)) as fm:
        _fuzz_zookeeper(fm)


def _fuzz_zookeeper(fm: Fleetmate) -> None:
    # The bystander's node: only it may write it (mutated frames are often valid writes, setACL on
    # the root included, which is ZooKeeper's behaviour for world:anyone; they cannot touch this).
    client = KazooClient(hosts=fm.zk, timeout=10, auth_data=[("digest", "owner:pw")])
    client.start(timeout=10)
    try:
        client.ensure_path("/fz")
        client.create("/mine", b"before", acl=[make_digest_acl("owner", "pw", all=True)])
        frames = 0

        @settings(max_examples=1500, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(_mutated(), st.booleans())
        def send(packet: bytes, lie_about_length: bool) -> None:
            nonlocal frames
            frames += 1
            wire = WireClient(fm.zk, timeout=2)
            try:
                size = len(packet) if not lie_about_length else len(packet) + 7
                wire.send_raw(struct.pack(">i", size) + packet)
                wire.sock.shutdown(socket.SHUT_WR)
                wire.sock.settimeout(2)
                while wire.sock.recv(65536):  # whatever the answer: a reply, an error, or closed
                    pass
            except OSError:
                pass
            finally:
                wire.sock.close()

        send()
        assert frames >= 1000
        # The session that sent nothing hostile never noticed, and nothing it owns changed.
        assert client.get("/mine")[0] == b"before"
        client.set("/mine", b"after")
        assert client.get("/mine")[0] == b"after"
    finally:
        client.stop()
        client.close()
    with socket.create_connection(split_addr(fm.zk), timeout=5) as sock:
        sock.sendall(b"ruok")
        assert sock.recv(16) == b"imok"
    _canary(fm)


def test_random_websocket_messages_get_errors_and_the_socket_goes_on(fm: Fleetmate) -> None:
    url = fm.url.replace("http://", "ws://") + "/api/v1/watch?path=/"
    json_values = st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
        max_leaves=12,
    )
    messages = st.one_of(
        st.text(max_size=200),
        json_values.map(json.dumps),
        st.fixed_dictionaries({"op": st.sampled_from(("keepalive", "watch", "")), "session_id": json_values}).map(
            json.dumps
        ),
    )
    with connect(url, open_timeout=5) as ws:
        assert json.loads(ws.recv(timeout=5))["type"] == "ready"
        sent = 0

        @settings(max_examples=600, deadline=None, database=None, suppress_health_check=list(HealthCheck))
        @given(messages)
        def send(message: str) -> None:
            nonlocal sent
            sent += 1
            ws.send(message)
            answer = json.loads(ws.recv(timeout=5))
            while answer.get("type") not in ("error", "keepalive"):  # a watch event may come between
                answer = json.loads(ws.recv(timeout=5))
            assert answer.get("type") == "error" or answer.get("type") == "keepalive"

        send()
        assert sent >= 500
    _canary(fm)


def test_a_body_that_is_not_what_the_schema_says_is_a_400_not_a_500(fm: Fleetmate, tmp_path: Path) -> None:
    shapes = [b"", b"{", b"[]", b"null", b'{"data": {"a": 1}}', b'{"data": "x", "version": "7"}', b"\xff\xfe"]
    for body in shapes:
        for method, url in (
            ("PUT", "/api/v1/registry/nodes/t"),
            ("POST", "/api/v1/registry/nodes/t"),
            ("POST", "/api/v1/registry/multi"),
            ("POST", "/api/v1/sessions"),
        ):
            reply = httpx.request(method, fm.url + url, content=body, headers={"content-type": "application/json"})
            assert reply.status_code < 500, (method, url, body, reply.text)
    _canary(fm)
