"""Shared fixtures: real servers on free ports in temporary directories."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import NatsServer
from tests.harness.servers import MariaDB, Postgres, SeaweedS3


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
