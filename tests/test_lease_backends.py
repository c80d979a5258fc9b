"""One contract suite for every leader-lease backend (nats, sql on MariaDB and PostgreSQL, s3), on real servers."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest

from app.bus.connection import Bus
from app.config import Config, LeaseConfig, S3Config, SqlConfig
from app.log.leadership import Leadership
from app.log.lease import registry
from app.log.lease.base import LeaseBackend, LeaseRecord
from app.log.lease.nats import NatsLease
from app.log.lease.s3 import S3Lease
from app.log.lease.sql import SqlLease
from app.storage.s3client import ObjectStoreError
from app.storage.sqldb import SqlError
from tests.harness import ROOT, Fleetmate, NatsServer, eventually, free_port, running, wait_for
from tests.harness.servers import MariaDB, Postgres, SeaweedS3

TTL = 2.0
RENEW = 0.4
# A contender polls every RENEW; the S3 backend also needs one more poll to see the ETag stand
# still for a whole TTL, so a take-over is due within TTL + RENEW, plus one poll and some slack.
TAKEOVER_BOUND = TTL + RENEW + RENEW + 0.6
# A killed holder renewed at most one round (RENEW plus the round's own latency) before it died,
# and its lease runs a whole TTL from that renewal: no one may take it sooner than this.
EARLIEST_TAKEOVER = TTL - RENEW - 0.25
BACKENDS = ["nats", "sql-mariadb", "sql-postgresql", "s3"]


@dataclass
class LeaseEnv:
    """How to build backends of one kind on one lease nobody else uses."""

    kind: str
    cfg: Config
    bus: Bus
    nats_url: str = ""
    made: list[LeaseBackend] = field(default_factory=list)

    def make(self) -> LeaseBackend:
        backend = registry.create(self.cfg, self.bus, 1)
        self.made.append(backend)
        return backend


@pytest.fixture(params=BACKENDS)
async def env(request: pytest.FixtureRequest) -> AsyncIterator[LeaseEnv]:
    """A fresh lease (own name, table prefix or key prefix) on the parametrized backend."""
    kind: str = request.param
    tag = uuid.uuid4().hex[:10]
    lease = LeaseConfig(backend=kind.partition("-")[0], ttl=TTL, renew_interval=RENEW, name=f"lease-{tag}")  # type: ignore[arg-type]
    cfg = Config(lease=lease)
    bus = Bus(["nats://127.0.0.1:1"], name="unused")
    nats_url = ""
    if kind == "nats":
        server: NatsServer = request.getfixturevalue("nats_server")
        nats_url = server.url
        bus = Bus([nats_url], name="lease-test")
        await bus.connect(5)
    elif kind.startswith("sql-"):
        db: MariaDB | Postgres = request.getfixturevalue("mariadb" if kind == "sql-mariadb" else "postgres")
        cfg = Config(lease=lease, sql=SqlConfig(dsn=db.dsn, table_prefix=f"t{tag}_"))
    else:
        s3: SeaweedS3 = request.getfixturevalue("s3_server")
        cfg = Config(lease=lease, s3=_s3cfg(s3, prefix=f"t-{tag}/"))
    env = LeaseEnv(kind, cfg, bus, nats_url)
    try:
        yield env
    finally:
        for backend in env.made:
            if isinstance(backend, SqlLease | S3Lease):
                await backend.close()
        await bus.close()


def _s3cfg(s3: SeaweedS3, prefix: str = "fleetmate/", secret: str | None = None) -> S3Config:
    return S3Config(
        endpoint=s3.endpoint,
        access_key=s3.access_key,
        secret_key=s3.secret_key if secret is None else secret,
        bucket=s3.bucket,
        region=s3.region,
        prefix=prefix,
    )


def record(holder: str) -> LeaseRecord:
    return LeaseRecord(holder, time.time(), f"http://{holder}.test")


class Contenders:
    """Leadership loops on one lease, and a sampler that fails the test if two ever lead at once."""

    def __init__(self, env: LeaseEnv) -> None:
        self.env = env
        self.loops: dict[str, Leadership] = {}
        self.dead: set[str] = set()
        self.max_leaders = 0
        self.samples = 0
        self._sampler: asyncio.Task[None] | None = None

    def start(self, *names: str) -> None:
        async def nothing() -> None:
            return None

        for name in names:
            loop = Leadership(self.env.make(), record(name), RENEW, on_gain=nothing, on_lose=nothing)
            self.loops[name] = loop
            loop.start()
        if self._sampler is None:
            self._sampler = asyncio.create_task(self._sample())

    async def _sample(self) -> None:
        while True:
            leading = self.leaders()
            self.max_leaders = max(self.max_leaders, len(leading))
            assert len(leading) <= 1, f"two leaders at once: {leading}"
            self.samples += 1
            await asyncio.sleep(0.01)

    def leaders(self) -> list[str]:
        return [name for name, loop in self.loops.items() if loop.leading and name not in self.dead]

    async def one_leader(self, timeout: float, exclude: str = "") -> tuple[str, float]:
        """The name of the single leader (not `exclude`) once there is one, and how long that took."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            self.check()
            leading = [name for name in self.leaders() if name != exclude]
            if leading:
                return leading[0], time.monotonic() - started
            await asyncio.sleep(0.01)
        raise AssertionError(f"no leader within {timeout}s (leaders: {self.leaders()})")

    async def hold_steady(self, seconds: float) -> str:
        """Over `seconds`, exactly one leader at every sample, and always the same one."""
        deadline = time.monotonic() + seconds
        seen = set()
        while time.monotonic() < deadline:
            self.check()
            leading = self.leaders()
            assert len(leading) == 1, f"expected exactly one leader, got {leading}"
            seen.add(leading[0])
            await asyncio.sleep(0.02)
        assert len(seen) == 1, f"the lead moved without cause: {seen}"
        return seen.pop()

    async def all_see(self, holder: str, timeout: float) -> None:
        """Until every live contender's last round found `holder` holding the lease."""

        async def seen() -> bool:
            self.check()
            live = [loop for name, loop in self.loops.items() if name not in self.dead]
            return all(loop.holder is not None and loop.holder.holder == holder for loop in live)

        await eventually(seen, timeout, f"every contender to see {holder} holding the lease")

    def kill(self, name: str) -> None:
        """Stop a loop dead, without releasing: as if its process vanished."""
        loop = self.loops[name]
        assert loop._task is not None
        loop._task.cancel()
        self.dead.add(name)

    def check(self) -> None:
        if self._sampler is not None and self._sampler.done():
            self._sampler.result()  # re-raises the sampler's assertion

    async def stop(self) -> None:
        for name, loop in self.loops.items():
            if name not in self.dead:
                await loop.stop()
        if self._sampler is not None:
            self.check()
            self._sampler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sampler


@pytest.fixture
async def contenders(env: LeaseEnv) -> AsyncIterator[Contenders]:
    group = Contenders(env)
    try:
        yield group
    finally:
        await group.stop()


async def test_one_leader_and_takeover_after_a_killed_holder(env: LeaseEnv, contenders: Contenders) -> None:
    contenders.start("a", "b", "c")
    first, took = await contenders.one_leader(TTL + 2)
    # Longer than a TTL: the holder's renewals, not luck, keep the others out.
    assert await contenders.hold_steady(TTL + 0.5) == first

    contenders.kill(first)
    killed = time.monotonic()
    second, _ = await contenders.one_leader(TAKEOVER_BOUND + 1, exclude=first)
    handover = time.monotonic() - killed
    print(f"\n[{env.kind}] first leader after {took:.2f}s; take-over after a killed holder: {handover:.2f}s")
    # Not before the dead holder's lease ran out...
    assert handover >= EARLIEST_TAKEOVER, f"lease taken after {handover:.2f}s, before it could have expired"
    # ...and not much after.
    assert handover <= TAKEOVER_BOUND, f"take-over took {handover:.2f}s"
    assert await contenders.hold_steady(0.5) == second
    assert contenders.max_leaders == 1
    assert contenders.samples > 100


async def test_graceful_release_hands_over_at_once(env: LeaseEnv, contenders: Contenders) -> None:
    contenders.start("a", "b", "c")
    first, _ = await contenders.one_leader(TTL + 2)
    await contenders.hold_steady(0.3)
    released = time.monotonic()
    await contenders.loops[first].stop()
    contenders.dead.add(first)
    second, _ = await contenders.one_leader(TTL, exclude=first)
    handover = time.monotonic() - released
    print(f"\n[{env.kind}] hand-over after a graceful release: {handover:.2f}s")
    assert handover < RENEW + 0.5, f"hand-over took {handover:.2f}s: the release did not free the lease"
    assert await contenders.hold_steady(0.3) == second


async def test_renew_by_a_non_holder_fails(env: LeaseEnv) -> None:
    a, b = env.make(), env.make()
    assert await a.try_acquire(record("a"))
    assert not await b.try_acquire(record("b"))
    assert not await b.renew(record("b"))
    assert not b.held
    assert await a.renew(record("a"))
    holder = await b.current()
    assert holder is not None
    assert holder.holder == "a"


async def test_holder_learns_on_its_next_renew_that_the_lease_was_taken(env: LeaseEnv) -> None:
    a, b = env.make(), env.make()
    assert await a.try_acquire(record("a"))
    started = time.monotonic()
    # a stops renewing (paused, partitioned); b keeps trying as a contender would.
    while not await b.try_acquire(record("b")):
        assert time.monotonic() - started < TAKEOVER_BOUND, "b never took the lapsed lease"
        await asyncio.sleep(RENEW)
    waited = time.monotonic() - started
    assert waited >= TTL - 0.1, f"b took a lease that had not lapsed after {waited:.2f}s"
    assert not await a.renew(record("a"))
    assert not a.held
    # A release by the deposed holder (say it missed the news) must not free b's lease.
    a.held = True
    await a.release(record("a"))
    assert await b.renew(record("b"))
    holder = await a.current()
    assert holder is not None
    assert holder.holder == "b"


async def test_a_restarted_replica_takes_its_own_lease_back_at_once(env: LeaseEnv) -> None:
    old, new, other = env.make(), env.make(), env.make()
    assert await old.try_acquire(record("a"))
    assert not await other.try_acquire(record("b"))
    # The same replica id after a crash: no need to wait out its own lease.
    assert await new.try_acquire(record("a"))
    # The earlier run, should it still be alive, has lost it.
    assert not await old.renew(record("a"))
    assert await new.renew(record("a"))


HOLDER = """
import asyncio, sys, time
import msgspec
from app.bus.connection import Bus
from app.config import Config
from app.log.lease import registry
from app.log.lease.base import LeaseRecord
from app.log.leadership import Leadership

async def main() -> None:
    cfg = msgspec.json.decode(sys.argv[1], type=Config)
    bus = Bus([sys.argv[2] or "nats://127.0.0.1:1"], name="holder")
    if sys.argv[2]:
        await bus.connect(5)

    async def gained() -> None:
        print("leading", flush=True)

    async def lost() -> None:
        print("lost", flush=True)

    backend = registry.create(cfg, bus, 1)
    Leadership(backend, LeaseRecord("proc", time.time()), cfg.lease.renew_interval, gained, lost).start()
    await asyncio.Event().wait()

asyncio.run(main())
"""


async def test_takeover_after_the_holder_process_is_killed(env: LeaseEnv, contenders: Contenders) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        msgspec.json.encode(env.cfg).decode(),
        env.nats_url,
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 20)
        assert line.strip() == b"leading", line
        contenders.start("b", "c")
        await contenders.all_see("proc", 10)
        assert contenders.leaders() == []
        proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        await proc.wait()
        await contenders.one_leader(TAKEOVER_BOUND + 1)
        handover = time.monotonic() - killed
        print(f"\n[{env.kind}] take-over after kill -9 of the holder process: {handover:.2f}s")
        assert EARLIEST_TAKEOVER <= handover <= TAKEOVER_BOUND
        await contenders.hold_steady(0.5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_registry_picks_the_configured_backend(mariadb: MariaDB, s3_server: SeaweedS3) -> None:
    bus = Bus(["nats://127.0.0.1:1"], name="unused")
    cases: list[tuple[Config, type[LeaseBackend]]] = [
        (Config(), NatsLease),
        (Config(lease=LeaseConfig(backend="sql"), sql=SqlConfig(dsn=mariadb.dsn)), SqlLease),
        (Config(lease=LeaseConfig(backend="s3"), s3=_s3cfg(s3_server)), S3Lease),
    ]
    for cfg, cls in cases:
        backend = registry.create(cfg, bus, 1)
        assert type(backend) is cls
        assert backend.ttl == cfg.lease.ttl


BadCase = Callable[[MariaDB, Postgres, SeaweedS3], tuple[LeaseBackend, type[Exception], str]]


def _sql(dsn: str) -> SqlLease:
    return SqlLease(dsn, "fleetmate_", "bad", TTL)


BAD_INPUTS: dict[str, BadCase] = {
    "mariadb-unreachable": lambda m, p, s: (
        _sql(f"mysql://fleetmate:pw@127.0.0.1:{free_port()}/fleetmate"),
        SqlError,
        "cannot reach the database",
    ),
    "postgres-unreachable": lambda m, p, s: (
        _sql(f"postgresql://fleetmate:pw@127.0.0.1:{free_port()}/fleetmate"),
        SqlError,
        "cannot reach the database",
    ),
    "mariadb-wrong-password": lambda m, p, s: (
        _sql(m.dsn.replace(m.password, "not-the-password")),
        SqlError,
        "access denied",
    ),
    "postgres-wrong-password": lambda m, p, s: (
        _sql(p.dsn.replace(p.password, "not-the-password")),
        SqlError,
        "access denied",
    ),
    "mariadb-unknown-database": lambda m, p, s: (_sql(m.dsn.rsplit("/", 1)[0] + "/nosuchdb"), SqlError, "nosuchdb"),
    "s3-wrong-secret": lambda m, p, s: (
        S3Lease(_s3cfg(s, secret="not-the-secret"), "bad", TTL),
        ObjectStoreError,
        "access denied",
    ),
    "s3-unreachable": lambda m, p, s: (
        S3Lease(S3Config(endpoint=f"http://127.0.0.1:{free_port()}", bucket="nowhere"), "bad", TTL),
        ObjectStoreError,
        "cannot reach",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
async def test_bad_inputs_give_a_clear_error(
    case: str, mariadb: MariaDB, postgres: Postgres, s3_server: SeaweedS3
) -> None:
    backend, error, words = BAD_INPUTS[case](mariadb, postgres, s3_server)
    started = time.monotonic()
    with pytest.raises(error) as caught:
        await backend.try_acquire(record("a"))
    message = str(caught.value)
    assert words in message
    for secret in ("not-the-password", "not-the-secret", mariadb.password):
        assert secret not in message, f"a secret leaked into the error: {message}"
    assert time.monotonic() - started < TTL * 2, "a bad backend must fail within a lease round or so"
    assert not backend.held


def test_serve_leads_through_the_sql_lease_and_releases_it_on_stop(postgres: Postgres, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:10]}_"
    env = {
        "FLEETMATE_LEASE_BACKEND": "sql",
        "FLEETMATE_SQL_DSN": postgres.dsn,
        "FLEETMATE_SQL_TABLE_PREFIX": prefix,
        "FLEETMATE_LEASE_TTL": str(TTL),
        "FLEETMATE_LEASE_RENEW_INTERVAL": str(RENEW),
    }
    with running(Fleetmate(tmp_path / "fm", env=env)) as fm:
        wait_for(lambda: fm.get("/api/v1/cluster").json()["role"] == "leader", 10, "the replica to lead")
        row = postgres.sql(f"SELECT holder, term, expires_at > clock_timestamp() FROM {prefix}lease", "fleetmate")
        assert row.strip() == "t1|1|t"
        assert fm.stop() == 0
    row = postgres.sql(f"SELECT holder, expires_at > clock_timestamp() FROM {prefix}lease", "fleetmate")
    assert row.strip() == "t1|f", "a clean stop gives the lease back"
    assert not [line for line in fm.raw if "Traceback" in line or "Unclosed" in line], fm.raw[-5:]
