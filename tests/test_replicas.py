"""Two replicas on one NATS: one lease holder, writes through either, hand-over, and fencing of a paused leader."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.harness import Fleetmate, NatsServer, running, wait_for

LEASE_TTL = 2.0


def _env(nats: NatsServer, node_id: str) -> dict[str, str]:
    return {
        "FLEETMATE_NATS_URL": nats.url,
        "FLEETMATE_NODE_ID": node_id,
        "FLEETMATE_LEASE_TTL": str(LEASE_TTL),
        "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
        "FLEETMATE_REGISTRY_SESSION_TIMEOUT_MIN_MS": "1000",
    }


@pytest.fixture
def pair(tmp_path: Path, nats_server: NatsServer) -> Iterator[dict[str, Fleetmate]]:
    with ExitStack() as stack:
        out = {}
        for node_id in ("r1", "r2"):
            fm = Fleetmate(tmp_path / node_id, env=_env(nats_server, node_id))
            out[node_id] = stack.enter_context(running(fm))
        yield out


def cluster(fm: Fleetmate) -> dict[str, Any]:
    body: dict[str, Any] = fm.get("/api/v1/cluster").json()
    return body


def leader_of(pair: dict[str, Fleetmate]) -> tuple[Fleetmate, Fleetmate]:
    def settled() -> tuple[Fleetmate, Fleetmate] | None:
        views = {name: cluster(fm) for name, fm in pair.items()}
        leaders = [name for name, v in views.items() if v["role"] == "leader"]
        if len(leaders) != 1 or any(v["leader"]["node_id"] != leaders[0] for v in views.values()):
            return None
        (follower,) = [name for name in pair if name != leaders[0]]
        return pair[leaders[0]], pair[follower]

    result: tuple[Fleetmate, Fleetmate] = wait_for(settled, 10, "exactly one leader that both replicas name")
    return result


def test_one_leader_writes_anywhere_reads_everywhere(pair: dict[str, Fleetmate]) -> None:
    leader, follower = leader_of(pair)
    assert {r["node_id"] for r in cluster(leader)["replicas"]} == {"r1", "r2"}
    f, lead = httpx.Client(base_url=follower.url), httpx.Client(base_url=leader.url)
    assert f.post("/api/v1/registry/nodes/shared", json={"data": "from-follower"}).status_code == 201
    # Linearizable read on the other replica sees the write at once.
    assert lead.get("/api/v1/registry/nodes/shared").json()["data"] == "from-follower"
    assert lead.put("/api/v1/registry/nodes/shared", json={"data": "from-leader"}).status_code == 200
    assert f.get("/api/v1/registry/nodes/shared").json()["data"] == "from-leader"
    # A session opened through the follower is kept alive through it (keepalives go to the leader).
    sid = f.post("/api/v1/sessions", json={"timeout_ms": 1000}).json()["session_id"]
    f.post("/api/v1/registry/nodes/shared/eph", json={"ephemeral": True, "session_id": sid})
    for _ in range(8):
        assert f.put(f"/api/v1/sessions/{sid}/keepalive").status_code == 200
        time.sleep(0.25)
    assert lead.get("/api/v1/registry/nodes/shared/eph").status_code == 200
    assert f.get("/api/v1/registry").json()["revision"] == lead.get("/api/v1/registry").json()["revision"]

    def caught_up() -> bool:
        rows = cluster(follower)["replicas"]
        return len(rows) == 2 and all(r["lag"] == 0 for r in rows) and len({r["revision"] for r in rows}) == 1

    wait_for(caught_up, 10, "both replicas announced at the same applied revision, lag 0")


def test_leader_killed_the_other_takes_over_and_sessions_survive(pair: dict[str, Fleetmate]) -> None:
    leader, follower = leader_of(pair)
    f = httpx.Client(base_url=follower.url)
    term = f.get("/api/v1/registry").json()["term"]
    sid = f.post("/api/v1/sessions", json={"timeout_ms": 3000}).json()["session_id"]
    f.post("/api/v1/registry/nodes/live", json={"ephemeral": True, "session_id": sid})

    killed_at = time.monotonic()
    leader.stop(signal.SIGKILL)

    def took_over() -> bool:
        f.put(f"/api/v1/sessions/{sid}/keepalive")  # the client keeps its session alive meanwhile
        return bool(cluster(follower)["role"] == "leader")

    wait_for(took_over, LEASE_TTL + 5, "the follower to take the lease")
    handover = time.monotonic() - killed_at
    assert handover < LEASE_TTL + 2.5
    status = f.get("/api/v1/registry").json()
    assert status["term"] > term
    assert status["leader"] == follower.env["FLEETMATE_NODE_ID"]
    # The new leader gave the session a fresh timeout: with keepalives it lives on.
    for _ in range(8):
        assert f.put(f"/api/v1/sessions/{sid}/keepalive").status_code == 200
        time.sleep(0.4)
    assert f.get("/api/v1/registry/nodes/live").status_code == 200
    # Without them it expires under the new leader.
    wait_for(lambda: f.get("/api/v1/registry/nodes/live").status_code == 404, 10, "expiry by the new leader")


def test_paused_leader_is_fenced(pair: dict[str, Fleetmate]) -> None:
    leader, follower = leader_of(pair)
    f = httpx.Client(base_url=follower.url)
    sid = f.post("/api/v1/sessions", json={"timeout_ms": 1000}).json()["session_id"]
    f.post("/api/v1/registry/nodes/fenced", json={"ephemeral": True, "session_id": sid})
    assert leader.proc is not None
    os.kill(leader.proc.pid, signal.SIGSTOP)
    try:
        # While the old leader sleeps, the follower takes over and the client keeps its session.
        try:
            wait_for(
                lambda: (
                    f.put(f"/api/v1/sessions/{sid}/keepalive").status_code == 200
                    and cluster(follower)["role"] == "leader"
                ),
                LEASE_TTL + 10,
                "the follower to lead",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\nfollower log tail: {follower.raw[-15:]}") from None
    finally:
        os.kill(leader.proc.pid, signal.SIGCONT)
    # The old leader wakes up with stale keepalive times: whatever it tries to expire is refused.
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert f.put(f"/api/v1/sessions/{sid}/keepalive").status_code == 200
        time.sleep(0.2)
    assert f.get("/api/v1/registry/nodes/fenced").status_code == 200
    assert cluster(follower)["role"] == "leader"
    wait_for(lambda: cluster(leader)["role"] == "follower", 5, "the old leader to step down")
    stale = [line for line in leader.lines if line.get("msg") == "stepping down"]
    assert stale


def test_lease_figures_in_metrics(pair: dict[str, Fleetmate]) -> None:
    leader, follower = leader_of(pair)
    name = leader.env["FLEETMATE_NODE_ID"]
    wait_for(lambda: f'fleetmate_lease_holder{{node_id="{name}"}} 1.0' in follower.get("/metrics").text, 5, "holder")
    assert "fleetmate_lease_leader 1.0" in leader.get("/metrics").text
    assert "fleetmate_lease_leader 0.0" in follower.get("/metrics").text


def test_cluster_status_command(pair: dict[str, Fleetmate], tmp_path: Path) -> None:
    from tests.harness import run_cli

    leader, follower = leader_of(pair)
    addrs = f"http://127.0.0.1:1,{follower.url}"  # the first address is dead: the next answers
    result = run_cli(["cluster", "status", "--addr", addrs], {}, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"leader: {leader.env['FLEETMATE_NODE_ID']}")
    assert lines[1].startswith("registry: revision ")
    rows = {line.split()[0]: line.split()[1] for line in lines[5:]}
    assert rows == {leader.env["FLEETMATE_NODE_ID"]: "leader", follower.env["FLEETMATE_NODE_ID"]: "follower"}
    zk_column = {line.split()[0]: line.split()[3] for line in lines[5:]}
    assert zk_column == {leader.env["FLEETMATE_NODE_ID"]: leader.zk, follower.env["FLEETMATE_NODE_ID"]: follower.zk}
    dead = run_cli(["cluster", "status", "--addr", "http://127.0.0.1:1"], {}, tmp_path)
    assert dead.returncode == 1
    assert "no address answers" in dead.stderr


def test_cluster_view_creates_no_consumers(pair: dict[str, Fleetmate], nats_server: NatsServer) -> None:
    # Regression: reading the replicas bucket per request made a JetStream consumer each time,
    # and polling /api/v1/cluster ran into the server's consumer limit (HTTP 500).
    import asyncio

    import nats

    leader, _ = leader_of(pair)

    async def consumers() -> int:
        nc = await nats.connect(nats_server.url)
        try:
            info = await nc.jetstream().stream_info("KV_fleetmate_replicas")
            return int(info.state.consumer_count)
        finally:
            await nc.close()

    before = asyncio.run(consumers())  # at most the start-up seeding, expiring on their own
    with httpx.Client(base_url=leader.url) as client:
        assert all(client.get("/api/v1/cluster").status_code == 200 for _ in range(300))
    assert asyncio.run(consumers()) <= before
