"""The engine adaptor contract, one suite for every engine: discovery, probes, errors, read_only, repoint,
wait_applied, and a failover (kill -9 the primary) that loses no acknowledged row and fences the old one.

Each engine is a kit: a real replica set of 3 (tests/harness/mariadb.py: GTID + semi-sync; tests/harness/postgres.py:
streaming, `FIRST 1` synchronous commit on standby 1), started once per session in tests/conftest.py and
shared with the engine-only tests, plus the few steps that differ by engine (a client, blocking the
applier, bringing the old primary back). Adaptors come from app.adaptors.registry by engine name.
The failover changes a set for good and so runs after every other test (breaks_replica_set).
Engine-only cases stay in tests/test_ha_mysql.py and tests/test_ha_postgresql.py. A new engine is an
adaptor module, a registry entry, a kit here and its replica set in tests/conftest.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from typing import Any, ClassVar

import asyncmy
import asyncpg
import pytest
from asyncmy import errors

from app.adaptors import registry
from app.adaptors.base import Adaptor, AdaptorError
from app.adaptors.positions import Position, parse
from app.adaptors.types import Address, Credentials, InstanceStatus
from tests.harness import eventually, free_port, wait_for
from tests.harness.mariadb import MariaDBReplicaSet
from tests.harness.postgres import PostgresReplicaSet
from tests.harness.servers import PG_BIN, PG_USER

pytestmark = pytest.mark.slow

Insert = Callable[[int], Awaitable[bool]]  # True: the commit was acknowledged; False: refused as read-only


def pos(status: InstanceStatus, text: str) -> Position:
    """A position the probe of status reported, comparable with the others of its engine."""
    return parse(status.engine, status.extra.get("flavor", ""), text)


class Kit:
    """One engine's replica set and the test steps that differ by engine."""

    engine: ClassVar[str]
    refused: ClassVar[str]  # the probe error (after "address: ") of a port nobody listens on
    timed_out: ClassVar[str]  # ... of a server that accepts and never answers (connect_timeout 0.5)
    denied: ClassVar[str]  # ... of a wrong password
    not_applied: ClassVar[str]  # wait_applied's error while the applier cannot apply (timeout 1)
    admin: Credentials
    replication: Credentials

    addresses: list[Address]

    def adaptor(self, login: Credentials | None = None, replication: Credentials | None = None, **kw: Any) -> Adaptor:
        cls: Any = registry.adaptor_class(self.engine)
        found: Adaptor = cls(
            login or self.admin, kw.pop("connect_timeout", 2.0), replication=replication or self.replication, **kw
        )
        return found


class MariaDBKit(Kit):
    engine = "mysql"
    refused = r"cannot connect: .+"
    timed_out = r"cannot connect: no answer within 0.5s"
    denied = r"access denied for user 'fleetmate'"
    not_applied = r"relay log not applied within 1s \(received \d+-\d+-\d+"
    TABLE = "app.acked"

    def __init__(self, rs: MariaDBReplicaSet) -> None:
        self.rs = rs
        self.admin, self.replication = rs.admin, rs.replication
        self.addresses = rs.addresses

    def check_discovered(self, by_address: dict[Address, InstanceStatus]) -> None:
        primary, *replicas = self.addresses
        position = ",".join(sorted(self.rs.wait_replicated()))
        assert len({s.server_id for s in by_address.values()}) == 3
        top = by_address[primary]
        assert top.position == position
        assert "MariaDB" in top.version
        assert top.extra["flavor"] == "mariadb"
        assert top.extra["semi_sync_master_clients"] == "2"
        assert top.extra["gtid_strict_mode"] == "ON"
        for address in replicas:
            replica = by_address[address]
            link = replica.replication
            assert link is not None
            assert link.lag_seconds == 0
            assert link.received_position == position
            assert link.applied_position == position
            assert replica.position == position
            assert replica.sync_replication is False  # a replica's own commits wait for nobody
            assert replica.extra["semi_sync_slave_status"] == "ON"
            assert replica.extra["auto_position"] == "Slave_Pos"

    @contextlib.asynccontextmanager
    async def client(self, i: int) -> AsyncIterator[Insert]:
        """The application user (no READ ONLY ADMIN, so read_only applies to it) on instance i."""
        app = self.rs.app
        conn: Any = await asyncmy.connect(
            host="127.0.0.1",
            port=self.rs.instances[i].port,
            user=app.user,
            password=app.password,
            db=app.database,
            autocommit=True,
            connect_timeout=5,
        )

        async def insert(row_id: int) -> bool:
            try:
                async with conn.cursor() as cur:
                    await cur.execute(f"INSERT INTO {self.TABLE} (id, step) VALUES (%s, 'test')", (row_id,))
            except errors.OperationalError as exc:
                if exc.args[0] == 1290:  # ER_OPTION_PREVENTS_STATEMENT: --read-only
                    return False
                raise
            return True

        try:
            yield insert
        finally:
            conn.close()

    def insert(self, i: int, ids: Iterable[int]) -> None:
        values = ", ".join(f"({n}, 'direct')" for n in ids)
        self.rs.sql(i, f"INSERT INTO {self.TABLE} (id, step) VALUES {values}")

    def ids(self, i: int) -> set[int]:
        return {int(line) for line in self.rs.sql(i, f"SELECT id FROM {self.TABLE}").split()}

    def wait_same(self, among: list[int]) -> None:
        self.rs.wait_replicated(among=among)

    def kill(self, i: int) -> None:
        self.rs.kill(i)

    @contextlib.asynccontextmanager
    async def applier_blocked(self, i: int) -> AsyncIterator[None]:
        """The replica's SQL thread runs but cannot apply: a global read lock is held there."""
        admin, port = self.admin, self.addresses[i].port
        lock: Any = await asyncmy.connect(
            host="127.0.0.1", port=port, user=admin.user, password=admin.password, autocommit=True
        )
        try:
            async with lock.cursor() as cur:
                await cur.execute("FLUSH TABLES WITH READ LOCK")
            yield
            async with lock.cursor() as cur:
                await cur.execute("UNLOCK TABLES")
        finally:
            lock.close()

    def check_promoted(self, head: InstanceStatus, others: list[Address]) -> None:
        assert head.replicas == tuple(others)
        assert head.sync_replication is True  # the semi-sync replica became a semi-sync primary

    async def bring_back_and_fence(self, adaptor: Adaptor, old_i: int, new_i: int, other_i: int) -> None:
        """The old primary comes back as a replica-to-be (MariaDB's semi-sync crash recovery then
        rolls back what no replica acknowledged) and is fenced: read-only, then repointed."""
        old, new = self.addresses[old_i], self.addresses[new_i]
        await asyncio.to_thread(self.rs.restart, old_i, True)
        await adaptor.set_read_only(old, True)
        await adaptor.repoint(old, new)

    def check_rejoined(self, by_address: dict[Address, InstanceStatus], old: Address, new: Address) -> None:
        pass


class PostgresKit(Kit):
    engine = "postgresql"
    refused = r"cannot connect: connection refused"
    timed_out = r"timed out waiting for an answer"
    denied = r"login refused: password authentication failed"
    not_applied = r"has not reached .* within 1 s \(replay is paused\)"

    def __init__(self, pg: PostgresReplicaSet) -> None:
        self.pg = pg
        self.admin, self.replication = pg.admin, pg.replication
        self.addresses = pg.addresses

    def check_discovered(self, by_address: dict[Address, InstanceStatus]) -> None:
        primary, sync, potential = self.addresses
        instances = list(by_address.values())
        assert len({i.server_id for i in instances}) == 1
        assert instances[0].server_id.isdigit()
        assert all(i.timeline == 1 and i.version.startswith("15") for i in instances)
        head = by_address[primary]
        assert head.sync_replicas == (sync,)
        assert head.extra["synchronous_standby_names"] == f'FIRST 1 ("{sync}")'
        for address in (sync, potential):
            standby = by_address[address]
            assert standby.extra["application_name"] == str(address)
            link = standby.replication
            assert link is not None
            assert pos(standby, link.received_position).covers(pos(standby, link.applied_position))
            # lag is unknown (None) while WAL waits for replay on a standby that replayed no commit yet
            assert link.lag_seconds is None or 0 <= link.lag_seconds < 60

    @contextlib.asynccontextmanager
    async def client(self, i: int) -> AsyncIterator[Insert]:
        admin, port = self.admin, self.addresses[i].port
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=admin.user, password=admin.password, database=admin.database
        )

        async def insert(row_id: int) -> bool:
            try:
                await conn.execute("INSERT INTO acked VALUES ($1)", row_id)
            except asyncpg.ReadOnlySQLTransactionError:
                return False
            return True

        try:
            yield insert
        finally:
            conn.terminate()

    def insert(self, i: int, ids: Iterable[int]) -> None:
        self.pg.sql(i, "INSERT INTO acked VALUES " + ", ".join(f"({n})" for n in ids))

    def ids(self, i: int) -> set[int]:
        return {int(r) for r in self.pg.sql(i, "SELECT id FROM acked").split()}

    def wait_same(self, among: list[int]) -> None:
        wait_for(lambda: len({frozenset(self.ids(i)) for i in among}) == 1, 30, f"the same rows on {among}")

    def kill(self, i: int) -> None:
        self.pg.kill(i)

    @contextlib.asynccontextmanager
    async def applier_blocked(self, i: int) -> AsyncIterator[None]:
        """The standby receives WAL but does not replay it: replay paused."""
        self.pg.sql(i, "SELECT pg_wal_replay_pause()")
        try:
            yield
        finally:
            self.pg.sql(i, "SELECT pg_wal_replay_resume()")

    def check_promoted(self, head: InstanceStatus, others: list[Address]) -> None:
        assert head.timeline == 2

    async def bring_back_and_fence(self, adaptor: Adaptor, old_i: int, new_i: int, other_i: int) -> None:
        """The old primary comes back as a primary and takes a write the others never see; it is
        fenced (read-only), stopped, rewound and started as a standby of the new primary."""
        old, new = self.addresses[old_i], self.addresses[new_i]
        await asyncio.to_thread(self.pg.start_node, old_i)
        self.pg.sql(old_i, "SET synchronous_commit = local; INSERT INTO acked VALUES (-99)")
        returned = await adaptor.probe(old)
        assert returned.role == "primary"
        assert returned.read_only is False
        assert returned.timeline == 1
        await adaptor.set_read_only(old, True)
        assert (await adaptor.probe(old)).read_only is True
        with pytest.raises(AssertionError, match="read-only transaction"):
            self.pg.sql(old_i, "INSERT INTO acked VALUES (-98)")
        await asyncio.to_thread(self.pg.stop_node, old_i)
        await adaptor.rejoin(old, new, self.pg.data_dir(old_i), run_as=PG_USER, bin_dir=PG_BIN)
        await asyncio.to_thread(self.pg.start_node, old_i)
        await asyncio.to_thread(self.pg.wait_streaming, new_i, [old_i, other_i])

    def check_rejoined(self, by_address: dict[Address, InstanceStatus], old: Address, new: Address) -> None:
        others = [a for a in self.addresses if a != new]
        assert by_address[new].replicas == tuple(sorted(others))
        assert by_address[old].timeline == 2
        assert by_address[old].extra["application_name"] == str(old)


@pytest.fixture(params=["mariadb", "postgresql"])
def kit(request: pytest.FixtureRequest) -> Kit:
    """One engine's kit around the session's replica set of that engine (tests/conftest.py)."""
    if request.param == "mariadb":
        return MariaDBKit(request.getfixturevalue("mariadb_replicas"))
    return PostgresKit(request.getfixturevalue("postgres_replicas"))


# --- the registry ------------------------------------------------------------------------------


def test_the_registry_names_every_engine_and_refuses_an_unknown_one() -> None:
    assert sorted(registry.ADAPTORS) == ["mysql", "postgresql"]
    for engine in registry.ADAPTORS:
        adaptor = registry.create(engine, Credentials("u", "pw"), Credentials("r", "rpw"), 1.5)
        assert adaptor.engine == engine
        assert adaptor.connect_timeout == 1.5
        assert adaptor.replication == Credentials("r", "rpw")
    with pytest.raises(
        registry.UnknownEngine, match="no adaptor for engine 'oracle'; known engines: mysql, postgresql"
    ):
        registry.create("oracle", Credentials("u"), Credentials("u"), 1.0)


# --- discovery and probes ----------------------------------------------------------------------


async def test_discovery_from_any_instance_finds_roles_sources_replicas_and_positions(kit: Kit) -> None:
    adaptor = kit.adaptor()
    primary, *replicas = kit.addresses
    for seed in kit.addresses:
        topology = await adaptor.discover(seed)
        assert topology.engine == kit.engine
        assert [s.address for s in topology.instances] == sorted(kit.addresses), f"seed {seed}"
        assert all(s.reachable and s.engine == kit.engine for s in topology.instances), topology
        assert [p.address for p in topology.primaries()] == [primary]
        by_address = {s.address: s for s in topology.instances}

        top = by_address[primary]
        assert top.role == "primary"
        assert top.read_only is False
        assert top.replication is None
        assert top.replicas == tuple(sorted(replicas))
        assert top.sync_replication is True
        for address in replicas:
            replica = by_address[address]
            link = replica.replication
            assert replica.role == "replica", replica
            assert replica.read_only is True
            assert replica.replicas == ()
            assert link is not None
            assert link.source == primary
            assert link.receiving
            assert link.applying
            assert link.last_error == ""
            assert replica.position == link.applied_position
        kit.check_discovered(by_address)


async def test_probe_of_a_port_nobody_listens_on_is_unreachable_with_a_clear_error(kit: Kit) -> None:
    nowhere = Address("127.0.0.1", free_port())
    started = time.monotonic()
    status = await kit.adaptor(Credentials("nobody", "pw")).probe(nowhere)
    assert time.monotonic() - started < 2
    assert status.reachable is False
    assert status.role == "unknown"
    assert status.replication is None
    assert re.fullmatch(f"{re.escape(str(nowhere))}: {kit.refused}", status.error), status.error


async def test_probe_of_a_silent_server_times_out_quickly(kit: Kit) -> None:
    with socket.socket() as silent:  # accepts TCP connections (backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        address = Address("127.0.0.1", silent.getsockname()[1])
        started = time.monotonic()
        status = await kit.adaptor(Credentials("nobody", "pw"), connect_timeout=0.5).probe(address)
        assert time.monotonic() - started < 2
    assert not status.reachable
    assert re.fullmatch(f"{re.escape(str(address))}: {kit.timed_out}", status.error), status.error


async def test_wrong_password_is_a_clear_error_that_never_shows_the_password(kit: Kit) -> None:
    secret = "not-the-Password-4711"
    bad = kit.adaptor(Credentials(kit.admin.user, secret, kit.admin.database), Credentials("repl", secret))
    primary, replica, _ = kit.addresses
    status = await bad.probe(primary)
    assert status.reachable is False
    assert re.match(f"{re.escape(str(primary))}: {kit.denied}", status.error), status.error
    assert secret not in status.error
    for attempt in (
        bad.set_read_only(primary, True),
        bad.promote(replica),
        bad.repoint(replica, primary),
        bad.wait_applied(replica, 1),
    ):
        with pytest.raises(AdaptorError, match=kit.denied) as caught:
            await attempt
        assert caught.value.address in kit.addresses
        assert secret not in str(caught.value)
        assert secret not in repr(caught.value)
    assert (await kit.adaptor().probe(primary)).read_only is False  # nothing changed


# --- changes -----------------------------------------------------------------------------------


async def test_read_only_refuses_then_accepts_application_writes(kit: Kit) -> None:
    adaptor = kit.adaptor()
    primary = kit.addresses[0]
    async with kit.client(0) as insert:
        try:
            await adaptor.set_read_only(primary, True)
            assert (await adaptor.probe(primary)).read_only is True
            # An open session is fenced too (PostgreSQL: once the reload reaches its backend).
            await eventually(lambda: _refused(insert, -10), 5, "the session fenced")
            await adaptor.set_read_only(primary, False)
            status = await adaptor.probe(primary)
            assert status.read_only is False
            assert status.role == "primary"
            await eventually(lambda: insert(-11), 5, "the session unfenced")
        finally:
            await adaptor.set_read_only(primary, False)
    kit.wait_same([0, 1, 2])
    assert -11 in kit.ids(2)
    assert -10 not in kit.ids(0)


async def _refused(insert: Insert, row_id: int) -> bool:
    return not await insert(row_id)


async def test_repoint_to_a_dead_source_fails_clearly_and_repointing_back_recovers(kit: Kit) -> None:
    adaptor = kit.adaptor(repoint_timeout=2)
    primary, replica = kit.addresses[0], kit.addresses[2]
    nowhere = Address("127.0.0.1", free_port())
    with pytest.raises(AdaptorError, match=f"{nowhere}.* (not running|not streaming) after 2 ?s") as caught:
        await adaptor.repoint(replica, nowhere)
    assert caught.value.address == replica
    assert kit.replication.password not in str(caught.value)
    await kit.adaptor().repoint(replica, primary)
    status = await adaptor.probe(replica)
    assert status.replication is not None
    assert status.replication.source == primary
    assert status.replication.receiving
    assert status.replication.applying
    kit.wait_same([0, 1, 2])


async def test_wait_applied_times_out_while_the_replica_cannot_apply_then_returns_its_probe(kit: Kit) -> None:
    adaptor = kit.adaptor()
    replica = kit.addresses[2]

    async def received_ahead() -> InstanceStatus | None:
        status = await adaptor.probe(replica)
        link = status.replication
        if link and not pos(status, link.applied_position).covers(pos(status, link.received_position)):
            return status
        return None

    # Given a replica that receives transactions but cannot apply them
    async with kit.applier_blocked(2):
        kit.insert(0, range(-1000, -900))
        status = await eventually(received_ahead, 10, "the replica to receive without applying")
        assert status.replication is not None
        # Then wait_applied gives up after its timeout, naming the instance
        started = time.monotonic()
        with pytest.raises(AdaptorError, match=kit.not_applied) as caught:
            await adaptor.wait_applied(replica, 1)
        assert 1 <= time.monotonic() - started < 3
        assert caught.value.address == replica
    # And once it can apply again it does, and wait_applied returns the probe after
    status = await adaptor.wait_applied(replica, 10)
    assert status.replication is not None
    assert status.replication.applying
    assert pos(status, status.position).covers(pos(status, status.replication.received_position))
    assert set(range(-1000, -900)) <= kit.ids(2)


# --- failover: kill -9 the primary, nothing acknowledged lost, old primary fenced (breaks the set) --


@pytest.mark.breaks_replica_set(1)
async def test_failover_loses_no_acknowledged_row_and_fences_the_old_primary(kit: Kit) -> None:
    adaptor = kit.adaptor()
    old, a, b = kit.addresses
    before = await adaptor.probe(old)
    assert before.sync_replication is True

    # Given a writer recording every commit the primary acknowledged
    acked: list[int] = []

    async def writer() -> BaseException:
        async with kit.client(0) as insert:
            n = 0
            while True:
                n += 1
                try:
                    assert await insert(n)
                except Exception as exc:  # the connection's end, as the driver reports it
                    return exc
                acked.append(n)  # only once COMMIT returned: acknowledged

    writing = asyncio.create_task(writer())
    await eventually(lambda: asyncio.sleep(0, len(acked) >= 200), 30, "200 acknowledged rows")

    # When the primary is killed with SIGKILL in the middle of the writes
    await asyncio.to_thread(kit.kill, 0)
    failed_at = time.monotonic()
    assert isinstance(await asyncio.wait_for(writing, 30), BaseException)
    dead = await adaptor.probe(old)
    assert dead.reachable is False
    assert re.fullmatch(f"{re.escape(str(old))}: {kit.refused}", dead.error), dead.error
    for replica in (a, b):  # both replicas lost their source
        lost = await eventually(lambda r=replica: _lost_source(adaptor, r), 10, f"{replica} to lose its source")
        assert lost.replication is not None
        assert lost.replication.source == old

    # Then each survivor applies everything it received, and the most advanced one (the
    # synchronous one on a tie) is promoted and the other repointed to it
    survivors = list(await asyncio.gather(adaptor.wait_applied(a, 30), adaptor.wait_applied(b, 30)))
    for s in survivors:
        assert s.replication is not None
        assert s.position == s.replication.applied_position
    survivors.sort(key=lambda s: (pos(s, s.position).size(), s.address in before.sync_replicas), reverse=True)
    best, other_status = survivors
    assert pos(best, best.position).covers(pos(other_status, other_status.position))
    new, other = best.address, other_status.address
    new_i, other_i = kit.addresses.index(new), kit.addresses.index(other)
    await adaptor.promote(new)
    promoted_in = time.monotonic() - failed_at
    await adaptor.repoint(other, new)

    # Then every acknowledged row is on the new primary, which is writable
    missing = set(acked) - kit.ids(new_i)
    assert not missing, f"{len(missing)} acknowledged rows lost: {sorted(missing)[:10]}"
    assert promoted_in < 15
    head = await adaptor.probe(new)
    assert head.role == "primary"
    assert head.read_only is False
    assert head.replication is None
    kit.check_promoted(head, [other])
    follower = await adaptor.probe(other)
    assert follower.role == "replica"
    assert follower.replication is not None
    assert follower.replication.source == new
    assert follower.replication.receiving
    assert follower.timeline == head.timeline

    # And new writes on it are acknowledged and reach the repointed replica
    async with kit.client(new_i) as insert:
        for n in range(1_000_000, 1_000_050):
            assert await insert(n)
    kit.wait_same([new_i, other_i])
    assert set(acked) | set(range(1_000_000, 1_000_050)) <= kit.ids(other_i)

    # When the old primary comes back and is fenced (the engine's way)
    await kit.bring_back_and_fence(adaptor, 0, new_i, other_i)

    # Then it is a read-only replica of the new primary holding exactly its rows (its own write
    # undone), and a new write reaches it
    kit.insert(new_i, [-2])
    kit.wait_same([0, new_i, other_i])
    assert -2 in kit.ids(0)
    fenced = await adaptor.probe(old)
    assert fenced.role == "replica"
    assert fenced.read_only is True
    assert fenced.replication is not None
    assert fenced.replication.source == new
    assert kit.ids(0) == kit.ids(new_i)
    topology = await adaptor.discover(old)
    assert [p.address for p in topology.primaries()] == [new]
    by_address = {s.address: s for s in topology.instances}
    assert sorted(by_address) == sorted(kit.addresses)
    kit.check_rejoined(by_address, old, new)


async def _lost_source(adaptor: Adaptor, address: Address) -> InstanceStatus | None:
    status = await adaptor.probe(address)
    if status.reachable and status.replication is not None and not status.replication.receiving:
        return status
    return None
