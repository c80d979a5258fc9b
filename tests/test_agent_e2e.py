"""A real `fleetmate agent` joins a real control plane: its node, facts and host metrics appear; kill -9 and back."""

from __future__ import annotations

import glob
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.harness import Fleetmate, free_port, running, wait_for
from tests.harness.agent import INTERVAL, Agent

SUSPECT_AFTER = 2  # missed heartbeats
DOWN_AFTER = 3.0  # seconds
NODE = "e2e-agent"
MARIADBD = os.path.realpath("/usr/sbin/mariadbd")
POSTGRES = {os.path.realpath(p) for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")}
TIMINGS = {
    "FLEETMATE_MEMBERSHIP_HEARTBEAT_INTERVAL": str(INTERVAL),
    "FLEETMATE_MEMBERSHIP_SUSPECT_AFTER": str(SUSPECT_AFTER),
    "FLEETMATE_MEMBERSHIP_DOWN_AFTER": str(DOWN_AFTER),
}


@pytest.fixture(scope="module")
def plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Fleetmate, str]]:
    nats_port = free_port()
    tmp: Path = tmp_path_factory.mktemp("plane")
    with running(Fleetmate(tmp, env={**TIMINGS, "FLEETMATE_NATS_PORT": str(nats_port)})) as fm:
        yield fm, f"nats://127.0.0.1:{nats_port}"


def _agent(tmp: Path, nats_url: str) -> Agent:
    return Agent(
        tmp,
        {
            "FLEETMATE_NODE_ID": NODE,
            "FLEETMATE_NATS_URL": nats_url,
            "FLEETMATE_AGENT_ZONE": "z1",
            "FLEETMATE_AGENT_RACK": "r7",
            **TIMINGS,
        },
    )


def _node(fm: Fleetmate) -> dict[str, Any] | None:
    reply = fm.get(f"/api/v1/nodes/{NODE}")
    return reply.json() if reply.status_code == 200 else None


def _state(fm: Fleetmate) -> str | None:
    found = _node(fm)
    return found["node"]["state"] if found else None


def test_an_agent_joins_reports_facts_and_metrics_then_goes_suspect_down_and_back(
    plane: tuple[Fleetmate, str], tmp_path: Path
) -> None:
    fm, nats_url = plane
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    agent = _agent(tmp_path / "agent", nats_url).start()
    try:
        wait_for(lambda: _state(fm) == "online", 15, "the agent's node online")
        detail = _node(fm)
        assert detail is not None
        assert detail["node"]["kind"] == "agent"
        assert detail["node"]["labels"] == {"zone": "z1", "rack": "r7"}

        def facts() -> dict[str, Any] | None:
            found = _node(fm)
            have = found["facts"] if found else {}
            return have if {"ports", "engines", "network"} <= set(have) else None

        def port_listed() -> bool:
            have = facts()
            return bool(have) and any(p["port"] == port for p in have["ports"]["ports"])

        wait_for(port_listed, 20, f"port {port} the test listens on in the node's ports")
        have = facts()
        assert have is not None
        engines = {os.path.realpath(e["path"]): e for e in have["engines"]["engines"]}
        if os.path.exists(MARIADBD):
            assert MARIADBD in engines, engines
            assert engines[MARIADBD]["version"]
        for path in POSTGRES:
            assert path in engines, engines
            assert engines[path]["version"]
        assert have["network"]["interfaces"]
        assert have["network"]["client"]["ip"] == "127.0.0.1"  # the route to the control plane
        # The same facts are znodes any registry client can watch.
        ports_znode = fm.get(f"/api/v1/registry/nodes/fleet/nodes/{NODE}/ports")
        assert ports_znode.status_code == 200

        def cpu_points() -> list[Any]:
            reply = fm.get(f"/api/v1/metrics/query?series=host_cpu_percent&labels=node={NODE}&from=-5m&step=1s")
            assert reply.status_code == 200, reply.text
            results = reply.json()["results"]
            return results[0]["points"] if results else []

        wait_for(lambda: len(cpu_points()) >= 2, 15, "the agent's host figures in the metrics store")
        assert all(0 <= value <= 100 for _, value in cpu_points())

        agent.kill()  # kill -9: no goodbye
        killed = time.monotonic()
        wait_for(lambda: _state(fm) == "suspect", 10, "suspect after missed heartbeats")
        suspect_at = time.monotonic() - killed
        wait_for(lambda: _state(fm) == "down", 10, "down after down_after")
        down_at = time.monotonic() - killed
        # Judged on the leader's tick: allow a tick and a heartbeat of slack on each bound.
        assert INTERVAL * SUSPECT_AFTER - INTERVAL <= suspect_at <= INTERVAL * SUSPECT_AFTER + 2.0
        assert DOWN_AFTER - INTERVAL <= down_at <= DOWN_AFTER + 2.0

        agent = _agent(tmp_path / "agent", nats_url).start()
        wait_for(lambda: _state(fm) == "online", 10, "online again once heartbeats resume")
        detail = _node(fm)
        assert detail is not None
        states = [entry["state"] for entry in detail["history"]]
        assert states[-4:] == ["online", "suspect", "down", "online"], states
    finally:
        agent.kill()
        listener.close()
