"""`fleetmate serve` as a real process: embedded and external NATS, endpoints, shutdown, crash handling."""

from __future__ import annotations

import http.client
import os
import re
import signal
import time
from pathlib import Path

import httpx
import psutil
import pytest

from tests.harness import Fleetmate, NatsServer, free_port, running, wait_for


def _check_endpoints(fm: Fleetmate) -> dict[str, object]:
    health = fm.get("/api/v1/health")
    assert health.status_code == 200
    assert health.json() == {"status": "ok", "node_id": "t1"}

    ready = fm.get("/api/v1/ready")
    assert ready.status_code == 200, ready.text
    assert ready.json()["ready"] is True

    cluster = fm.get("/api/v1/cluster")
    assert cluster.status_code == 200
    body: dict[str, object] = cluster.json()
    assert body["node_id"] == "t1"
    assert body["role"] == "leader"
    assert body["leader"] == {"node_id": "t1", "http_url": fm.url}
    assert body["http_url"] == fm.url
    assert body["uptime_s"] > 0  # type: ignore[operator]
    assert [r["node_id"] for r in body["replicas"]] == ["t1"]  # type: ignore[attr-defined]

    metrics = fm.get("/metrics")
    assert metrics.status_code == 200
    assert metrics.headers["content-type"].startswith("text/plain")
    for name in (
        "process_resident_memory_bytes",
        "fleetmate_uptime_seconds",
        "fleetmate_bus_connected 1.0",
        "fleetmate_bus_out_msgs_total",
        'fleetmate_http_requests_total{method="GET",route="/api/v1/cluster",status="200"} 1.0',
        "fleetmate_http_request_duration_seconds_bucket",
    ):
        assert name in metrics.text, name

    schema = fm.get("/schema/openapi.json")
    assert schema.status_code == 200
    paths = schema.json()["paths"]
    for path in (
        "/api/v1/health",
        "/api/v1/ready",
        "/api/v1/cluster",
        "/api/v1/cluster/replicas/{node_id}",
        "/api/v1/ha/clusters/{name}/topology",
        "/api/v1/ha/clusters/{name}/failover",
        "/api/v1/ha/clusters/{name}/switchover",
    ):
        assert path in paths, path
    docs = fm.get("/schema/")
    assert docs.status_code == 200
    assert "text/html" in docs.headers["content-type"]

    missing = fm.get("/no/such/route")
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "message": "no route for GET /no/such/route"}
    return body


def _assert_gone(pids: list[int]) -> None:
    for pid in pids:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_embedded_default_serves_and_stops_cleanly(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path)
    with running(fm):
        body = _check_endpoints(fm)
        assert body["embedded_nats"] is True
        nats_url = body["nats_servers"][0]  # type: ignore[index]
        assert nats_url.startswith("nats://127.0.0.1:")
        assert body["nats_connected_url"] == nats_url
        kids = fm.children()
        assert [k.name() for k in kids] == ["nats-server"]
        conf = (tmp_path / "data" / "nats" / "nats-server.conf").read_text()
        assert "sync_interval: always" in conf
        assert str(tmp_path / "data" / "nats" / "jetstream") in conf

        started = time.monotonic()
        assert fm.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 5
        _assert_gone([k.pid for k in kids])
    assert fm.logged("fleetmate stopped")


def test_ctrl_c_stops_cleanly(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path)
    with running(fm):
        kids = [k.pid for k in fm.children()]
        assert fm.stop(signal.SIGINT) == 0
        _assert_gone(kids)


def test_external_nats(tmp_path: Path, nats_server: NatsServer) -> None:
    fm = Fleetmate(tmp_path, env={"FLEETMATE_NATS_URL": nats_server.url})
    with running(fm):
        body = _check_endpoints(fm)
        assert body["embedded_nats"] is False
        assert body["nats_servers"] == [nats_server.url]
        assert fm.children() == []
        assert not (tmp_path / "data" / "nats").exists()
        assert fm.stop() == 0
    assert nats_server.proc is not None
    assert nats_server.proc.poll() is None


def test_ready_reports_bus_outage(tmp_path: Path, nats_server: NatsServer) -> None:
    fm = Fleetmate(tmp_path, env={"FLEETMATE_NATS_URL": nats_server.url})
    with running(fm):
        nats_server.stop()

        def not_ready() -> str:
            r = fm.get("/api/v1/ready")
            return r.json()["reason"] if r.status_code == 503 else ""

        reason = wait_for(not_ready, 10, "ready to turn 503")
        assert reason == "not connected to NATS"
        assert fm.get("/api/v1/health").status_code == 200  # alive, just not ready
        nats_server.start()
        wait_for(lambda: fm.get("/api/v1/ready").status_code == 200, 20, "ready again after NATS is back")
        assert fm.logged("nats reconnected")
        assert fm.stop() == 0


def test_embedded_nats_crash_is_reported_and_recovered(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path)
    with running(fm):
        (child,) = fm.children()
        os.kill(child.pid, signal.SIGKILL)

        wait_for(lambda: fm.logged("embedded nats-server exited unexpectedly; restarting"), 10, "crash report")
        crash = fm.logged("embedded nats-server exited unexpectedly; restarting")[0]
        assert crash["level"] == "error"
        assert crash["exit_code"] == -signal.SIGKILL
        wait_for(lambda: fm.get("/api/v1/ready").status_code == 200, 20, "ready again after restart")
        (new_child,) = fm.children()
        assert new_child.pid != child.pid
        assert "fleetmate_nats_embedded_restarts_total 1.0" in fm.get("/metrics").text
        assert fm.stop() == 0


def test_sigkill_of_fleetmate_leaves_no_nats_server(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path)
    with running(fm):
        (child,) = fm.children()
        fm.kill()
        wait_for(lambda: not psutil.pid_exists(child.pid), 10, "orphaned nats-server to exit")


def test_port_in_use_fails_with_message(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        fm = Fleetmate(tmp_path, env={"FLEETMATE_HTTP_PORT": str(port)})
        with running(fm, wait_ready=False):
            assert fm.proc is not None
            assert fm.proc.wait(20) == 1
            fm.stop()
    errors = [line for line in fm.lines if line.get("level") == "error"]
    assert errors
    assert "already in use" in errors[0]["error"]


@pytest.mark.parametrize("bad_url", ["nats://127.0.0.1:1"])
def test_unreachable_external_nats_fails_start(tmp_path: Path, bad_url: str) -> None:
    fm = Fleetmate(tmp_path, env={"FLEETMATE_NATS_URL": bad_url, "FLEETMATE_NATS_CONNECT_TIMEOUT": "1"})
    with running(fm, wait_ready=False):
        assert fm.proc is not None
        assert fm.proc.wait(20) == 1
        fm.stop()
    failed = fm.logged("start-up failed")
    assert failed
    assert "cannot connect to NATS" in failed[0]["error"]


# ---- configuration flags ----------------------------------------------------------------------


def test_flags_win_over_variables(tmp_path: Path) -> None:
    port, zk_port = free_port(), free_port()
    # The harness sets FLEETMATE_HTTP_PORT=0, FLEETMATE_ZK_PORT=0 and FLEETMATE_NODE_ID=t1: the flags win.
    args = ["--http-port", str(port), "--zk-port", str(zk_port), "--node-id=flagged", "--registry-max-data-bytes", "16"]
    fm = Fleetmate(tmp_path, args=args)
    with running(fm):
        assert fm.url == f"http://127.0.0.1:{port}"
        assert fm.zk == f"127.0.0.1:{zk_port}"
        assert fm.get("/api/v1/health").json()["node_id"] == "flagged"
        assert fm.post("/api/v1/registry/nodes/small", json={"data": "x" * 16}).status_code == 201
        assert fm.post("/api/v1/registry/nodes/big", json={"data": "x" * 17}).status_code == 400
        assert fm.stop() == 0


def test_workers_get_the_supervisors_flags(tmp_path: Path) -> None:
    port = free_port()
    args = ["--workers", "2", "--node-id", "wf", "--http-port", str(port), "--registry-max-data-bytes", "16"]
    args += ["--log-level", "error"]  # the supervisor's ready line is there all the same
    fm = Fleetmate(tmp_path, env={"FLEETMATE_WORKERS": "1"}, args=args)
    with running(fm):
        ready = wait_for(
            lambda: [line for line in fm.logged("fleetmate ready") if line.get("workers") == 2], 30, "supervisor ready"
        )
        url = ready[0]["http"]
        assert url == f"http://127.0.0.1:{port}"
        seen = set()
        for i in range(30):  # new connections: the kernel spreads them over both workers
            with httpx.Client(base_url=url) as client:
                seen.add(client.get("/api/v1/cluster").json()["node_id"])
                assert client.post(f"/api/v1/registry/nodes/big{i}", json={"data": "x" * 17}).status_code == 400
        assert seen == {"wf-w1", "wf-w2"}
        assert fm.stop() == 0


# ---- what monitoring and operators trip on ------------------------------------------------------


def test_head_answers_like_get_without_a_body(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path)
    with running(fm):
        assert fm.post("/api/v1/registry/nodes/h", json={"data": "x"}).status_code == 201
        host, port = fm.url.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=5)  # one connection: a stray body would show
        try:
            for path in ("/api/v1/health", "/api/v1/ready", "/metrics", "/api/v1/registry/nodes/h", "/no/such"):
                conn.request("GET", path)
                got = conn.getresponse()
                body = got.read()
                conn.request("HEAD", path)
                head = conn.getresponse()
                assert head.read() == b"", path
                assert head.status == got.status, path
                same = {k.lower(): v for k, v in head.getheaders() if k.lower() not in ("date", "content-length")}
                assert same == {
                    k.lower(): v for k, v in got.getheaders() if k.lower() not in ("date", "content-length")
                }
                if path != "/metrics":  # the figures move between two scrapes
                    assert head.getheader("content-length") == str(len(body)), path
            conn.request("GET", "/api/v1/health")  # the connection is still in step after the HEADs
            assert conn.getresponse().read() == b'{"status":"ok","node_id":"t1"}'
        finally:
            conn.close()
        assert 'fleetmate_http_requests_total{method="HEAD",route="/api/v1/health",status="200"} 1.0' in (
            fm.get("/metrics").text
        )


PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.4,"
    "text/plain;version=0.0.4;q=0.3,*/*;q=0.2"
)


def test_metrics_content_type_has_one_charset(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path)
    with running(fm):
        plain = fm.get("/metrics")
        assert plain.headers["content-type"] == "text/plain; version=0.0.4; charset=utf-8"
        assert "fleetmate_uptime_seconds" in plain.text
        scraped = httpx.get(fm.url + "/metrics", headers={"Accept": PROMETHEUS_3_ACCEPT}, timeout=5)
        assert scraped.status_code == 200
        content_type = scraped.headers["content-type"]
        assert content_type.startswith("application/openmetrics-text; version=1.0.0;")
        assert scraped.text.endswith("# EOF\n")
        for response in (plain, scraped):
            params = [p.split("=")[0].strip() for p in response.headers["content-type"].split(";")[1:]]
            assert len(params) == len(set(params)), response.headers["content-type"]  # Go's mime rejects repeats
            assert params.count("charset") == 1


@pytest.mark.parametrize(("level", "fmt"), [("error", "json"), ("warning", "text"), ("info", "json")])
def test_listening_addresses_are_logged_at_every_level(tmp_path: Path, level: str, fmt: str) -> None:
    fm = Fleetmate(tmp_path, env={"FLEETMATE_LOG_LEVEL": level, "FLEETMATE_LOG_FORMAT": fmt})
    with running(fm, wait_ready=False):
        ready = wait_for(lambda: [t for t in fm.raw if "fleetmate ready" in t], 20, "the ready line")[0]
        url = httpx.get(_http_of(ready) + "/api/v1/cluster", timeout=5).json()
        for address in (url["http_url"], url["zk_address"], *url["nats_servers"]):
            assert address.removeprefix("http://") in ready, address
        assert fm.stop() == 0
    granian = [t for t in fm.raw if "_granian" in t]
    if level == "info":
        assert any("Listening at" in t for t in granian)
    else:
        # Granian follows log_level: its info lines ("Starting granian", "Listening at") are gone.
        assert not [t for t in granian if '"level":"info"' in t or " INFO " in t], granian
        assert not [t for t in fm.raw if '"level":"info"' in t and "fleetmate ready" not in t]


def _http_of(line: str) -> str:
    """The http address of a ready line, JSON or text."""
    found = re.search(r'"http":"([^"]+)"|\bhttp=(\S+)', line)
    assert found, line
    return found.group(1) or found.group(2)
