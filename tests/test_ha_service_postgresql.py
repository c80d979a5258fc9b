"""HA end to end on real PostgreSQL: discovery from a standby, kill -9 of the primary, automatic failover, rejoin.

A fleetmate process, a fleetmate agent on the same host, and a PostgreSQL 15 primary with two
streaming standbys, synchronous commit on the first (tests/harness/postgres.py); a writer records
every commit the primary acknowledged. The killed primary, started again, comes back writable:
fleetmate sets it read-only and the agent rewinds it (pg_rewind) into a standby of the new one.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from websockets.sync.client import connect as ws_connect

from tests.harness import Fleetmate, free_port, running, wait_for
from tests.harness.agent import Agent, agent_running
from tests.harness.postgres import PostgresReplicaSet
from tests.harness.servers import PG_BIN, PG_USER

CLUSTERS = "/api/v1/ha/clusters"


@pytest.fixture(scope="module")
def pgset() -> Iterator[PostgresReplicaSet]:
    replicas = PostgresReplicaSet(3, synchronous="first").start()
    try:
        yield replicas
    finally:
        # An instance the agent restarted (pg_ctl) is not the harness's process: stop it by its data dir.
        for i in range(3):
            data = replicas.data_dir(i)
            if (data / "postmaster.pid").exists():
                subprocess.run(
                    ["runuser", "-u", PG_USER, "--", str(PG_BIN / "pg_ctl"), "stop", "-D", str(data), "-m", "fast"],
                    check=False,
                    capture_output=True,
                )
        replicas.stop()


@pytest.fixture(scope="module")
def nats_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory, pgset: PostgresReplicaSet, nats_port: int) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("ha-pg")
    secrets = tmp / "ha-secrets.toml"
    admin, repl = PostgresReplicaSet.admin, PostgresReplicaSet.replication
    secrets.write_text(
        "[clusters.pg]\n"
        f'user = "{admin.user}"\npassword = "{admin.password}"\n'
        f'replication_user = "{repl.user}"\nreplication_password = "{repl.password}"\n'
    )
    secrets.chmod(0o600)
    env = {
        "FLEETMATE_HA_SECRETS_FILE": str(secrets),
        "FLEETMATE_HA_POLL_INTERVAL": "0.5",
        "FLEETMATE_NATS_PORT": str(nats_port),
        "FLEETMATE_MEMBERSHIP_HEARTBEAT_INTERVAL": "0.5",
    }
    with running(Fleetmate(tmp, env=env)) as server:
        yield server


def _primary(fm: Fleetmate) -> str:
    reply = fm.get("/api/v1/registry/nodes/fleet/clusters/pg/primary")
    return str(reply.json()["data"]) if reply.status_code == 200 else ""


def test_discovery_and_failover_keep_every_acknowledged_commit(fm: Fleetmate, pgset: PostgresReplicaSet) -> None:
    seeds = pgset.addresses
    reply = fm.post(CLUSTERS, json={"name": "pg", "dsn": f"postgresql://fleetmate_ha@{seeds[2]}/postgres"})
    assert reply.status_code == 201, reply.text
    view = reply.json()
    assert view["primary"] == str(seeds[0])
    roles = {i["address"]: i["role"] for i in view["instances"]}
    assert roles == {str(seeds[0]): "primary", str(seeds[1]): "replica", str(seeds[2]): "replica"}
    primary_record = next(i for i in view["instances"] if i["address"] == str(seeds[0]))
    assert primary_record["sync_replication"] is True

    pgset.sql(0, "CREATE TABLE acked (id bigint PRIMARY KEY)")
    acked: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(target=_write, args=(seeds[0].port, acked, stop), daemon=True)
    writer.start()
    wait_for(lambda: len(acked) >= 100, 30, "the writer's first commits")
    pgset.kill(0)
    new = wait_for(lambda: (p := _primary(fm)) != str(seeds[0]) and p, 30, "the registry's primary key to change")
    stop.set()
    writer.join(10)
    assert new in (str(seeds[1]), str(seeds[2]))
    i_new = 1 if new == str(seeds[1]) else 2
    assert pgset.sql(i_new, "SELECT pg_is_in_recovery()").strip() == "f"
    have = {int(x) for x in pgset.sql(i_new, "SELECT id FROM acked").split()}
    assert set(acked) <= have, f"lost acknowledged rows: {sorted(set(acked) - have)[:10]}"
    # The new primary waits for a standby as the old one did, from before its first write.
    assert pgset.sql(i_new, "SHOW synchronous_standby_names").strip() == "ANY 1 (*)"
    i_other = 3 - i_new
    pgset.sql(i_new, "INSERT INTO acked VALUES (-1)")
    pgset.wait_row(i_other, "SELECT count(*) FROM acked WHERE id = -1", "1", timeout=30)
    history = [e["message"] for e in fm.get(f"{CLUSTERS}/pg/history").json()]
    assert any(m.startswith("DeadPrimary") for m in history), history
    assert any(m.startswith(f"promoted {new}") for m in history), history


def test_old_primary_comes_back_and_is_rewound_into_a_standby(
    fm: Fleetmate, pgset: PostgresReplicaSet, nats_port: int, tmp_path: Path
) -> None:
    """Runs after the failover above: node 0 is the dead old primary."""
    new = _primary(fm)
    assert new, "needs the failover test first"
    assert new != str(pgset.addresses[0]), "needs the failover test first"
    i_new = 1 if new == str(pgset.addresses[1]) else 2
    agent = Agent(
        tmp_path / "agent",
        {"FLEETMATE_NODE_ID": "pg-host", "FLEETMATE_NATS_URL": f"nats://127.0.0.1:{nats_port}"},
    )
    with agent_running(agent):
        # The agent must be known (with its ports) before the old primary comes back.
        wait_for(lambda: fm.get("/api/v1/nodes/pg-host").status_code == 200, 20, "the agent's node record")
        pgset.start_node(0)  # as after a crash: no standby.signal, so it starts as a writable primary
        old = str(pgset.addresses[0])

        def rejoined() -> bool:
            return any(
                e["message"].startswith(f"{old} rejoined as a standby of {new}")
                for e in fm.get(f"{CLUSTERS}/pg/history").json()
            )

        try:
            wait_for(rejoined, 90, "the old primary to be rewound into a standby")
        except AssertionError as exc:
            errors = [line for line in agent.lines if line.get("level") in ("warning", "error")]
            history = [e["message"] for e in fm.get(f"{CLUSTERS}/pg/history").json()][-10:]
            raise AssertionError(f"{exc}; agent: {errors}; history: {history}") from None
        wait_for(lambda: _sql_as_owner(pgset, 0, "SELECT pg_is_in_recovery()") == "t", 30, "node 0 in recovery")
        pgset.sql(i_new, "INSERT INTO acked VALUES (-2)")
        wait_for(
            lambda: _sql_as_owner(pgset, 0, "SELECT count(*) FROM acked WHERE id = -2") == "1",
            30,
            "a row written on the new primary to reach the rejoined standby",
        )
        history = [e["message"] for e in fm.get(f"{CLUSTERS}/pg/history").json()]
        assert any(m == f"{old} came back writable: set read-only" for m in history), history
        assert agent.logged("PostgreSQL former primary rejoined")
        view = fm.get(f"{CLUSTERS}/pg").json()
        assert not [a for a in view["analyses"] if a["kind"] == "SplitBrain"], view["analyses"]


def test_manual_failover_when_anti_flapping_blocks_streamed_over_the_websocket(
    fm: Fleetmate, pgset: PostgresReplicaSet
) -> None:
    """Runs after the two above: the current primary dies within recovery_block_seconds."""
    current = _primary(fm)
    i_cur = [str(a) for a in pgset.addresses].index(current)
    standbys = [str(a) for i, a in enumerate(pgset.addresses) if i != i_cur]

    def settled() -> dict[str, Any] | None:
        # The rejoined standby's record changes with the leader's next poll.
        tree: dict[str, Any] = fm.get(f"{CLUSTERS}/pg/topology").json()
        return tree if [r["address"] for r in tree["roots"]] == [current] else None

    tree = wait_for(settled, 20, "every standby under the primary in the topology")
    assert tree["primary"] == current
    assert sorted(n["address"] for n in tree["roots"][0]["replicas"]) == sorted(standbys)
    assert tree["roots"][0]["state"].startswith("primary, writable")

    # Refused while the primary lives, and for bad input; nothing changes.
    before = len(fm.get(f"{CLUSTERS}/pg/history").json())
    alive = fm.post(f"{CLUSTERS}/pg/failover", json={})
    assert alive.status_code == 409, alive.text
    assert "is up: use a switchover" in alive.json()["message"]
    assert fm.post(f"{CLUSTERS}/nope/failover", json={}).status_code == 404
    bad = fm.post(f"{CLUSTERS}/pg/failover", json={"to": "not-an-address"})
    assert bad.status_code == 400, bad.text
    assert fm.post(f"{CLUSTERS}/pg/failover", json={"to": "127.0.0.1:1", "x": 1}).status_code == 400
    assert _primary(fm) == current
    assert len(fm.get(f"{CLUSTERS}/pg/history").json()) == before

    ws_url = fm.url.replace("http://", "ws://") + "/api/v1/ha/watch?cluster=pg"
    with ws_connect(ws_url, open_timeout=5) as ws:
        ready = json.loads(ws.recv(5))
        assert ready["type"] == "ready"
        assert ready["clusters"][0]["primary"] == current
        pgset.kill(i_cur)

        def blocked() -> bool:
            return any(
                e["kind"] == "blocked" and "anti-flapping" in e["message"]
                for e in fm.get(f"{CLUSTERS}/pg/history").json()
            )

        wait_for(blocked, 30, "the automatic recovery to be blocked by anti-flapping")
        assert _primary(fm) == current
        outsider = fm.post(f"{CLUSTERS}/pg/failover", json={"to": "127.0.0.1:1"})
        assert outsider.status_code == 400, outsider.text
        assert "is not an instance of cluster 'pg'" in outsider.json()["message"]
        reply = fm.post(f"{CLUSTERS}/pg/failover", json={}, timeout=90)
        assert reply.status_code == 200, reply.text
        new = reply.json()["primary"]
        assert new in standbys
        streamed: list[dict[str, Any]] = []
        while not any(m["type"] == "primary" for m in streamed):
            streamed.append(json.loads(ws.recv(10)))
        primary_msg = next(m for m in streamed if m["type"] == "primary")
        assert (primary_msg["cluster"], primary_msg["primary"]) == ("pg", new)
        kinds = {m["type"] for m in streamed}
        assert {"history", "instance"} <= kinds, kinds
    history = [e["message"] for e in fm.get(f"{CLUSTERS}/pg/history").json()]
    assert any(m.startswith(f"manual failover of dead primary {current}") for m in history), history
    assert pgset.sql([str(a) for a in pgset.addresses].index(new), "SELECT pg_is_in_recovery()").strip() == "f"


def test_switchover_loses_nothing_and_the_old_primary_is_rejoined_as_a_standby(
    fm: Fleetmate, pgset: PostgresReplicaSet, nats_port: int, tmp_path: Path
) -> None:
    """Runs after the three above: one primary and one streaming standby are left."""
    addresses = [str(a) for a in pgset.addresses]
    old = _primary(fm)
    i_old = addresses.index(old)

    def streaming_standby() -> str | None:
        # A standby the topology shows under the primary (repointed by the failover before).
        roots = fm.get(f"{CLUSTERS}/pg/topology").json()["roots"]
        under = [n for r in roots if r["address"] == old for n in r["replicas"] if n["instance"]["reachable"]]
        return str(under[0]["address"]) if under else None

    target = wait_for(streaming_standby, 30, "a standby streaming from the primary")
    i_target = addresses.index(target)
    pgset.sql(i_old, "INSERT INTO acked SELECT -1000 - g FROM generate_series(1, 100) g")
    # The same host's agent again (a second node id on one host would make every socket ambiguous).
    agent = Agent(
        tmp_path / "agent",
        {"FLEETMATE_NODE_ID": "pg-host", "FLEETMATE_NATS_URL": f"nats://127.0.0.1:{nats_port}"},
    )
    with agent_running(agent):
        wait_for(lambda: fm.get("/api/v1/nodes/pg-host").status_code == 200, 20, "the agent's node record")
        reply = fm.post(f"{CLUSTERS}/pg/switchover", json={"to": target}, timeout=90)
        assert reply.status_code == 200, reply.text
        assert reply.json()["primary"] == target
        assert _sql_as_owner(pgset, i_target, "SELECT pg_is_in_recovery()") == "f"
        moved = "SELECT count(*) FROM acked WHERE id BETWEEN -1100 AND -1001"
        assert _sql_as_owner(pgset, i_target, moved) == "100"

        def rejoined() -> bool:
            return any(
                e["message"].startswith(f"{old} rejoined as a standby of {target}")
                for e in fm.get(f"{CLUSTERS}/pg/history").json()
            )

        try:
            wait_for(rejoined, 90, "the old primary to be rejoined as a standby")
        except AssertionError as exc:
            history = [e["message"] for e in fm.get(f"{CLUSTERS}/pg/history").json()][-10:]
            raise AssertionError(f"{exc}; history: {history}") from None
        pgset.sql(i_target, "INSERT INTO acked VALUES (-3)")
        wait_for(
            lambda: _sql_as_owner(pgset, i_old, "SELECT count(*) FROM acked WHERE id = -3") == "1",
            30,
            "a row written on the new primary to reach the old one",
        )
        assert _sql_as_owner(pgset, i_old, "SELECT pg_is_in_recovery()") == "t"


def _sql_as_owner(pgset: PostgresReplicaSet, i: int, statement: str) -> str:
    try:
        return pgset.sql(i, statement).strip()
    except Exception:
        return ""


def _write(port: int, acked: list[int], stop: threading.Event) -> None:
    """Insert rows one by one; record each id once its commit returned (the synchronous standby has it)."""

    async def run() -> None:
        admin = PostgresReplicaSet.admin
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=admin.user, password=admin.password, database="postgres"
        )
        i = 0
        try:
            while not stop.is_set():
                i += 1
                await conn.execute("INSERT INTO acked VALUES ($1)", i)
                acked.append(i)
        except Exception:
            return  # the primary died: what was acknowledged is in `acked`

    asyncio.run(run())
