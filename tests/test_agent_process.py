"""`fleetmate agent` as a real process against a real nats-server: heartbeats, facts, endpoints, auth, reconnects."""

from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.subscription import Subscription

from app import __version__
from app.bus import subjects
from app.bus.micro import HandlerError, call
from app.services.agent.messages import (
    CleanResult,
    EngineScan,
    FreePorts,
    Heartbeat,
    HostInfo,
    ListeningPorts,
    NetStatus,
    NodeFacts,
)
from tests.harness import ROOT, Fleetmate, NatsServer, free_port, running, wait_for
from tests.harness.agent import INTERVAL, Agent, agent_running

TOKEN = "agent-test-token-1"
MARIADBD = os.path.realpath("/usr/sbin/mariadbd")
POSTGRES = {os.path.realpath(p): p.split("/")[4] for p in glob.glob("/usr/lib/postgresql/*/bin/postgres")}  # -> major


def names(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def _agent_env(node_id: str, nats_url: str, **extra: str) -> dict[str, str]:
    return {"FLEETMATE_NODE_ID": node_id, "FLEETMATE_NATS_URL": nats_url, "FLEETMATE_NATS_TOKEN": TOKEN, **extra}


@pytest.fixture(scope="module")
def token_nats(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsServer]:
    """One nats-server requiring TOKEN, shared by the tests that only watch the agent."""
    server = NatsServer(tmp_path_factory.mktemp("nats"), token=TOKEN).start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def peer() -> Iterator[int]:
    """A listening port the agent probes as its configured peer."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


@pytest.fixture(scope="module")
def logs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("logs")


@pytest.fixture(scope="module")
def agent(
    tmp_path_factory: pytest.TempPathFactory, token_nats: NatsServer, peer: int, logs_dir: Path
) -> Iterator[Agent]:
    """One agent for the tests that only watch it or ask it things."""
    rules = [{"name": "app-logs", "directory": str(logs_dir), "pattern": "*.log", "keep_newest": 1}]
    env = _agent_env(
        "db-1",
        token_nats.url,
        FLEETMATE_AGENT_ZONE="eu-1a",
        FLEETMATE_AGENT_RACK="r7",
        FLEETMATE_AGENT_ROLE="primary-db",
        FLEETMATE_AGENT_PEERS=f"127.0.0.1:{peer}",
        FLEETMATE_AGENT_LOG_RULES=json.dumps(rules),
    )
    with agent_running(Agent(tmp_path_factory.mktemp("agent"), env)) as proc:
        yield proc


@contextlib.asynccontextmanager
async def client(url: str, token: str | None = TOKEN) -> AsyncIterator[Client]:
    nc = await nats.connect(url, token=token, allow_reconnect=False, connect_timeout=2)
    try:
        yield nc
    finally:
        await nc.close()


async def take(sub: Subscription, n: int, timeout: float) -> list[tuple[float, bytes]]:
    """The next n messages with the monotonic time each arrived."""
    out: list[tuple[float, bytes]] = []
    deadline = time.monotonic() + timeout
    while len(out) < n:
        msg = await sub.next_msg(timeout=max(0.01, deadline - time.monotonic()))
        out.append((time.monotonic(), msg.data))
    return out


async def facts_until(sub: Subscription, check: Any, timeout: float) -> NodeFacts:
    """Facts messages until one satisfies check (fails after timeout)."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError("no facts message satisfied the check in time")
        msg = await sub.next_msg(timeout=left)
        facts = msgspec.json.decode(msg.data, type=NodeFacts)
        if check(facts):
            return facts


async def ask(nc: Client, node: str, endpoint: str, body: dict[str, Any] | None = None, timeout: float = 10) -> bytes:
    payload = msgspec.json.encode(body) if body is not None else b""
    return await call(nc, subjects.agent_request(node, endpoint), payload, timeout)


# ---- heartbeats and facts ---------------------------------------------------------------------


async def test_heartbeats_arrive_at_the_interval_with_host_figures(agent: Agent, token_nats: NatsServer) -> None:
    async with client(token_nats.url) as nc:
        sub = await nc.subscribe(subjects.agent_heartbeat("db-1"))
        got = await take(sub, 6, timeout=10)
    beats = [msgspec.json.decode(data, type=Heartbeat) for _, data in got]
    seqs = [b.seq for b in beats]
    assert seqs == list(range(seqs[0], seqs[0] + 6)), seqs
    gaps = sorted(b - a for (a, _), (b, _) in itertools.pairwise(got))
    assert INTERVAL * 0.6 < gaps[len(gaps) // 2] < INTERVAL * 1.4, gaps
    assert max(gaps) < INTERVAL * 2.5, gaps
    last = beats[-1]
    assert last.node_id == "db-1"
    assert last.kind == "agent"
    assert last.labels == {"zone": "eu-1a", "rack": "r7", "role": "primary-db"}
    assert last.version == __version__
    assert last.http_url == ""
    assert last.zk_address == ""
    assert last.client_ip == "127.0.0.1"  # the route to the control plane's NATS
    assert abs(last.sent_at - time.time()) < 5
    assert last.started_at <= last.sent_at
    assert last.facts_rev >= 1
    host = last.host
    assert host.cpu_cores >= 1
    assert 0 <= host.cpu_percent <= 100
    assert 0 < host.memory_available <= host.memory_total
    assert host.uptime > 0
    assert host.load1 >= 0
    assert "/" in {d.mount for d in host.disks}
    assert all(d.total > 0 for d in host.disks)


async def test_a_port_the_test_opens_shows_up_in_the_facts(agent: Agent, token_nats: NatsServer) -> None:
    async with client(token_nats.url) as nc:
        facts_sub = await nc.subscribe(subjects.agent_facts("db-1"))
        beat_sub = await nc.subscribe(subjects.agent_heartbeat("db-1"))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            sock.listen()
            port = sock.getsockname()[1]

            def has_port(f: NodeFacts) -> bool:
                return any(p.port == port and p.proto == "tcp" for p in f.ports.ports)

            opened = await facts_until(facts_sub, has_port, timeout=INTERVAL * 10)
            mine = next(p for p in opened.ports.ports if p.port == port)
            assert mine.address == "127.0.0.1"
            assert mine.pid == os.getpid()
            assert mine.process is not None
            # Heartbeats now name this revision (or a later one: other processes on this host open
            # ports too), so a consumer that missed it knows to ask.
            while True:
                beat = msgspec.json.decode((await take(beat_sub, 1, 5))[0][1], type=Heartbeat)
                if beat.facts_rev >= opened.rev:
                    break
            current = msgspec.json.decode(await ask(nc, "db-1", "facts"), type=NodeFacts)
            assert current.rev >= opened.rev
            assert has_port(current)
        closed = await facts_until(facts_sub, lambda f: not has_port(f), timeout=INTERVAL * 10)
        assert closed.rev > opened.rev


async def test_engines_found_with_versions(agent: Agent, token_nats: NatsServer) -> None:
    assert POSTGRES, "PostgreSQL binaries expected under /usr/lib/postgresql/*/bin"
    async with client(token_nats.url) as nc:
        for source in ("facts", "scan"):
            body = await ask(nc, "db-1", source)
            scan = (
                msgspec.json.decode(body, type=NodeFacts).engines
                if source == "facts"
                else msgspec.json.decode(body, type=EngineScan)
            )
            by_path = {e.path: e for e in scan.engines}
            maria = by_path[MARIADBD]
            assert maria.engine == "mariadb"
            assert re.fullmatch(r"\d+\.\d+\.\d+", maria.version), maria
            assert "MariaDB" in maria.version_line
            for path, major in POSTGRES.items():
                pg = by_path[path]
                assert pg.engine == "postgresql"
                assert re.fullmatch(r"\d+(\.\d+)+", pg.version), pg
                assert pg.version.split(".")[0] == major  # /usr/lib/postgresql/15/... is 15.x


# ---- the micro endpoints ----------------------------------------------------------------------


async def test_micro_endpoints_answer_and_reject_bad_requests(agent: Agent, token_nats: NatsServer, peer: int) -> None:
    async with client(token_nats.url) as nc:
        ping = msgspec.json.decode((await nc.request(f"$SRV.PING.{subjects.AGENT_SERVICE}", b"", timeout=2)).data)
        assert ping["metadata"]["node_id"] == "db-1"
        assert ping["metadata"]["zone"] == "eu-1a"

        info = msgspec.json.decode(await ask(nc, "db-1", "info"), type=HostInfo)
        assert info.hostname == socket.gethostname()
        assert info.memory_total > 0

        ports = msgspec.json.decode(await ask(nc, "db-1", "ports"), type=ListeningPorts)
        assert peer in {p.port for p in ports.ports}

        with socket.socket() as held:
            held.bind(("0.0.0.0", 0))
            held.listen()
            taken = held.getsockname()[1]
            found = msgspec.json.decode(
                await ask(nc, "db-1", "free_ports", {"start": taken, "end": taken + 40, "count": 3}), type=FreePorts
            )
            assert len(found.ports) == 3
            assert taken not in found.ports
            assert all(taken < p <= taken + 40 for p in found.ports)

        cases = [
            ({"start": 3400, "end": 3306}, "400", "port range start 3400 is greater than its end 3306"),
            ({"start": 0, "end": 10}, "400", "port range start must be between 1 and 65535, got 0"),
            ({"start": 1, "end": 10, "count": 0}, "400", "count must be at least 1, got 0"),
            ({"start": 1, "end": 10, "proto": "sctp"}, "400", "bad free_ports request"),
            ({"end": 10}, "400", "bad free_ports request: Object missing required field `start`"),
        ]
        for body, code, message in cases:
            with pytest.raises(HandlerError) as err:
                await ask(nc, "db-1", "free_ports", body)
            assert err.value.code == code
            assert message in err.value.description, err.value.description
        with pytest.raises(HandlerError) as err:
            await call(nc, subjects.agent_request("db-1", "free_ports"), b"{not json", 5)
        assert err.value.code == "400"

        net = msgspec.json.decode(await ask(nc, "db-1", "net"), type=NetStatus)
        assert net.client is not None
        assert net.client.ip == "127.0.0.1"
        assert "lo" in {i.name for i in net.interfaces}
        reach = {(r.host, r.port): r for r in net.reachability}
        assert reach[("127.0.0.1", token_nats.port)].reachable  # the control plane
        assert reach[("127.0.0.1", peer)].reachable
        assert reach[("127.0.0.1", peer)].rtt_ms is not None

        with pytest.raises(HandlerError) as err:
            await ask(nc, "db-1", "clean", {"rule": "nope"})
        assert (err.value.code, err.value.description) == (
            "404",
            "no log rule named 'nope' (agent.log_rules: app-logs)",
        )

        # pg_rejoin refuses what it cannot do, and touches nothing: the held port is no postmaster.
        with socket.socket() as held:
            held.bind(("127.0.0.1", 0))
            held.listen()
            port = held.getsockname()[1]
            login = {"user": "fleetmate_ha", "password": "s3cret-pw"}
            rejoin_cases = [
                ({"address": f"127.0.0.1:{port}", "port": port, "source": "x", **login}, "400", "'x' is not host:port"),
                (
                    {"address": f"127.0.0.1:{port}", "port": port + 1, "source": "127.0.0.1:1", **login},
                    "400",
                    f"port {port + 1} is not the port of 127.0.0.1:{port}",
                ),
                (
                    {"address": f"127.0.0.1:{port}", "port": port, "source": "127.0.0.1:1", **login},
                    "409",
                    f"port {port} belongs to",
                ),
                ({"port": port, **login}, "400", "bad pg_rejoin request"),
            ]
            for body, code, message in rejoin_cases:
                with pytest.raises(HandlerError) as err:
                    await ask(nc, "db-1", "pg_rejoin", body)
                assert err.value.code == code, err.value.description
                assert message in err.value.description, err.value.description
                assert "s3cret-pw" not in err.value.description
            socket.create_connection(("127.0.0.1", port), timeout=2).close()  # still listening: nothing stopped
        free = free_port()
        body = {"address": f"127.0.0.1:{free}", "port": free, "source": "127.0.0.1:1", **login}
        with pytest.raises(HandlerError) as err:
            await ask(nc, "db-1", "pg_rejoin", body)
        assert (err.value.code, err.value.description) == ("404", f"no process on this host listens on TCP port {free}")


async def test_log_cleanup_on_request_dry_run_then_for_real(
    agent: Agent, token_nats: NatsServer, logs_dir: Path
) -> None:
    now = time.time()
    for i, name in enumerate(("a.log", "b.log", "c.log")):
        (logs_dir / name).write_text(name * 100)
        os.utime(logs_dir / name, (now - 1000 + i, now - 1000 + i))
    (logs_dir / "keep.txt").write_text("not matched")
    async with client(token_nats.url) as nc:
        facts_sub = await nc.subscribe(subjects.agent_facts("db-1"))
        dry = msgspec.json.decode(await ask(nc, "db-1", "clean", {"dry_run": True}), type=CleanResult)
        (report,) = dry.reports
        assert report.dry_run
        assert sorted(Path(f.path).name for f in report.deleted) == ["a.log", "b.log"]
        assert all((logs_dir / n).exists() for n in ("a.log", "b.log", "c.log"))

        real = msgspec.json.decode(await ask(nc, "db-1", "clean", {"rule": "app-logs"}), type=CleanResult)
        (report,) = real.reports
        assert not report.dry_run
        assert report.bytes_freed == 1000
        assert names(logs_dir) == ["c.log", "keep.txt"]
        # Every run is recorded in the facts, which are republished.
        facts = await facts_until(facts_sub, lambda f: len(f.logs) >= 2 and not f.logs[-1].dry_run, timeout=5)
        assert [r.dry_run for r in facts.logs[-2:]] == [True, False]
    wait_for(lambda: len(agent.logged("log cleanup ran")) >= 2, 5, "both runs in the agent's log")


# ---- configuration and authentication failures ------------------------------------------------


def test_a_wrong_token_is_refused_with_a_clear_message(tmp_path: Path, token_nats: NatsServer) -> None:
    proc = Agent(tmp_path, _agent_env("db-x", token_nats.url, FLEETMATE_NATS_TOKEN="not-the-token")).start(False)
    started = time.monotonic()
    assert proc.wait(15) == 2
    assert time.monotonic() - started < 10
    (line,) = proc.logged("NATS refused the agent's token (nats.token / nats.token_file)")
    assert line["level"] == "error"
    assert TOKEN not in "\n".join(proc.raw)


def test_no_token_for_a_server_that_wants_one_is_refused_too(tmp_path: Path, token_nats: NatsServer) -> None:
    env = {"FLEETMATE_NODE_ID": "db-x", "FLEETMATE_NATS_URL": token_nats.url}
    proc = Agent(tmp_path, env).start(False)
    assert proc.wait(15) == 2
    (line,) = [ln for ln in proc.lines if ln.get("msg", "").startswith("NATS requires a token and the agent has none")]
    assert "data_dir/nats.token" in line["msg"]


def test_a_stop_signal_while_waiting_for_nats_exits_at_once(tmp_path: Path) -> None:
    url = f"nats://127.0.0.1:{free_port()}"
    env = _agent_env("db-s", url, FLEETMATE_NATS_CONNECT_TIMEOUT="30", FLEETMATE_LOG_LEVEL="debug")
    proc = Agent(tmp_path, env).start(False)
    try:
        wait_for(lambda: proc.logged("nats error"), 10, "a refused connection inside the first 30 s attempt")
        started = time.monotonic()
        assert proc.stop(signal.SIGTERM) == 0
        assert time.monotonic() - started < 3
    finally:
        proc.kill()


def test_no_nats_url_exits_2_naming_the_key(tmp_path: Path) -> None:
    proc = Agent(tmp_path, {"FLEETMATE_NODE_ID": "db-x"}).start(False)
    assert proc.wait(15) == 2
    assert any("nats.url" in line and "required for `fleetmate agent`" in line for line in proc.raw), proc.raw


@pytest.mark.parametrize("node_id", ["heartbeat", "facts", "watch"])
def test_a_reserved_node_id_exits_2_naming_the_key(tmp_path: Path, node_id: str) -> None:
    env = {"FLEETMATE_NODE_ID": node_id, "FLEETMATE_NATS_URL": "nats://127.0.0.1:1"}
    proc = Agent(tmp_path, env).start(False)
    assert proc.wait(15) == 2
    assert any("node_id" in line and "is reserved" in line for line in proc.raw), proc.raw


def test_an_unreadable_token_file_exits_2_naming_the_key(tmp_path: Path, token_nats: NatsServer) -> None:
    empty = tmp_path / "empty.token"
    empty.write_text("\n")
    env = {"FLEETMATE_NODE_ID": "db-x", "FLEETMATE_NATS_URL": token_nats.url, "FLEETMATE_NATS_TOKEN_FILE": str(empty)}
    proc = Agent(tmp_path, env).start(False)
    assert proc.wait(15) == 2
    assert any("nats.token_file" in line and "holds no token" in line for line in proc.raw), proc.raw


# ---- the embedded server beyond loopback ------------------------------------------------------


async def test_embedded_server_beyond_loopback_generates_and_requires_a_token(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path / "cp", env={"FLEETMATE_NATS_HOST": "0.0.0.0"})
    with running(fm):
        token_file = tmp_path / "cp" / "data" / "nats.token"
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
        token = token_file.read_text().strip()
        assert len(token) >= 32
        conf = tmp_path / "cp" / "data" / "nats" / "nats-server.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        assert "authorization" in conf.read_text()
        url = wait_for(lambda: fm.get("/api/v1/cluster").json()["nats_servers"][0], 5, "the NATS URL")  # type: ignore[no-any-return]
        url = re.sub(r"//[^:]+:", "//127.0.0.1:", url)

        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, allow_reconnect=False, connect_timeout=2)
        with pytest.raises(nats.errors.Error, match="Authorization Violation"):
            await nats.connect(url, token="wrong-token-123", allow_reconnect=False, connect_timeout=2)
        # fleetmate itself presents the token: it is ready (JetStream answers) and writes work.
        assert fm.get("/api/v1/ready").status_code == 200

        def write() -> bool:
            r = httpx.post(fm.url + "/api/v1/registry/nodes/behind-a-token", json={"data": "x"}, timeout=5)
            return r.status_code in (200, 201)

        wait_for(write, 10, "a registry write through the token-protected bus")

        # An agent given the token file joins.
        env = {
            "FLEETMATE_NODE_ID": "db-e",
            "FLEETMATE_NATS_URL": url,
            "FLEETMATE_NATS_TOKEN_FILE": str(token_file),
        }
        async with client(url, token) as nc:
            sub = await nc.subscribe(subjects.agent_heartbeat("db-e"))
            with agent_running(Agent(tmp_path / "agent", env)):
                ((_, data),) = await take(sub, 1, timeout=10)
        assert msgspec.json.decode(data, type=Heartbeat).node_id == "db-e"

        # A restart keeps the token.
        fm.restart()
        assert token_file.read_text().strip() == token
        assert fm.get("/api/v1/ready").status_code == 200
        assert fm.stop() == 0


# ---- reconnects and shutdown ------------------------------------------------------------------


async def test_agent_reconnects_after_the_nats_server_restarts(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats", token=TOKEN).start()
    try:
        proc = Agent(tmp_path / "agent", _agent_env("db-r", server.url))
        with agent_running(proc):
            async with client(server.url) as nc:
                sub = await nc.subscribe(subjects.agent_heartbeat("db-r"))
                ((_, data),) = await take(sub, 1, timeout=5)
            before = msgspec.json.decode(data, type=Heartbeat)
            server.stop()
            wait_for(lambda: proc.logged("nats disconnected"), 10, "the agent to notice")
            await asyncio.sleep(INTERVAL * 3)  # heartbeats fall due while the server is away
            server.start()
            async with client(server.url) as nc:
                beats = await nc.subscribe(subjects.agent_heartbeat("db-r"))
                facts = await nc.subscribe(subjects.agent_facts("db-r"))
                ((_, data),) = await take(beats, 1, timeout=20)
                after = msgspec.json.decode(data, type=Heartbeat)
                # Facts are published again after a reconnect, in case the control plane missed some.
                ((_, fdata),) = await take(facts, 1, timeout=5)
            assert after.started_at == before.started_at  # the same process
            assert after.seq > before.seq
            assert msgspec.json.decode(fdata, type=NodeFacts).rev >= 1
            assert proc.logged("nats reconnected")
            assert proc.stop(signal.SIGTERM) == 0
            assert proc.logged("agent stopped")
    finally:
        server.stop()


async def test_agent_waits_for_a_control_plane_that_is_not_up_yet(tmp_path: Path) -> None:
    port = free_port()
    url = f"nats://127.0.0.1:{port}"
    proc = Agent(tmp_path / "agent", _agent_env("db-w", url, FLEETMATE_NATS_CONNECT_TIMEOUT="0.5"))
    proc.start(wait_started=False)
    try:
        wait_for(lambda: proc.logged("cannot reach the control plane's NATS; retrying"), 10, "a retry line")
        server = NatsServer(tmp_path / "nats", token=TOKEN)
        server.port, server.url = port, url
        server.start()
        try:
            wait_for(proc._started, 20, "the agent to connect once NATS is up")
            first = proc.logged("cannot reach the control plane's NATS; retrying")[0]
            assert first["attempt"] == 1
            assert "127.0.0.1" in first["error"]
            assert proc.stop(signal.SIGINT) == 0
        finally:
            server.stop()
    finally:
        proc.kill()


async def test_scheduled_cleanup_in_dry_run_mode_deletes_nothing(tmp_path: Path, token_nats: NatsServer) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    for name in ("x.log", "y.log"):
        (logs / name).write_text("x" * 10)
        os.utime(logs / name, (1, 1))
    rules = json.dumps([{"directory": str(logs), "pattern": "*.log", "keep_days": 1}])
    env = _agent_env(
        "db-c",
        token_nats.url,
        FLEETMATE_AGENT_LOG_RULES=rules,
        FLEETMATE_AGENT_LOG_CLEAN_INTERVAL="0.5",
        FLEETMATE_AGENT_LOG_CLEAN_DRY_RUN="true",
    )
    with agent_running(Agent(tmp_path / "agent", env)) as proc:
        wait_for(lambda: len(proc.logged("log cleanup ran")) >= 2, 10, "two scheduled runs")
        async with client(token_nats.url) as nc:
            # A request for a real run is still a dry run on an agent configured for dry runs.
            result = msgspec.json.decode(await ask(nc, "db-c", "clean", {"dry_run": False}), type=CleanResult)
            facts = msgspec.json.decode(await ask(nc, "db-c", "facts"), type=NodeFacts)
    runs = proc.logged("log cleanup ran")
    assert all(r["dry_run"] and r["deleted"] == 2 for r in runs), runs
    assert result.reports[0].dry_run
    assert len(result.reports[0].deleted) == 2
    assert names(logs) == ["x.log", "y.log"]
    assert facts.logs
    assert all(r.dry_run for r in facts.logs)


def test_agent_imports_stay_lean() -> None:
    """The agent's command path loads no web server, no databases: its footprint is a target."""
    code = (
        "import sys, app.cli.main, app.cli.agent;"
        "heavy = {'litestar', 'granian', 'duckdb', 'sqlite3', 'httpx', 'boto3', 'aiobotocore', 'asyncpg', 'pymysql'};"
        "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
