"""ZooKeeper's session promise: a client that falls silent keeps its ephemeral nodes for at least its
timeout after its last request, on ZooKeeper 3.8 and on fleetmate (leader or follower, ZooKeeper port
or REST/WebSocket keepalives), and a change of registry leader expires no live session."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import httpx
import pytest
from websockets.sync.client import connect

from bench.zkserver import ZooKeeper, zookeeper_classpath
from tests.harness import Fleetmate, NatsServer, ReplicaSet, running, wait_for
from tests.harness.zkwire import WireClient, pack_string

TIMEOUT_MS = 6000  # within ZooKeeper's default bounds (2 and 20 ticks of 2 s)
ACTIVE_S = 3.0  # the client is busy this long, a request every PACE_S, then silent
PACE_S = 0.25
MARGIN_S = 0.25  # the node must still be there this long before the timeout runs out
LEASE_TTL = 2.0
EXISTS = 3


def _env(nats_url: str = "") -> dict[str, str]:
    env = {"FLEETMATE_LEASE_TTL": str(LEASE_TTL), "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5"}
    if nats_url:
        env["FLEETMATE_NATS_URL"] = nats_url
    return env


@contextmanager
def _pair(tmp_path: Path, nats: NatsServer) -> Iterator[tuple[Fleetmate, Fleetmate]]:
    """Two replicas on one NATS: (leader, follower) once both name the same leader."""
    replicas = ReplicaSet(tmp_path, nats.url, names=("r1", "r2"), env=_env())
    try:
        replicas.start()
        leader = replicas.leader()
        follower = next(name for name in ("r1", "r2") if name != leader)
        yield replicas[leader], replicas[follower]
    finally:
        replicas.close()


@contextmanager
def _server(kind: str, tmp_path: Path) -> Iterator[str]:
    """host:port of the ZooKeeper port a client talks to, for each kind of server."""
    if kind == "zookeeper":
        classpath = zookeeper_classpath()
        if classpath is None:
            pytest.fail("Debian's zookeeper package and a JRE are needed (make test-deps installs them)")
        zk = ZooKeeper(classpath)
        zk.start()
        try:
            yield f"{zk.host}:{zk.port}"
        finally:
            zk.stop()
        return
    if kind == "fleetmate":
        with running(Fleetmate(tmp_path / "one", env=_env())) as fm:
            yield fm.zk
        return
    nats = NatsServer(tmp_path / "nats").start()
    try:
        with _pair(tmp_path, nats) as (_, follower):
            yield follower.zk
    finally:
        nats.stop()


def _exists(client: WireClient, path: str) -> bool:
    _, err, _ = client.request(EXISTS, pack_string(path) + b"\x00")
    return err == 0


def _busy_then_silent(activity: Callable[[], None]) -> float:
    """Run activity every PACE_S for ACTIVE_S; return the time its last call had returned."""
    end = time.monotonic() + ACTIVE_S
    while True:
        activity()
        last = time.monotonic()
        if last >= end:
            return last
        time.sleep(PACE_S)


def _holds_then_expires(present: Callable[[], bool], last: float, timeout_s: float) -> float:
    """The node is still there MARGIN_S before the timeout (counted from `last`) runs out, and goes
    after it; returns how long after `last` it was first seen gone."""
    check_at = last + timeout_s - MARGIN_S
    while time.monotonic() < check_at:
        assert present(), f"the node went {time.monotonic() - last:.2f} s after the last request"
        time.sleep(0.1)
    assert present(), f"the node went {time.monotonic() - last:.2f} s after the last request"
    wait_for(lambda: not present(), timeout_s * 2 + 5, "the silent session to expire")
    return time.monotonic() - last


@pytest.mark.parametrize("kind", ["zookeeper", "fleetmate", "fleetmate-follower"])
def test_silent_zookeeper_client_keeps_its_ephemeral_for_its_timeout(kind: str, tmp_path: Path) -> None:
    with _server(kind, tmp_path) as addr:
        silent = WireClient(addr, timeout_ms=TIMEOUT_MS)
        observer = WireClient(addr)
        try:
            assert silent.timeout_ms == TIMEOUT_MS
            assert silent.create("/paused", b"", flags=1)[0] == 0
            last = _busy_then_silent(lambda: _exists(silent, "/paused"))
            gone_after = _holds_then_expires(lambda: _exists(observer, "/paused"), last, TIMEOUT_MS / 1000)
            assert gone_after >= TIMEOUT_MS / 1000
        finally:
            silent.sock.close()
            observer.close()


@pytest.mark.parametrize("via", ["rest", "websocket"])
def test_silent_rest_session_keeps_its_ephemeral_for_its_timeout(via: str, tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    try:
        with _pair(tmp_path, nats) as (_, follower), httpx.Client(base_url=follower.url, timeout=10) as http:
            sid = http.post("/api/v1/sessions", json={"timeout_ms": TIMEOUT_MS}).json()["session_id"]
            made = http.post("/api/v1/registry/nodes/paused", json={"ephemeral": True, "session_id": sid})
            assert made.status_code == 201, made.text

            def present() -> bool:
                return http.get("/api/v1/registry/nodes/paused").status_code == 200

            if via == "rest":
                last = _busy_then_silent(
                    lambda: http.put(f"/api/v1/sessions/{sid}/keepalive").raise_for_status() and None
                )
                _holds_then_expires(present, last, TIMEOUT_MS / 1000)
                return
            ws_url = follower.url.replace("http://", "ws://") + "/api/v1/watch?path=/paused"
            with connect(ws_url) as ws:
                assert json.loads(ws.recv(timeout=5))["type"] == "ready"

                def keepalive() -> None:
                    ws.send(json.dumps({"op": "keepalive", "session_id": sid}))
                    while json.loads(ws.recv(timeout=5)).get("type") != "keepalive":
                        pass

                last = _busy_then_silent(keepalive)
                _holds_then_expires(present, last, TIMEOUT_MS / 1000)
    finally:
        nats.stop()


def test_leader_kill_expires_no_live_session_and_grants_a_full_timeout(tmp_path: Path) -> None:
    nats = NatsServer(tmp_path / "nats").start()
    try:
        with ExitStack() as stack:
            leader, follower = stack.enter_context(_pair(tmp_path, nats))
            client = WireClient(follower.zk, timeout_ms=TIMEOUT_MS)
            stack.callback(client.sock.close)
            observer = WireClient(follower.zk)
            stack.callback(observer.close)
            assert client.create("/survivor", b"", flags=1)[0] == 0
            # Busy through the kill of the leader and until the follower has taken the lease.
            _busy_then_silent(lambda: _exists(client, "/survivor"))
            leader.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
            leader.proc.wait()  # type: ignore[union-attr]

            def took_over() -> bool:
                assert _exists(client, "/survivor"), "the live session's node went when the leader died"
                view = httpx.get(follower.url + "/api/v1/cluster", timeout=2).json()
                return bool(view.get("role") == "leader")

            wait_for(took_over, 30, "the follower to take the lease", interval=PACE_S)
            # Then silent: the new leader still counts the timeout from the last request.
            last = _busy_then_silent(lambda: _exists(client, "/survivor"))
            _holds_then_expires(lambda: _exists(observer, "/survivor"), last, TIMEOUT_MS / 1000)
    finally:
        nats.stop()


def test_keepalive_request_refuses_what_the_bus_cannot_mean() -> None:
    import msgspec

    from app.services.registry.messages import KeepaliveRequest

    for bad in ({"session_id": -1}, {"session_id": 2**64}, {"session_id": 1, "idle_ms": -5}, {"idle_ms": 1}):
        with pytest.raises(msgspec.ValidationError):
            msgspec.json.decode(json.dumps(bad), type=KeepaliveRequest)
    assert msgspec.json.decode(b'{"session_id": 7}', type=KeepaliveRequest).idle_ms == 0


def test_keeper_counts_the_timeout_from_the_activity_a_keepalive_reports() -> None:
    from app.services.registry.messages import OpenSession
    from app.services.registry.sessions import SessionKeeper
    from app.services.registry.state import RegistryState

    state = RegistryState()
    state.apply(OpenSession(7, 6000, 0, b""))
    now = [100.0]

    async def append(cmd: object) -> object:
        raise AssertionError("nothing is appended here")

    keeper = SessionKeeper(state, append, "t", clock=lambda: now[0])
    assert keeper.touch(7, idle_s=2.0) == 6000  # active at 98.0
    now[0] = 103.9
    assert keeper.overdue() == []
    now[0] = 104.1
    assert keeper.overdue() == [7]  # 6 s after the activity, not after the keepalive arrived
    keeper.touch(7, idle_s=0.0)  # active at 104.1
    keeper.touch(7, idle_s=3.0)  # a late forward of older activity moves nothing back
    now[0] = 110.0
    assert keeper.overdue() == []
    assert keeper.touch(8) is None
