"""What only the MySQL/MariaDB adaptor does, on a real MariaDB GTID + semi-sync replica set: GTID
positions, semi-sync on repoint, a refused replication user, a stopped SQL thread, errant GTIDs.

The contract every adaptor keeps (discovery, probes, errors, read_only, repoint, wait_applied,
failover) is tests/test_adaptors.py. Both share the session's set (tests/conftest.py: primary 0,
replicas 1 and 2, table app.acked); the errant-GTID case breaks a replica for good and so runs after
every other test, the contract suite's failover included (breaks_replica_set).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from app.adaptors.base import AdaptorError
from app.adaptors.mysql import MySQLAdaptor
from app.adaptors.positions import gtid_covers, mariadb_gtids, mysql_gtids
from app.adaptors.types import Address, Credentials, InstanceStatus
from app.services.ha.credentials import parse_seed
from app.services.ha.errors import BadClusterRequest
from tests.harness import eventually
from tests.harness.mariadb import MariaDBReplicaSet

pytestmark = pytest.mark.slow

TABLE = "app.acked"


@pytest.fixture
def rs(mariadb_replicas: MariaDBReplicaSet) -> MariaDBReplicaSet:
    """The session's set (tests/conftest.py): primary 0, replicas 1 and 2, GTID strict mode and semi-sync."""
    return mariadb_replicas


def adaptor_for(rs: MariaDBReplicaSet, **kw: Any) -> MySQLAdaptor:
    return MySQLAdaptor(rs.admin, replication=rs.replication, **kw)


# --- pure helpers ------------------------------------------------------------------------------


def test_seed_dsn_parsing_and_its_errors_never_show_the_password() -> None:
    engine, address, user, database = parse_seed("mysql://fleet%40ops@db1.example:3307/app")
    assert (engine, address, user, database) == ("mysql", Address("db1.example", 3307), "fleet@ops", "app")
    assert parse_seed("mariadb://u@h")[:2] == ("mysql", Address("h", 3306))
    assert parse_seed("postgresql://u@h/db")[:2] == ("postgresql", Address("h", 5432))
    assert repr(Credentials("u", "s3cr:t")) == "Credentials(user='u', password='***', database='')"
    for dsn, complaint in (
        ("redis://u@h/db", "must start with one of"),
        ("mysql://u@h:99999/db", "malformed"),
        ("mysql://u@/db", "no host"),
        ("mysql://u:TopSecret99@h/db", "carries a password"),
    ):
        with pytest.raises(BadClusterRequest, match=complaint) as caught:
            parse_seed(dsn)
        assert "TopSecret99" not in str(caught.value)


def test_gtid_positions_compare_per_domain_and_per_interval() -> None:
    assert mariadb_gtids("0-1-100, 1-2-7") == {0: (1, 100), 1: (2, 7)}
    assert gtid_covers("mariadb", "0-2-101,1-1-5", "0-1-100")
    assert not gtid_covers("mariadb", "0-1-99", "0-1-100")
    assert not gtid_covers("mariadb", "0-1-100", "0-1-100,1-1-1")
    assert gtid_covers("mariadb", "0-1-5", "")
    with pytest.raises(ValueError, match="not a MariaDB GTID"):
        mariadb_gtids("0-1")
    uuid_a, uuid_b = "3e11fa47-71ca-11e1-9e33-c80aa9429562", "4e11fa47-71ca-11e1-9e33-c80aa9429562"
    assert mysql_gtids(f"{uuid_a}:1-5:7,\n{uuid_b}:3") == {uuid_a: [(1, 5), (7, 7)], uuid_b: [(3, 3)]}
    assert gtid_covers("mysql", f"{uuid_a}:1-10,{uuid_b}:1-3", f"{uuid_a}:2-5:7,{uuid_b}:3")
    assert not gtid_covers("mysql", f"{uuid_a}:1-5:7", f"{uuid_a}:6")
    assert not gtid_covers("mysql", f"{uuid_a}:1-5", f"{uuid_b}:1")


# --- repoint and wait_applied, MySQL/MariaDB only -----------------------------------------------


async def test_repoint_refuses_itself_and_a_refused_replication_user_and_turns_semi_sync_master_off(
    rs: MariaDBReplicaSet,
) -> None:
    adaptor = adaptor_for(rs)
    primary, replica = rs.addresses[0], rs.addresses[2]
    with pytest.raises(AdaptorError, match="from itself"):
        await adaptor.repoint(replica, replica)
    wrong = Credentials(rs.replication.user, "wrong-Repl-Secret-88")
    with pytest.raises(AdaptorError, match="refused the replication user 'repl'") as caught:
        await MySQLAdaptor(rs.admin, replication=wrong).repoint(replica, primary)
    assert wrong.password not in str(caught.value)
    assert "Access denied" in str(caught.value)
    # A replica with the semi-sync master side on would hold its applier's commits for the whole
    # timeout (no semi-sync replica of its own): repoint turns that side off.
    rs.sql(2, "SET GLOBAL rpl_semi_sync_master_enabled = ON")
    await adaptor.repoint(replica, primary)
    status = await adaptor.probe(replica)
    assert status.extra["semi_sync_master_enabled"] == "OFF"
    assert status.replication is not None
    assert status.replication.source == primary
    assert status.replication.receiving
    assert status.replication.applying
    rs.wait_replicated()


async def test_wait_applied_fails_at_once_on_a_stopped_sql_thread(rs: MariaDBReplicaSet) -> None:
    adaptor = adaptor_for(rs)
    replica = rs.addresses[1]
    # Given a stopped SQL thread with received but unapplied transactions: an error at once
    rs.sql(1, "STOP SLAVE SQL_THREAD")
    try:
        rs.sql(0, f"INSERT INTO {TABLE} (id, step) VALUES (-4, 'stopped')")
        await eventually(
            lambda: asyncio.sleep(0, rs.value(1, "SELECT @@gtid_slave_pos") != rs.value(0, "SELECT @@gtid_binlog_pos")),
            5,
            "the replica to receive without applying",
        )
        started = time.monotonic()
        with pytest.raises(AdaptorError, match=r"cannot apply the relay log up to .*: the SQL thread is stopped"):
            await adaptor.wait_applied(replica, 30)
        assert time.monotonic() - started < 2
    finally:
        rs.sql(1, "START SLAVE SQL_THREAD")
    rs.wait_replicated()


# --- errant GTIDs (breaks a replica: last) -------------------------------------------------------


@pytest.mark.breaks_replica_set(2)
async def test_an_errant_transaction_on_a_replica_is_reported_and_repoint_refuses_it(rs: MariaDBReplicaSet) -> None:
    adaptor = adaptor_for(rs, repoint_timeout=5)
    topology = await adaptor.discover(rs.addresses[0])
    (primary,) = topology.primaries()
    replica = next(s for s in topology.instances if s.role == "replica")
    p_i, r_i = rs.addresses.index(primary.address), rs.addresses.index(replica.address)

    # Given a write made on the replica itself (root passes read_only): an errant GTID, then a
    # write on the primary that takes the same sequence number in the same GTID domain
    rs.sql(r_i, f"INSERT INTO {TABLE} (id, step) VALUES (-100, 'errant')")
    errant = rs.value(r_i, "SELECT @@GLOBAL.gtid_binlog_pos")
    rs.sql(p_i, f"INSERT INTO {TABLE} (id, step) VALUES (-101, 'primary')")

    # Then the probe names the errant GTID, and the replica's applier stops on gtid_strict_mode
    async def stopped() -> InstanceStatus | None:
        status = await adaptor.probe(replica.address)
        return status if status.replication is not None and not status.replication.applying else None

    status = await eventually(stopped, 15, "the replica's SQL thread to stop")
    assert status.extra["errant_gtids"] == errant
    assert status.replication is not None
    assert "out-of-order" in status.replication.last_error, status.replication.last_error

    # And repointing it fails clearly: the source cannot serve a position holding the errant GTID
    with pytest.raises(AdaptorError, match="errant GTIDs") as caught:
        await adaptor.repoint(replica.address, primary.address)
    assert caught.value.address == replica.address
    assert "1236" in str(caught.value)
