"""`fleetmate serve --workers N`: one supervisor, N replicas sharing the HTTP port, restart of a dead worker."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import httpx
import psutil

from tests.harness import Fleetmate, running, wait_for


def test_two_workers_share_the_port_and_the_log(tmp_path: Path) -> None:
    metrics = tmp_path / "m" / "metrics.duckdb"  # an explicit path: each worker gets its own file
    metrics.parent.mkdir()
    env = {"FLEETMATE_NODE_ID": "sv", "FLEETMATE_METRICS_PATH": str(metrics)}
    fm = Fleetmate(tmp_path, env=env, args=["--workers", "2"])
    with running(fm):
        supervisor = wait_for(
            lambda: [line for line in fm.logged("fleetmate ready") if line.get("workers") == 2],
            30,
            "the supervisor's ready line",
        )
        url = supervisor[0]["http"]
        names = sorted(k.name() for k in fm.children() if k.ppid() == fm.proc.pid)  # type: ignore[union-attr]
        assert names.count("nats-server") == 1
        assert len([k for k in fm.children() if "python" in k.name()]) == 2
        replicas = {r["node_id"] for r in httpx.get(url + "/api/v1/cluster").json()["replicas"]}
        assert replicas == {"sv-w1", "sv-w2"}
        # Every new connection may land on either worker: writes and reads agree anyway.
        for i in range(20):
            assert httpx.post(f"{url}/api/v1/registry/nodes/k{i}", json={"data": str(i)}).status_code == 201
            assert httpx.get(f"{url}/api/v1/registry/nodes/k{i}").json()["data"] == str(i)
        seen = {httpx.get(url + "/api/v1/cluster").json()["node_id"] for _ in range(30)}
        assert seen == {"sv-w1", "sv-w2"}  # the kernel spreads connections over both
        # A worker that dies is restarted and catches up from its own data dir.
        victim = next(k for k in fm.children() if "python" in k.name())
        os.kill(victim.pid, signal.SIGKILL)
        wait_for(lambda: fm.logged("worker exited unexpectedly; restarting"), 10, "the supervisor to notice")
        wait_for(
            lambda: len([k for k in fm.children() if "python" in k.name() and k.pid != victim.pid]) == 2,
            20,
            "a new worker",
        )
        wait_for(
            lambda: {r["node_id"] for r in httpx.get(url + "/api/v1/cluster").json()["replicas"]} == {"sv-w1", "sv-w2"},
            20,
            "both replicas announced again",
        )
        kids = [k.pid for k in fm.children()]
        assert fm.stop() == 0
        for pid in kids:
            assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert (tmp_path / "data" / "workers" / "sv-w1" / "registry.sqlite").exists()
    assert sorted(p.name for p in metrics.parent.glob("*.duckdb")) == ["metrics-sv-w1.duckdb", "metrics-sv-w2.duckdb"]


def test_bad_worker_count_exits_2(tmp_path: Path) -> None:
    from tests.harness import run_cli

    result = run_cli(["serve", "--workers", "-1"], {"FLEETMATE_DATA_DIR": str(tmp_path)}, tmp_path)
    assert result.returncode == 2
    assert "workers" in result.stderr
