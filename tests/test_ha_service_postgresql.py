"""HA end to end on real PostgreSQL: discovery from a standby, kill -9 of the primary, automatic failover.

A fleetmate process and a PostgreSQL 15 primary with two streaming standbys, synchronous commit
on the first (tests/ha_postgres.py); a writer records every commit the primary acknowledged.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from tests.ha_postgres import PostgresReplicaSet
from tests.harness import Fleetmate, running, wait_for

CLUSTERS = "/api/v1/ha/clusters"


@pytest.fixture(scope="module")
def pgset() -> Iterator[PostgresReplicaSet]:
    replicas = PostgresReplicaSet(3, synchronous="first").start()
    try:
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory, pgset: PostgresReplicaSet) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("ha-pg")
    secrets = tmp / "ha-secrets.toml"
    admin, repl = PostgresReplicaSet.admin, PostgresReplicaSet.replication
    secrets.write_text(
        "[clusters.pg]\n"
        f'user = "{admin.user}"\npassword = "{admin.password}"\n'
        f'replication_user = "{repl.user}"\nreplication_password = "{repl.password}"\n'
    )
    secrets.chmod(0o600)
    env = {"FLEETMATE_HA_SECRETS_FILE": str(secrets), "FLEETMATE_HA_POLL_INTERVAL": "0.5"}
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
    i_other = 3 - i_new
    pgset.sql(i_new, "INSERT INTO acked VALUES (-1)")
    pgset.wait_row(i_other, "SELECT count(*) FROM acked WHERE id = -1", "1", timeout=30)
    history = [e["message"] for e in fm.get(f"{CLUSTERS}/pg/history").json()]
    assert any(m.startswith("DeadPrimary") for m in history), history
    assert any(m.startswith(f"promoted {new}") for m in history), history


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
