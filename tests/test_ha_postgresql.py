"""The PostgreSQL HA adaptor on a real streaming-replication set: discovery, probes, errors, a manual failover.

One set (primary + 2 standbys, synchronous commit on standby 1) serves the whole module; the
failover scenario changes it for good and so runs last.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TypeVar

import asyncpg
import pytest

from app.adaptors.base import AdaptorError
from app.adaptors.conninfo import format_conninfo, parse_conninfo
from app.adaptors.positions import lsn_value
from app.adaptors.postgresql import PostgresAdaptor
from app.adaptors.types import Address, Credentials, InstanceStatus
from tests.ha_postgres import PostgresReplicaSet
from tests.harness import free_port
from tests.servers import PG_BIN, PG_USER

pytestmark = pytest.mark.slow

T = TypeVar("T")


@pytest.fixture(scope="module")
def pgset() -> Iterator[PostgresReplicaSet]:
    """Primary 0, standbys 1 and 2; `FIRST 1 (standby 1)` with synchronous_commit on."""
    replica_set = PostgresReplicaSet(3, synchronous="first")
    replica_set.start()
    try:
        yield replica_set
    finally:
        replica_set.stop()


def adaptor_for(pgset: PostgresReplicaSet) -> PostgresAdaptor:
    return PostgresAdaptor(pgset.admin, replication=pgset.replication)


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


# --- discovery and probes ----------------------------------------------------------------------


def check_initial_topology(pgset: PostgresReplicaSet, instances: tuple[InstanceStatus, ...]) -> None:
    primary, sync, potential = pgset.addresses
    by_address = {i.address: i for i in instances}
    assert sorted(by_address) == sorted(pgset.addresses)
    assert all(i.reachable and i.engine == "postgresql" for i in instances), [i.error for i in instances]
    assert len({i.server_id for i in instances}) == 1
    assert instances[0].server_id.isdigit()
    assert all(i.timeline == 1 and i.version.startswith("15") for i in instances)

    head = by_address[primary]
    assert head.role == "primary"
    assert head.read_only is False
    assert head.replication is None
    assert head.replicas == tuple(sorted([sync, potential]))
    assert head.sync_replication
    assert head.sync_replicas == (sync,)
    assert head.extra["synchronous_standby_names"] == f'FIRST 1 ("{sync}")'
    for address in (sync, potential):
        standby = by_address[address]
        assert standby.role == "replica"
        assert standby.read_only is True
        assert standby.replicas == ()
        assert standby.extra["application_name"] == str(address)
        link = standby.replication
        assert link is not None
        assert link.source == primary
        assert link.receiving
        assert link.applying
        assert not link.last_error
        assert lsn_value(link.applied_position) <= lsn_value(link.received_position)
        assert standby.position == link.applied_position
        # lag is unknown (None) while WAL waits for replay on a standby that replayed no commit yet
        assert link.lag_seconds is None or 0 <= link.lag_seconds < 60


async def test_discovery_from_any_instance_finds_all_three(pgset: PostgresReplicaSet) -> None:
    adaptor = adaptor_for(pgset)
    for seed in pgset.addresses:
        topology = await adaptor.discover(seed)
        assert topology.engine == "postgresql"
        assert [p.address for p in topology.primaries()] == [pgset.addresses[0]]
        check_initial_topology(pgset, topology.instances)


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


async def test_probe_of_a_stopped_instance_is_unreachable_with_the_reason() -> None:
    address = Address("127.0.0.1", free_port())
    started = time.monotonic()
    status = await PostgresAdaptor(Credentials("nobody", "pw")).probe(address)
    assert time.monotonic() - started < 2
    assert not status.reachable
    assert status.role == "unknown"
    assert status.replication is None
    assert status.error == f"{address}: cannot connect: connection refused"


async def test_probe_of_a_silent_server_times_out_quickly() -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = Address("127.0.0.1", silent.getsockname()[1])
        started = time.monotonic()
        status = await PostgresAdaptor(Credentials("nobody", "pw"), connect_timeout=0.5).probe(address)
        assert time.monotonic() - started < 2
    assert not status.reachable
    assert status.error == f"{address}: timed out waiting for an answer"


async def test_wrong_password_is_refused_without_echoing_it(pgset: PostgresReplicaSet) -> None:
    secret = "wrong-Secret-0451"
    bad = PostgresAdaptor(Credentials(pgset.admin.user, secret, "postgres"))
    primary, sync, _ = pgset.addresses
    status = await bad.probe(primary)
    assert not status.reachable
    assert status.error.startswith(f"{primary}: login refused: password authentication failed")
    assert secret not in status.error
    for step in (bad.promote(sync), bad.set_read_only(primary, True), bad.repoint(sync, primary)):
        with pytest.raises(AdaptorError) as caught:
            await step
        assert caught.value.address in (primary, sync)
        assert "password authentication failed" in str(caught.value)
        assert secret not in str(caught.value)
    assert pgset.sql(0, "SHOW default_transaction_read_only") == "off"


async def test_repoint_refuses_a_primary(pgset: PostgresReplicaSet) -> None:
    primary, sync, _ = pgset.addresses
    with pytest.raises(AdaptorError, match="this is a primary; it must be rewound"):
        await adaptor_for(pgset).repoint(primary, sync)


async def test_set_read_only_fences_well_behaved_clients(pgset: PostgresReplicaSet) -> None:
    adaptor = adaptor_for(pgset)
    primary = pgset.addresses[0]
    pgset.sql(0, "CREATE TABLE fence_check (id int)")
    client = await asyncpg.connect(host=primary.host, port=primary.port, **_login(pgset.admin))
    try:
        await adaptor.set_read_only(primary, True)
        assert (await adaptor.probe(primary)).read_only is True
        # An open session is fenced too: the reload reaches every backend.
        await eventually(lambda: _refused(client, "INSERT INTO fence_check VALUES (1)"), 5, "the session fenced")
        await adaptor.set_read_only(primary, False)
        status = await adaptor.probe(primary)
        assert status.read_only is False
        assert status.role == "primary"
        await eventually(lambda: _accepted(client, "INSERT INTO fence_check VALUES (2)"), 5, "the session unfenced")
        assert pgset.sql(0, "SELECT array_agg(id) FROM fence_check") == "{2}"
    finally:
        await client.close()
        await adaptor.set_read_only(primary, False)


async def _accepted(client: asyncpg.Connection, statement: str) -> bool:
    try:
        await client.execute(statement)
    except asyncpg.ReadOnlySQLTransactionError:
        return False
    return True


async def _refused(client: asyncpg.Connection, statement: str) -> bool:
    return not await _accepted(client, statement)


def _login(credentials: Credentials) -> dict[str, str]:
    return {"user": credentials.user, "password": credentials.password, "database": credentials.database}


async def test_wait_applied_waits_for_replay_and_times_out_when_paused(pgset: PostgresReplicaSet) -> None:
    adaptor = adaptor_for(pgset)
    potential = pgset.addresses[2]
    pgset.sql(0, "CREATE TABLE replay_check (id int)")
    pgset.wait_row(2, "SELECT count(*) FROM pg_class WHERE relname = 'replay_check'", "1")
    pgset.sql(2, "SELECT pg_wal_replay_pause()")
    try:
        pgset.sql(0, "INSERT INTO replay_check SELECT generate_series(1, 100)")
        status = await eventually(
            lambda: _received_ahead(adaptor, potential), 10, "the paused standby to receive unreplayed WAL"
        )
        assert status.replication is not None
        assert not status.replication.applying
        with pytest.raises(AdaptorError, match=r"has not reached .* within 0.3 s \(replay is paused\)"):
            await adaptor.wait_applied(potential, 0.3)
    finally:
        pgset.sql(2, "SELECT pg_wal_replay_resume()")
    status = await adaptor.wait_applied(potential, 10)
    assert status.replication is not None
    assert status.replication.applying
    assert pgset.sql(2, "SELECT count(*) FROM replay_check") == "100"


async def _received_ahead(adaptor: PostgresAdaptor, address: Address) -> InstanceStatus | None:
    status = await adaptor.probe(address)
    link = status.replication
    if link and lsn_value(link.received_position) > lsn_value(link.applied_position):
        return status
    return None


# --- failover runbook --------------------------------------------------------------------------


async def test_failover_with_synchronous_commit_loses_no_acknowledged_row(pgset: PostgresReplicaSet) -> None:
    adaptor = adaptor_for(pgset)
    old, sync, potential = pgset.addresses
    pgset.sql(0, "CREATE TABLE acked (id bigint PRIMARY KEY)")
    pgset.wait_streaming()
    before = await adaptor.probe(old)
    assert before.sync_replicas == (sync,)

    # Given a writer recording every commit the primary acknowledged
    acked: list[int] = []
    writer_conn = await asyncpg.connect(host=old.host, port=old.port, **_login(pgset.admin))

    async def writer() -> BaseException:
        n = 0
        while True:
            n += 1
            try:
                await writer_conn.execute("INSERT INTO acked VALUES ($1)", n)
            except Exception as exc:  # the connection's end, as asyncpg reports it (several types)
                return exc
            acked.append(n)

    writing = asyncio.create_task(writer())
    await eventually(lambda: _at_least(acked, 200), 30, "200 acknowledged inserts")

    # When I kill -9 the primary while it writes
    await asyncio.to_thread(pgset.kill, 0)
    failed_at = time.monotonic()
    assert isinstance(await asyncio.wait_for(writing, 10), BaseException)
    writer_conn.terminate()

    # Then fleetmate cannot reach it, and both standbys' WAL receivers lost it
    dead = await adaptor.probe(old)
    assert not dead.reachable
    assert dead.error == f"{old}: cannot connect: connection refused"
    for standby in (sync, potential):
        status = await eventually(lambda s=standby: _lost_source(adaptor, s), 10, f"{standby} to lose its source")
        assert status.replication is not None
        assert status.replication.source == old

    # When each survivor has replayed what it received, the most advanced one (the synchronous
    # standby on a tie) is promoted and the other repointed to it
    survivors = [await adaptor.wait_applied(s, 10) for s in (sync, potential)]
    survivors.sort(key=lambda s: (lsn_value(s.position), s.address in before.sync_replicas), reverse=True)
    new, other = survivors[0].address, survivors[1].address
    await adaptor.promote(new)
    promoted_in = time.monotonic() - failed_at
    await adaptor.repoint(other, new)
    new_i, other_i = pgset.addresses.index(new), pgset.addresses.index(other)

    # Then every acknowledged row is on the new primary, on a new timeline
    rows = {int(r) for r in pgset.sql(new_i, "SELECT id FROM acked").split()}
    assert set(acked) <= rows, sorted(set(acked) - rows)[:10]
    head = await adaptor.probe(new)
    assert head.role == "primary"
    assert head.read_only is False
    assert head.timeline == 2
    assert promoted_in < 15

    # And new writes reach the repointed standby, which follows the new timeline
    pgset.sql(new_i, "INSERT INTO acked VALUES (-1)")
    pgset.wait_row(other_i, "SELECT count(*) FROM acked WHERE id = -1", "1")
    follower = await adaptor.probe(other)
    assert follower.role == "replica"
    assert follower.timeline == 2
    assert follower.replication is not None
    assert follower.replication.source == new
    assert follower.replication.receiving

    # When the old primary comes back as a primary and takes a write the others never see
    await asyncio.to_thread(pgset.start_node, 0)
    pgset.sql(0, "SET synchronous_commit = local; INSERT INTO acked VALUES (-99)")
    returned = await adaptor.probe(old)
    assert returned.role == "primary"
    assert returned.read_only is False
    assert returned.timeline == 1

    # Then it can be fenced against well-behaved clients
    await adaptor.set_read_only(old, True)
    assert (await adaptor.probe(old)).read_only is True
    with pytest.raises(AssertionError, match="read-only transaction"):
        pgset.sql(0, "INSERT INTO acked VALUES (-98)")

    # When it is stopped, rewound and started as a standby of the new primary
    await asyncio.to_thread(pgset.stop_node, 0)
    await adaptor.rejoin(old, new, pgset.data_dir(0), run_as=PG_USER, bin_dir=PG_BIN)
    await asyncio.to_thread(pgset.start_node, 0)
    await asyncio.to_thread(pgset.wait_streaming, new_i, [0, other_i])

    # Then it is a read-only standby holding exactly the new primary's rows (its own write undone)
    pgset.sql(new_i, "INSERT INTO acked VALUES (-2)")
    pgset.wait_row(0, "SELECT count(*) FROM acked WHERE id = -2", "1")
    assert pgset.sql(0, "SELECT array_agg(id ORDER BY id) FROM acked") == pgset.sql(
        new_i, "SELECT array_agg(id ORDER BY id) FROM acked"
    )
    topology = await adaptor.discover(old)
    assert [p.address for p in topology.primaries()] == [new]
    by_address = {i.address: i for i in topology.instances}
    assert sorted(by_address) == sorted(pgset.addresses)
    assert by_address[new].replicas == tuple(sorted([old, other]))
    rejoined = by_address[old]
    assert rejoined.role == "replica"
    assert rejoined.read_only is True
    assert rejoined.timeline == 2
    assert rejoined.extra["application_name"] == str(old)
    assert rejoined.replication is not None
    assert rejoined.replication.source == new


async def _at_least(items: list[int], n: int) -> bool:
    return len(items) >= n


async def _lost_source(adaptor: PostgresAdaptor, address: Address) -> InstanceStatus | None:
    status = await adaptor.probe(address)
    if status.reachable and status.replication is not None and not status.replication.receiving:
        return status
    return None
