"""Shared fixtures: real servers on free ports in temporary directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import NatsServer
from tests.harness.mariadb import MariaDBReplicaSet
from tests.harness.postgres import PostgresReplicaSet
from tests.harness.servers import MariaDB, Postgres, SeaweedS3

BREAKS_REPLICA_SET = "breaks_replica_set"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        f"{BREAKS_REPLICA_SET}(order): changes a shared replica set for good, so runs after every other test "
        "(such tests in `order`, then in collection order)",
    )


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that break a session's replica set (a failover, an errant GTID) after all the others."""

    def key(item: pytest.Item) -> int:
        mark = item.get_closest_marker(BREAKS_REPLICA_SET)
        return -1 if mark is None else int(mark.args[0])

    items.sort(key=key)  # stable: the others keep their order


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[NatsServer]:
    """A fresh nats-server with JetStream for one test."""
    server = NatsServer(tmp_path / "nats").start()
    try:
        yield server
    finally:
        server.stop()


# Database and object-store servers are slow to start (SeaweedFS ~4-6 s): one each per test
# session. Tests keep out of each other's way with their own lease name, table prefix or key prefix.


@pytest.fixture(scope="session")
def mariadb() -> Iterator[MariaDB]:
    """A MariaDB server for the whole session; `.dsn` reaches its `fleetmate` database."""
    server = MariaDB()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def postgres() -> Iterator[Postgres]:
    """A PostgreSQL 15 server for the whole session; `.dsn` reaches its `fleetmate` database."""
    server = Postgres()
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[SeaweedS3]:
    """A SeaweedFS S3 gateway for the whole session: `.endpoint`, `.access_key`, `.secret_key`."""
    server = SeaweedS3()
    try:
        yield server.start()
    finally:
        server.stop()


# The HA replica sets (3 instances each) are shared by the adaptor contract suite
# (tests/test_adaptors.py) and the engine-only tests (tests/test_ha_mysql.py,
# tests/test_ha_postgresql.py). Every test leaves the topology as it found it, except those marked
# breaks_replica_set, which run last.


@pytest.fixture(scope="session")
def mariadb_replicas() -> Iterator[MariaDBReplicaSet]:
    """Primary 0, replicas 1 and 2, GTID strict mode and semi-sync on every instance; table app.acked."""
    replica_set = MariaDBReplicaSet(3, semi_sync=True)
    replica_set.start()
    try:
        replica_set.sql(0, "CREATE TABLE app.acked (id BIGINT PRIMARY KEY, step VARCHAR(20) NOT NULL)")
        replica_set.wait_replicated()
        yield replica_set
    finally:
        replica_set.stop()


@pytest.fixture(scope="session")
def postgres_replicas() -> Iterator[PostgresReplicaSet]:
    """Primary 0, standbys 1 and 2, `FIRST 1 (standby 1)` with synchronous_commit on; table acked."""
    replica_set = PostgresReplicaSet(3, synchronous="first")
    replica_set.start()
    try:
        replica_set.sql(0, "CREATE TABLE acked (id bigint PRIMARY KEY)")
        replica_set.wait_streaming()
        yield replica_set
    finally:
        replica_set.stop()
