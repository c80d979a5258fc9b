"""Membership on real processes: the test plays an agent (real heartbeats, facts and replies on the real NATS).

Timings are small: a heartbeat every 0.5 s, suspect after 2 missed (1 s), down after 3 s.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from websockets.asyncio.client import connect as ws_connect

from tests.harness import Fleetmate, NatsServer, ReplicaSet, eventually, run_cli

INTERVAL, SUSPECT_AFTER, DOWN_AFTER = 0.5, 2, 3.0
SUSPECT_S = INTERVAL * SUSPECT_AFTER
MARGIN_S = 1.5  # a tick (0.25 s), the log round trip and a loaded 2-core machine
ADMIN, READ = "admin-secret-1", "read-secret-1"
TIMINGS = {
    "FLEETMATE_MEMBERSHIP_HEARTBEAT_INTERVAL": str(INTERVAL),
    "FLEETMATE_MEMBERSHIP_SUSPECT_AFTER": str(SUSPECT_AFTER),
    "FLEETMATE_MEMBERSHIP_DOWN_AFTER": str(DOWN_AFTER),
}
ENV = {**TIMINGS, "FLEETMATE_AUTH_TOKENS": f"read:{READ},admin:{ADMIN}"}
AUTH = {"Authorization": f"Bearer {ADMIN}"}


class Agent:
    """Plays `fleetmate agent` for one node id: heartbeats every INTERVAL, facts on demand."""

    def __init__(self, nc: Client, node_id: str, labels: dict[str, str] | None = None) -> None:
        self.nc = nc
        self.node_id = node_id
        self.labels = labels or {}
        self.seq = 0
        self.facts_rev = 0
        self.last_beat = 0.0
        self._task: asyncio.Task[None] | None = None

    async def beat(self) -> None:
        self.seq += 1
        body = {
            "node_id": self.node_id,
            "kind": "agent",
            "labels": self.labels,
            "seq": self.seq,
            "sent_at": time.time(),
            "started_at": time.time(),
            "version": "test",
            "host": {"hostname": "test"},  # membership reads only what it needs
            "client_ip": "127.0.0.1",
            "facts_rev": self.facts_rev,
        }
        await self.nc.publish(f"fleetmate.agent.heartbeat.{self.node_id}", json.dumps(body).encode())
        await self.nc.flush()
        self.last_beat = time.time()

    def start(self) -> Agent:
        async def loop() -> None:
            while True:
                await self.beat()
                await asyncio.sleep(INTERVAL)

        self._task = asyncio.create_task(loop())
        return self

    async def stop(self) -> float:
        """Stop heartbeating; returns when the last heartbeat was sent."""
        if self._task is not None:
            self._task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await self._task
            self._task = None
        return self.last_beat

    async def publish_facts(self, **facts: Any) -> None:
        self.facts_rev += 1
        body = {"node_id": self.node_id, "rev": self.facts_rev, "updated_at": time.time(), **facts}
        await self.nc.publish(f"fleetmate.agent.facts.{self.node_id}", json.dumps(body).encode())
        await self.nc.flush()


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    server = Fleetmate(tmp_path_factory.mktemp("membership"), env=ENV).start()
    try:
        yield server
    finally:
        server.kill()


def nats_url(server: Fleetmate) -> str:
    return str(server.logged("fleetmate ready")[0]["nats"])


@pytest.fixture
async def nc(fm: Fleetmate) -> AsyncIterator[Client]:
    client = await nats.connect(nats_url(fm))
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def http(fm: Fleetmate) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=fm.url, headers=AUTH, timeout=10) as client:
        yield client


async def node_state(http: httpx.AsyncClient, node_id: str) -> str | None:
    resp = await http.get(f"/api/v1/nodes/{node_id}")
    if resp.status_code == 404:
        return None
    resp.raise_for_status()
    state: str = resp.json()["node"]["state"]
    return state


async def wait_state(http: httpx.AsyncClient, node_id: str, state: str, timeout: float) -> float:
    """Wait for the node's recorded state; returns the moment it was seen."""

    async def reached() -> bool:
        return await node_state(http, node_id) == state

    await eventually(reached, timeout, f"{node_id} {state}")
    return time.time()


async def history(http: httpx.AsyncClient, node_id: str) -> list[tuple[str | None, str]]:
    resp = await http.get(f"/api/v1/nodes/{node_id}")
    resp.raise_for_status()
    return [(h["old"], h["state"]) for h in resp.json()["history"]]


async def revision(http: httpx.AsyncClient) -> int:
    rev: int = (await http.get("/api/v1/registry")).json()["revision"]
    return rev


# ---- scenarios ------------------------------------------------------------------------------------


async def test_an_agent_registers_online_with_labels_and_facts(nc: Client, http: httpx.AsyncClient) -> None:
    agent = Agent(nc, "db-1", {"zone": "z1", "rack": "r7"}).start()
    try:
        await wait_state(http, "db-1", "online", 5)
        listed = {n["node_id"]: n for n in (await http.get("/api/v1/nodes")).json()}
        assert listed["db-1"]["labels"] == {"zone": "z1", "rack": "r7"}
        assert listed["db-1"]["kind"] == "agent"
        assert time.time() - listed["db-1"]["last_seen"] < 2
        # The replica heartbeats too, into the same tracker.
        assert listed["t1"]["kind"] == "replica"
        assert listed["t1"]["state"] == "online"

        ports = {"ports": [{"proto": "tcp", "family": "ipv4", "address": "0.0.0.0", "port": 3306}], "complete": True}
        engines = {"engines": [{"engine": "mariadb", "version": "10.11.6", "path": "/usr/sbin/mariadbd"}]}
        await agent.publish_facts(ports=ports, engines=engines, network={"interfaces": []}, logs=[])

        expected = {"ports": ports, "engines": engines, "network": {"interfaces": []}, "logs": []}

        async def facts_in_registry() -> bool:
            r = await http.get("/api/v1/registry/nodes/fleet/nodes/db-1/ports")
            return r.status_code == 200 and json.loads(r.json()["data"]) == ports

        await eventually(facts_in_registry, 5, "ports under /fleet/nodes/db-1")

        async def every_fact() -> bool:
            return bool((await http.get("/api/v1/nodes/db-1")).json()["facts"] == expected)

        await eventually(every_fact, 5, "every fact of db-1 via /api/v1/nodes/db-1")
        labels = (await http.get("/api/v1/registry/nodes/fleet/nodes/db-1/labels")).json()
        assert json.loads(labels["data"]) == {"rack": "r7", "zone": "z1"}
        children = (await http.get("/api/v1/registry/children/fleet/nodes/db-1")).json()["children"]
        assert set(children) >= {"state", "labels", "ports", "engines", "network", "logs", "history"}

        # The same facts again, and more heartbeats, write nothing; changed facts are written.
        stat = (await http.get("/api/v1/registry/nodes/fleet/nodes/db-1/ports")).json()["stat"]
        heard = (await http.get("/api/v1/nodes/db-1")).json()["node"]["last_seen"]
        await agent.publish_facts(ports=ports, engines=engines, network={"interfaces": []}, logs=[])

        async def heard_three_more() -> bool:
            return bool((await http.get("/api/v1/nodes/db-1")).json()["node"]["last_seen"] >= heard + 3 * INTERVAL)

        await eventually(heard_three_more, 5, "three more heartbeats from db-1 heard")
        again = (await http.get("/api/v1/registry/nodes/fleet/nodes/db-1/ports")).json()["stat"]
        assert again["mzxid"] == stat["mzxid"]
        state_stat = (await http.get("/api/v1/registry/nodes/fleet/nodes/db-1/state")).json()["stat"]
        assert state_stat["version"] == 0  # heartbeats never rewrite the state
        ports["ports"].append({"proto": "tcp", "family": "ipv4", "address": "0.0.0.0", "port": 5432})
        await agent.publish_facts(ports=ports)

        async def new_ports() -> bool:
            r = await http.get("/api/v1/registry/nodes/fleet/nodes/db-1/ports")
            return len(json.loads(r.json()["data"])["ports"]) == 2

        await eventually(new_ports, 5, "the changed ports")
        # Labels follow the heartbeat.
        agent.labels = {"zone": "z2"}

        async def new_labels() -> bool:
            r = await http.get("/api/v1/nodes")
            return any(n["node_id"] == "db-1" and n["labels"] == {"zone": "z2"} for n in r.json())

        await eventually(new_labels, 5, "the changed labels")
        metrics = (await http.get("/metrics")).text
        assert 'fleetmate_node_state{node="db-1",state="online"} 1.0' in metrics
        assert 'fleetmate_node_state{node="t1",state="online"} 1.0' in metrics
    finally:
        await agent.stop()


async def test_silence_makes_a_node_suspect_then_down_and_heartbeats_bring_it_back(
    fm: Fleetmate, nc: Client, http: httpx.AsyncClient
) -> None:
    agent = Agent(nc, "db-2").start()
    await wait_state(http, "db-2", "online", 5)
    ws_url = fm.url.replace("http", "ws", 1)
    async with (
        ws_connect(
            ws_url + "/api/v1/watch?path=/fleet/nodes/db-2/state", open_timeout=5, additional_headers=AUTH
        ) as raw,
        ws_connect(ws_url + "/api/v1/nodes/watch?node=db-2", open_timeout=5, additional_headers=AUTH) as nodes_ws,
    ):
        assert json.loads(await raw.recv())["type"] == "ready"
        ready = json.loads(await nodes_ws.recv())
        assert ready["type"] == "ready"
        assert [n["state"] for n in ready["nodes"]] == ["online"]
        last = await agent.stop()
        suspect_at = await wait_state(http, "db-2", "suspect", SUSPECT_S + MARGIN_S + 1)
        down_at = await wait_state(http, "db-2", "down", DOWN_AFTER + MARGIN_S + 1)
        detail = (await http.get("/api/v1/nodes/db-2")).json()
        hist = detail["history"]
        recorded_suspect = next(h for h in hist if h["state"] == "suspect")["at"]
        recorded_down = next(h for h in hist if h["state"] == "down")["at"]
        # Not before the configured silence, and not much after it. `last` is read just after the agent
        # sent its last heartbeat, which the server may have heard a fraction of a millisecond before:
        # 1 ms of slack below (a CI run measured 2.99985 s for a 3 s silence).
        assert SUSPECT_S - 0.001 <= recorded_suspect - last <= SUSPECT_S + MARGIN_S, recorded_suspect - last
        assert DOWN_AFTER - 0.001 <= recorded_down - last <= DOWN_AFTER + MARGIN_S, recorded_down - last
        assert suspect_at - last <= SUSPECT_S + MARGIN_S + 0.5
        assert down_at - last <= DOWN_AFTER + MARGIN_S + 0.5
        # The registry watch fired on each change of the state znode.
        events = [json.loads(await asyncio.wait_for(raw.recv(), 5)) for _ in range(2)]
        assert [e["type"] for e in events] == ["changed", "changed"]
        agent.start()
        await wait_state(http, "db-2", "online", 3)
        streamed = [json.loads(await asyncio.wait_for(nodes_ws.recv(), 5)) for _ in range(3)]
        assert [(m["type"], m["node"]["state"]) for m in streamed] == [
            ("state", "suspect"),
            ("state", "down"),
            ("state", "online"),
        ]
        assert [m["revision"] for m in streamed] == sorted(m["revision"] for m in streamed)
    assert await history(http, "db-2") == [
        (None, "online"),
        ("online", "suspect"),
        ("suspect", "down"),
        ("down", "online"),
    ]
    metrics = (await http.get("/metrics")).text
    assert 'fleetmate_node_state{node="db-2",state="online"} 1.0' in metrics
    await agent.stop()


async def test_maintenance_suppresses_alarms_and_remove_forgets(nc: Client, http: httpx.AsyncClient) -> None:
    agent = Agent(nc, "db-3").start()
    await wait_state(http, "db-3", "online", 5)
    resp = await http.put("/api/v1/nodes/db-3/maintenance", json={"on": True, "reason": "kernel upgrade"})
    assert resp.status_code == 200, resp.text
    assert (resp.json()["state"], resp.json()["reason"]) == ("maintenance", "kernel upgrade")
    await agent.stop()
    # Longer than down_after in silence: still maintenance, and no alarm in the history.
    deadline = time.monotonic() + DOWN_AFTER + MARGIN_S
    while time.monotonic() < deadline:
        assert await node_state(http, "db-3") == "maintenance"
        await asyncio.sleep(0.25)
    assert await history(http, "db-3") == [(None, "online"), ("online", "maintenance")]
    # Out of maintenance: judged at once from its last heartbeat (silent for > down_after).
    resp = await http.put("/api/v1/nodes/db-3/maintenance", json={"on": False})
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "down"
    agent.start()
    await wait_state(http, "db-3", "online", 3)
    await agent.stop()

    resp = await http.delete("/api/v1/nodes/db-3", params={"reason": "decommissioned"})
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "removed"
    assert (await http.get("/api/v1/nodes/db-3")).status_code == 404
    assert (await http.get("/api/v1/registry/stat/fleet/nodes/db-3")).status_code == 404
    assert "db-3" not in {n["node_id"] for n in (await http.get("/api/v1/nodes")).json()}
    await asyncio.sleep(DOWN_AFTER / 2)  # the leader forgot it: nothing brings it back in silence
    assert (await http.get("/api/v1/nodes/db-3")).status_code == 404
    # A heartbeat registers it again (documented: stop the agent to keep a node out).
    await agent.beat()
    await wait_state(http, "db-3", "online", 3)
    assert await history(http, "db-3") == [(None, "online")]
    resp = await http.delete("/api/v1/nodes/db-3")
    assert resp.status_code == 200


async def test_requests_are_relayed_to_the_agent(nc: Client, http: httpx.AsyncClient) -> None:
    agent = Agent(nc, "db-4").start()
    asked: list[tuple[str, Any]] = []

    async def answer(msg: Msg) -> None:
        endpoint = msg.subject.rsplit(".", 1)[-1]
        body = json.loads(msg.data) if msg.data else None
        asked.append((endpoint, body))
        if endpoint == "free_ports":
            reply = {**body, "ports": list(range(body["start"], body["start"] + body["count"]))}
        elif endpoint == "clean":
            if body["rule"] == "nope":
                headers = {"Nats-Service-Error": "no rule named nope", "Nats-Service-Error-Code": "400"}
                await nc.publish(msg.reply, b"", headers=headers)
                return
            reply = {"reports": [], "dry_run": body["dry_run"]}
        else:
            reply = {"engines": [], "failures": []}
        await msg.respond(json.dumps(reply).encode())

    subs = [await nc.subscribe(f"fleetmate.agent.db-4.{name}", cb=answer) for name in ("free_ports", "clean", "scan")]

    async def ignore(msg: Msg) -> None:
        return None  # hears the request, never answers

    silent = await nc.subscribe("fleetmate.agent.db-4.ports", cb=ignore)
    await nc.flush()
    try:
        await wait_state(http, "db-4", "online", 5)
        resp = await http.get("/api/v1/nodes/db-4/ports", params={"free": "3306-3400", "count": 3})
        assert resp.status_code == 200, resp.text
        assert resp.json() == {
            "node_id": "db-4",
            "request": "free_ports",
            "answer": {"start": 3306, "end": 3400, "proto": "tcp", "count": 3, "ports": [3306, 3307, 3308]},
        }
        resp = await http.post("/api/v1/nodes/db-4/clean", json={"dry_run": True, "rule": "binlogs"})
        assert resp.status_code == 200, resp.text
        assert resp.json()["answer"] == {"reports": [], "dry_run": True}
        resp = await http.post("/api/v1/nodes/db-4/clean", json={"rule": "nope"})
        assert resp.status_code == 400
        assert "no rule named nope" in resp.json()["message"]
        resp = await http.post("/api/v1/nodes/db-4/scan")
        assert resp.status_code == 200
        assert resp.json()["answer"] == {"engines": [], "failures": []}
        assert [a[0] for a in asked] == ["free_ports", "clean", "clean", "scan"]
        assert asked[1][1] == {"dry_run": True, "rule": "binlogs"}

        # An agent that hears but does not answer, and one that is not there at all: 504, clearly.
        started = time.monotonic()
        resp = await http.get("/api/v1/nodes/db-4/ports", params={"timeout": 0.5})
        assert resp.status_code == 504
        assert time.monotonic() - started < 3
        assert resp.json()["error"] == "gateway_timeout"
        assert "did not answer ports within 0.5s" in resp.json()["message"]
        await silent.unsubscribe()
        await nc.flush()
        resp = await http.get("/api/v1/nodes/db-4/ports", params={"timeout": 0.5})
        assert resp.status_code == 504
        assert "not listening on fleetmate.agent.db-4.ports" in resp.json()["message"]
        # A replica is not an agent.
        resp = await http.post("/api/v1/nodes/t1/scan")
        assert resp.status_code == 400
        assert "replica" in resp.json()["message"]
    finally:
        for sub in subs:
            await sub.unsubscribe()
        await agent.stop()


async def test_bad_inputs_get_clear_errors_and_change_nothing(fm: Fleetmate, http: httpx.AsyncClient) -> None:
    before = await revision(http)
    cases: list[tuple[str, str, dict[str, Any], int, str]] = [
        ("GET", "/api/v1/nodes/no-such-node", {}, 404, "no node 'no-such-node' is registered"),
        ("PUT", "/api/v1/nodes/no-such-node/maintenance", {"json": {"on": True}}, 404, "no-such-node"),
        ("DELETE", "/api/v1/nodes/no-such-node", {}, 404, "no-such-node"),
        ("POST", "/api/v1/nodes/no-such-node/scan", {}, 404, "no-such-node"),
        ("GET", "/api/v1/nodes/no-such-node/ports", {"params": {"free": "3306-3400"}}, 404, "no-such-node"),
        ("GET", "/api/v1/nodes/t1/ports", {"params": {"free": "abc"}}, 400, "START-END"),
        ("GET", "/api/v1/nodes/t1/ports", {"params": {"free": "3400-3306"}}, 400, "START <= END"),
        ("GET", "/api/v1/nodes/t1/ports", {"params": {"free": "0-10"}}, 400, "1 <= START"),
        ("GET", "/api/v1/nodes/t1/ports", {"params": {"free": "3306-3400", "count": 0}}, 400, "count"),
        ("PUT", "/api/v1/nodes/t1/maintenance", {"json": {}}, 400, "on"),
        ("PUT", "/api/v1/nodes/t1/maintenance", {"json": {"on": "yes"}}, 400, "on"),
        ("PUT", "/api/v1/nodes/t1/maintenance", {"json": {"on": True, "colour": "red"}}, 400, "colour"),
        ("POST", "/api/v1/nodes/t1/clean", {"json": {"dry_run": "maybe"}}, 400, "dry_run"),
        ("GET", "/api/v1/nodes", {"params": {"state": "sleepy"}}, 400, "state"),
    ]
    for method, path, kwargs, status, needle in cases:
        resp = await http.request(method, path, **kwargs)
        assert resp.status_code == status, (method, path, kwargs, resp.text)
        body = resp.json()
        assert set(body) >= {"error", "message"}, body
        assert needle in json.dumps(body), (needle, body)
    # Writes need the admin token; reads the read token.
    async with httpx.AsyncClient(base_url=fm.url, timeout=5) as anon:
        assert (await anon.get("/api/v1/nodes")).status_code == 401
        read = {"Authorization": f"Bearer {READ}"}
        assert (await anon.get("/api/v1/nodes", headers=read)).status_code == 200
        resp = await anon.put("/api/v1/nodes/t1/maintenance", json={"on": True}, headers=read)
        assert resp.status_code == 403
        assert (await anon.delete("/api/v1/nodes/t1", headers=read)).status_code == 403
    assert await revision(http) == before
    assert await node_state(http, "t1") == "online"


async def test_cli_commands(fm: Fleetmate, nc: Client, http: httpx.AsyncClient, tmp_path: Path) -> None:
    agent = Agent(nc, "db-5", {"zone": "z9"}).start()

    async def answer(msg: Msg) -> None:
        body = json.loads(msg.data)
        await msg.respond(json.dumps({**body, "ports": [body["start"], body["start"] + 1]}).encode())

    sub = await nc.subscribe("fleetmate.agent.db-5.free_ports", cb=answer)
    env = {"FLEETMATE_ADDR": fm.url, "FLEETMATE_TOKEN": ADMIN}

    async def cli(*args: str) -> tuple[int, str, str]:
        done = await asyncio.to_thread(run_cli, ["node", *args], env, tmp_path)
        return done.returncode, done.stdout, done.stderr

    try:
        await wait_state(http, "db-5", "online", 5)
        code, out, _ = await cli("list")
        assert code == 0
        row = next(line for line in out.splitlines() if line.startswith("db-5"))
        assert "agent" in row
        assert "online" in row
        assert "zone=z9" in row
        assert any(line.startswith("t1") and "replica" in line for line in out.splitlines())
        code, out, _ = await cli("list", "--json")
        assert {n["node_id"] for n in json.loads(out)} >= {"db-5", "t1"}
        code, out, _ = await cli("show", "db-5")
        assert code == 0
        assert "state:     online" in out
        assert "registered" in out
        code, out, _ = await cli("ports", "db-5", "--free", "4000-4100", "--count", "2")
        assert (code, out.strip()) == (0, "4000 4001")
        code, out, _ = await cli("maintenance", "db-5", "on", "--reason", "disk swap")
        assert code == 0
        assert "maintenance" in out
        assert "disk swap" in out
        assert await node_state(http, "db-5") == "maintenance"
        code, out, _ = await cli("maintenance", "db-5", "off")
        assert code == 0
        assert "online" in out
        code, _, err = await cli("ports", "db-5", "--free", "99999-1")
        assert code == 1
        assert "bad_request" in err
        assert "must satisfy 1 <= START <= END <= 65535" in err
        code, _, err = await cli("show", "ghost")
        assert code == 1
        assert "not_found: no node 'ghost' is registered" in err
        await agent.stop()
        code, out, _ = await cli("remove", "db-5")
        assert code == 0
        assert "removed" in out
        assert await node_state(http, "db-5") is None
    finally:
        await sub.unsubscribe()
        await agent.stop()


async def test_states_survive_a_restart(tmp_path: Path) -> None:
    fm = Fleetmate(tmp_path / "fm", env=TIMINGS).start()
    try:
        client = await nats.connect(nats_url(fm))
        async with httpx.AsyncClient(base_url=fm.url, timeout=10) as http:
            keeper = Agent(client, "db-keep").start()
            held = Agent(client, "db-held").start()
            await wait_state(http, "db-keep", "online", 5)
            await wait_state(http, "db-held", "online", 5)
            resp = await http.put("/api/v1/nodes/db-held/maintenance", json={"on": True, "reason": "rack move"})
            assert resp.status_code == 200
            await held.stop()
            await keeper.stop()
            await client.close()
        assert await asyncio.to_thread(fm.stop) == 0
        await asyncio.to_thread(fm.restart)
        client = await nats.connect(nats_url(fm))  # the embedded server came back (its port may differ)
        # The agent is heard again only after the new leader has judged for a while: without a
        # grace period its first tick would find db-keep silent since before the restart.
        await eventually(
            lambda: asyncio.sleep(0, fm.logged("judging node states")), 10, "the restarted replica to lead"
        )
        await asyncio.sleep(SUSPECT_S / 2)
        keeper = Agent(client, "db-keep").start()
        async with httpx.AsyncClient(base_url=fm.url, timeout=10) as http:
            nodes = {n["node_id"]: n for n in (await http.get("/api/v1/nodes", params={"serializable": "true"})).json()}
            assert nodes["db-held"]["state"] == "maintenance"
            assert nodes["db-held"]["reason"] == "rack move"
            assert await history(http, "db-held") == [(None, "online"), ("online", "maintenance")]
            # A node heard again after the restart never went through suspect: the new leader's grace.
            await asyncio.sleep(SUSPECT_S + MARGIN_S)
            assert await node_state(http, "db-keep") == "online"
            assert await history(http, "db-keep") == [(None, "online")]
        await keeper.stop()
        await client.close()
    finally:
        fm.kill()


async def test_a_leader_change_does_not_flap_nodes(tmp_path: Path) -> None:
    server = NatsServer(tmp_path / "nats").start()
    rs = ReplicaSet(tmp_path, server.url, names=("r1", "r2"), env=TIMINGS)
    client: Client | None = None
    try:
        await asyncio.to_thread(rs.start)
        client = await nats.connect(server.url)
        agent = Agent(client, "db-6").start()
        leader = await asyncio.to_thread(rs.leader)
        other = next(n for n in rs.urls if n != leader)
        async with httpx.AsyncClient(base_url=rs.urls[other], timeout=10) as http:
            await wait_state(http, "db-6", "online", 5)
            await wait_state(http, leader, "online", 5)
            await wait_state(http, other, "online", 5)
            assert await asyncio.to_thread(rs[leader].stop) == 0

            async def took_over() -> bool:
                return bool((await http.get("/api/v1/cluster")).json()["role"] == "leader")

            await eventually(took_over, 15, f"{other} to lead")
            # The stopped replica goes suspect, then down; the agent and the survivor stay online.
            await wait_state(http, leader, "down", DOWN_AFTER + 2 * MARGIN_S + 2)
            assert await history(http, "db-6") == [(None, "online")]
            assert await history(http, other) == [(None, "online")]
            assert [s for _, s in await history(http, leader)][-2:] == ["suspect", "down"]
        await agent.stop()
    finally:
        if client is not None:
            await client.close()
        rs.close()
        server.stop()


def test_heartbeat_and_state_shapes() -> None:
    """The replica heartbeat carries the agents' fields; junk in a state znode is not taken for a node."""
    from app.services.membership.messages import HeardHeartbeat, ReplicaHeartbeat
    from app.services.membership.records import decode_state

    fields = set(ReplicaHeartbeat.__struct_fields__)
    assert fields >= {"node_id", "kind", "labels", "seq", "sent_at", "started_at", "version", "host", "facts_rev"}
    beat = msgspec.json.decode(b'{"node_id": "x", "seq": 3, "sent_at": 1.5, "new_field": [1]}', type=HeardHeartbeat)
    assert (beat.node_id, beat.kind, beat.labels, beat.facts_rev) == ("x", "agent", {}, None)
    assert decode_state("x", b'{"state": "sleepy", "since": 1, "last_seen": 1}') is None
    assert decode_state("x", b"not json") is None
