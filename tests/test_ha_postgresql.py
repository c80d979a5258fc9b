"""What only the PostgreSQL adaptor does, on a real streaming-replication set: LSNs and conninfo, naming
standbys (members mapping), quorum commit, refusing to repoint a primary.

The contract every adaptor keeps (discovery, probes, errors, read_only, repoint, wait_applied, a
failover with rejoin) is tests/test_adaptors.py. Both share the session's set (tests/conftest.py:
primary + 2 standbys, synchronous commit on standby 1); the contract suite's failover runs after
these tests.
"""

from __future__ import annotations

import pytest

from app.adaptors.base import AdaptorError
from app.adaptors.conninfo import format_conninfo, parse_conninfo
from app.adaptors.positions import lsn_value
from app.adaptors.postgresql import PostgresAdaptor
from app.adaptors.types import Address, InstanceStatus
from tests.harness import eventually
from tests.harness.postgres import PostgresReplicaSet

pytestmark = pytest.mark.slow


@pytest.fixture
def pgset(postgres_replicas: PostgresReplicaSet) -> PostgresReplicaSet:
    """The session's set (tests/conftest.py): primary 0, standbys 1 and 2; `FIRST 1 (standby 1)`."""
    return postgres_replicas


def adaptor_for(pgset: PostgresReplicaSet) -> PostgresAdaptor:
    return PostgresAdaptor(pgset.admin, replication=pgset.replication)


# --- pure helpers ------------------------------------------------------------------------------


def test_lsn_and_conninfo_helpers() -> None:
    assert lsn_value("0/3000060") < lsn_value("0/3000148") < lsn_value("1/0")
    assert lsn_value("16/B374D848") == (0x16 << 32) | 0xB374D848
    with pytest.raises(ValueError, match="not an LSN"):
        lsn_value("3000060")
    params = {"host": "db 1", "password": "it's\\x", "application_name": "10.0.0.2:5432"}
    assert parse_conninfo(format_conninfo(params)) == params
    assert parse_conninfo("host = h1 port=5433  user=rep sslmode=prefer") == {
        "host": "h1",
        "port": "5433",
        "user": "rep",
        "sslmode": "prefer",
    }
    assert parse_conninfo("postgresql://rep@[::1]:5434/db?application_name=s1") == {
        "host": "::1",
        "port": "5434",
        "user": "rep",
        "application_name": "s1",
    }
    with pytest.raises(ValueError, match="malformed connection string"):
        parse_conninfo("host='h1")


# --- PostgreSQL only: naming standbys, quorum commit, a primary cannot be repointed ------------


async def test_members_mapping_names_replicas_the_convention_cannot(pgset: PostgresReplicaSet) -> None:
    primary, sync, potential = pgset.addresses
    aliases = {str(sync): Address("localhost", sync.port)}
    status = await PostgresAdaptor(pgset.admin, members=aliases).probe(primary)
    assert status.replicas == tuple(sorted([Address("localhost", sync.port), potential]))
    assert status.sync_replicas == (Address("localhost", sync.port),)


async def test_quorum_commit_lists_every_quorum_standby(pgset: PostgresReplicaSet) -> None:
    adaptor = adaptor_for(pgset)
    primary, sync, potential = pgset.addresses
    quorum = f'ANY 1 ("{sync}", "{potential}")'
    pgset.sql(0, f"ALTER SYSTEM SET synchronous_standby_names = '{quorum}'")
    pgset.sql(0, "SELECT pg_reload_conf()")
    try:
        status = await eventually(
            lambda: _sync_replicas(adaptor, primary, (sync, potential)), 10, "both standbys in quorum state"
        )
        assert status.sync_replication
        assert status.extra["synchronous_standby_names"] == quorum
    finally:
        pgset.sql(0, f"ALTER SYSTEM SET synchronous_standby_names = '{pgset.sync_names}'")
        pgset.sql(0, "SELECT pg_reload_conf()")
    await eventually(lambda: _sync_replicas(adaptor, primary, (sync,)), 10, "the FIRST 1 standby in sync state")


async def _sync_replicas(
    adaptor: PostgresAdaptor, address: Address, expected: tuple[Address, ...]
) -> InstanceStatus | None:
    status = await adaptor.probe(address)
    return status if status.sync_replicas == tuple(sorted(expected)) else None


async def test_repoint_refuses_a_primary(pgset: PostgresReplicaSet) -> None:
    primary, sync, _ = pgset.addresses
    with pytest.raises(AdaptorError, match="this is a primary; it must be rewound"):
        await adaptor_for(pgset).repoint(primary, sync)
