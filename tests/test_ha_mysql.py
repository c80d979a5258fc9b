"""The MySQL/MariaDB HA adaptor on a real MariaDB GTID + semi-sync replica set: discovery, probes,
errors, read_only, and a manual failover with fencing of the old primary.

One set (primary 0, replicas 1 and 2) serves the whole module; the failover scenario changes it
for good and so runs last (pytest keeps the file's order).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import asyncmy
import pytest
from asyncmy import errors

from app.adaptors.base import AdaptorError
from app.adaptors.mysql import MySQLAdaptor
from app.adaptors.positions import gtid_covers, mariadb_gtids, mysql_gtids
from app.adaptors.types import Address, Credentials, InstanceStatus
from app.services.ha.credentials import parse_seed
from app.services.ha.errors import BadClusterRequest
from tests.ha_mariadb import MariaDBReplicaSet
from tests.harness import free_port

pytestmark = pytest.mark.slow

T = TypeVar("T")
TABLE = "app.acked"


@pytest.fixture(scope="module")
def rs() -> Iterator[MariaDBReplicaSet]:
    """Primary 0, replicas 1 and 2, GTID strict mode and semi-sync on every instance."""
    replica_set = MariaDBReplicaSet(3, semi_sync=True)
    replica_set.start()
    try:
        replica_set.sql(0, f"CREATE TABLE {TABLE} (id INT PRIMARY KEY, step VARCHAR(20) NOT NULL)")
        replica_set.wait_replicated()
        yield replica_set
    finally:
        replica_set.stop()


def adaptor_for(rs: MariaDBReplicaSet, **kw: Any) -> MySQLAdaptor:
    return MySQLAdaptor(rs.admin, replication=rs.replication, **kw)


async def eventually(check: Callable[[], Awaitable[T]], timeout: float, what: str) -> T:
    """Await check() until it returns a truthy value; fail naming `what` after timeout seconds."""
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last: {last!r})")


async def app_connect(rs: MariaDBReplicaSet, i: int) -> Any:
    """A connection as the application user (no READ ONLY ADMIN, so read_only applies to it)."""
    return await asyncmy.connect(
        host="127.0.0.1",
        port=rs.instances[i].port,
        user=rs.app.user,
        password=rs.app.password,
        db=rs.app.database,
        autocommit=True,
        connect_timeout=5,
    )


async def insert(conn: Any, row_id: int, step: str) -> None:
    async with conn.cursor() as cur:
        await cur.execute(f"INSERT INTO {TABLE} (id, step) VALUES (%s, %s)", (row_id, step))


def ids_on(rs: MariaDBReplicaSet, i: int) -> set[int]:
    return {int(line) for line in rs.sql(i, f"SELECT id FROM {TABLE}").split()}


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


# --- discovery and probes ----------------------------------------------------------------------


async def test_discovery_from_any_instance_finds_roles_sources_replicas_positions_and_semi_sync(
    rs: MariaDBReplicaSet,
) -> None:
    adaptor = adaptor_for(rs)
    primary, *replicas = rs.addresses
    position = ",".join(sorted(rs.wait_replicated()))
    for seed in rs.addresses:
        topology = await adaptor.discover(seed)
        assert [s.address for s in topology.instances] == sorted(rs.addresses), f"seed {seed}"
        by_address = {s.address: s for s in topology.instances}
        assert all(s.reachable and s.engine == "mysql" for s in topology.instances)
        assert [p.address for p in topology.primaries()] == [primary]
        assert len({s.server_id for s in topology.instances}) == 3

        top = by_address[primary]
        assert top.role == "primary"
        assert top.read_only is False
        assert top.replication is None
        assert set(top.replicas) == set(replicas)
        assert top.position == position
        assert "MariaDB" in top.version
        assert top.extra["flavor"] == "mariadb"
        assert top.sync_replication is True
        assert top.extra["semi_sync_master_clients"] == "2"
        assert top.extra["gtid_strict_mode"] == "ON"

        for address in replicas:
            replica = by_address[address]
            link = replica.replication
            assert replica.role == "replica", replica
            assert replica.read_only is True
            assert link is not None
            assert link.source == primary
            assert link.receiving
            assert link.applying
            assert link.last_error == ""
            assert link.lag_seconds == 0
            assert link.received_position == position
            assert link.applied_position == position
            assert replica.position == position
            assert replica.replicas == ()
            assert replica.sync_replication is False  # a replica's own commits wait for nobody
            assert replica.extra["semi_sync_slave_status"] == "ON"
            assert replica.extra["auto_position"] == "Slave_Pos"


async def test_probe_of_a_port_nobody_listens_on_is_unreachable_with_a_clear_error(rs: MariaDBReplicaSet) -> None:
    nowhere = Address("127.0.0.1", free_port())
    status = await adaptor_for(rs).probe(nowhere)
    assert status.reachable is False
    assert status.role == "unknown"
    assert status.error.startswith(f"{nowhere}: cannot connect"), status.error


async def test_wrong_password_is_a_clear_error_that_never_shows_the_password(rs: MariaDBReplicaSet) -> None:
    secret = "not-the-Password-4711"
    adaptor = MySQLAdaptor(Credentials(rs.admin.user, secret), replication=Credentials("repl", secret))
    primary = rs.addresses[0]
    status = await adaptor.probe(primary)
    assert status.reachable is False
    assert status.error.startswith(f"{primary}: access denied for user 'fleetmate'"), status.error
    assert secret not in status.error
    for attempt in (
        adaptor.set_read_only(primary, True),
        adaptor.promote(primary),
        adaptor.repoint(rs.addresses[1], primary),
        adaptor.wait_applied(rs.addresses[1], 1),
    ):
        with pytest.raises(AdaptorError, match="access denied") as caught:
            await attempt
        assert caught.value.address in rs.addresses
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value)
    assert rs.value(0, "SELECT @@read_only") == "0"  # nothing changed


async def test_read_only_refuses_then_accepts_application_writes(rs: MariaDBReplicaSet) -> None:
    adaptor = adaptor_for(rs)
    primary = rs.addresses[0]
    conn = await app_connect(rs, 0)
    try:
        await adaptor.set_read_only(primary, True)
        assert (await adaptor.probe(primary)).read_only is True
        with pytest.raises(errors.OperationalError) as refused:
            await insert(conn, -1, "read-only")
        assert refused.value.args[0] == 1290  # ER_OPTION_PREVENTS_STATEMENT: --read-only
        await adaptor.set_read_only(primary, False)
        assert (await adaptor.probe(primary)).read_only is False
        await insert(conn, -2, "writable")
    finally:
        conn.close()
    rs.wait_replicated()
    assert {-2} <= ids_on(rs, 2)
    assert -1 not in ids_on(rs, 2)


async def test_repoint_to_a_dead_source_fails_clearly_and_repointing_back_recovers(rs: MariaDBReplicaSet) -> None:
    adaptor = adaptor_for(rs, repoint_timeout=2)
    primary, replica = rs.addresses[0], rs.addresses[2]
    nowhere = Address("127.0.0.1", free_port())
    with pytest.raises(AdaptorError, match=f"replication from {nowhere} not running after 2s") as caught:
        await adaptor.repoint(replica, nowhere)
    assert caught.value.address == replica
    assert rs.replication.password not in str(caught.value)
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


async def test_wait_applied_times_out_on_a_blocked_applier_and_fails_at_once_on_a_stopped_one(
    rs: MariaDBReplicaSet,
) -> None:
    adaptor = adaptor_for(rs)
    replica = rs.addresses[1]
    lock = await asyncmy.connect(
        host="127.0.0.1", port=replica.port, user=rs.admin.user, password=rs.admin.password, autocommit=True
    )
    try:
        # Given a replica whose SQL thread runs but cannot apply (a global read lock held there)
        async with lock.cursor() as cur:
            await cur.execute("FLUSH TABLES WITH READ LOCK")
        rs.sql(0, f"INSERT INTO {TABLE} (id, step) VALUES (-3, 'blocked')")  # acknowledged by replica 2
        started = time.monotonic()
        with pytest.raises(AdaptorError, match=r"relay log not applied within 1s \(received 0-1-\d+") as caught:
            await adaptor.wait_applied(replica, 1)
        assert 1 <= time.monotonic() - started < 3
        assert caught.value.address == replica
        async with lock.cursor() as cur:
            await cur.execute("UNLOCK TABLES")
        # Then once unblocked it applies, and wait_applied returns the probe after
        status = await adaptor.wait_applied(replica, 10)
        assert status.replication is not None
        assert status.position == status.replication.received_position
    finally:
        lock.close()

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


# --- manual failover: kill -9 the primary, nothing acknowledged lost, old primary fenced --------


class Writer:
    """Inserts rows one by one on an instance, recording each id whose commit was acknowledged."""

    def __init__(self, rs: MariaDBReplicaSet, i: int, step: str, first_id: int) -> None:
        self.rs, self.i, self.step, self.next_id = rs, i, step, first_id
        self.acknowledged: list[int] = []
        self.error: BaseException | None = None

    async def run(self, stop: asyncio.Event, limit: int = 1_000_000) -> None:
        conn = await app_connect(self.rs, self.i)
        try:
            while not stop.is_set() and len(self.acknowledged) < limit:
                row_id = self.next_id
                self.next_id += 1
                await insert(conn, row_id, self.step)
                self.acknowledged.append(row_id)  # only once COMMIT returned: acknowledged
        except (errors.MySQLError, OSError) as exc:
            self.error = exc  # the primary died under us: this row's fate is unknown
        finally:
            conn.close()


async def test_manual_failover_loses_no_acknowledged_row_and_fences_the_old_primary(rs: MariaDBReplicaSet) -> None:
    adaptor = adaptor_for(rs)
    old, a, b = rs.addresses

    # Given a writer inserting rows on the semi-sync primary
    assert (await adaptor.probe(old)).sync_replication is True
    writer = Writer(rs, 0, "before", first_id=1)
    task = asyncio.create_task(writer.run(asyncio.Event()))
    await eventually(lambda: asyncio.sleep(0, len(writer.acknowledged) >= 300), 30, "300 acknowledged rows")

    # When the primary is killed with SIGKILL in the middle of the writes
    await asyncio.to_thread(rs.kill, 0)
    await asyncio.wait_for(task, 30)
    assert writer.error is not None, "the writer should have lost its primary"
    acknowledged = set(writer.acknowledged)
    dead = await adaptor.probe(old)
    assert dead.reachable is False
    assert dead.error.startswith(f"{old}: cannot connect"), dead.error

    # Then each survivor applies everything it received, and the most advanced one is chosen
    survivors = list(await asyncio.gather(adaptor.wait_applied(a, 30), adaptor.wait_applied(b, 30)))
    for s in survivors:
        assert s.replication is not None
        assert not s.replication.receiving, s
        assert s.position == s.replication.applied_position
    survivors.sort(key=lambda s: mariadb_gtids(s.position)[0][1], reverse=True)
    best, other = survivors
    assert gtid_covers("mariadb", best.position, other.position)
    new, rest = best.address, other.address
    new_i, rest_i = rs.addresses.index(new), rs.addresses.index(rest)

    # When it is promoted and the other replica repointed to it
    await adaptor.promote(new)
    await adaptor.repoint(rest, new)

    # Then every acknowledged row is on the new primary, which is writable and semi-sync
    missing = acknowledged - ids_on(rs, new_i)
    assert not missing, f"{len(missing)} acknowledged rows lost: {sorted(missing)[:10]}"
    promoted = await adaptor.probe(new)
    assert promoted.role == "primary"
    assert promoted.read_only is False
    assert promoted.replication is None
    assert promoted.replicas == (rest,)
    assert promoted.sync_replication is True
    repointed = await adaptor.probe(rest)
    assert repointed.replication is not None
    assert repointed.replication.source == new

    # And new writes on it are acknowledged and reach the repointed replica
    after = Writer(rs, new_i, "after", first_id=1_000_000)
    await asyncio.wait_for(after.run(asyncio.Event(), limit=50), 30)
    assert after.error is None
    assert len(after.acknowledged) == 50
    rs.wait_replicated(among=[new_i, rest_i])
    assert acknowledged | set(after.acknowledged) <= ids_on(rs, rest_i)
    assert ids_on(rs, rest_i) == ids_on(rs, new_i)

    # When the old primary comes back (as a replica-to-be: MariaDB's semi-sync crash recovery
    # then rolls back what no replica acknowledged) and is fenced: read-only, then repointed
    await asyncio.to_thread(rs.restart, 0, True)
    await adaptor.set_read_only(old, True)
    await adaptor.repoint(old, new)

    # Then it catches up from the new primary and holds exactly the same rows
    rs.wait_replicated(among=[0, new_i, rest_i])
    fenced = await adaptor.probe(old)
    assert fenced.role == "replica"
    assert fenced.read_only is True
    assert fenced.replication is not None
    assert fenced.replication.source == new
    assert ids_on(rs, 0) == ids_on(rs, new_i)
    topology = await adaptor.discover(old)
    assert [p.address for p in topology.primaries()] == [new]
    assert {s.address for s in topology.instances} == set(rs.addresses)


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
