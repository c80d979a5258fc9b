"""HA on real processes: only fleetmate's link to the primary is cut, the replicas still replicate: no failover.

Holistic failure detection says a primary that fleetmate cannot reach while its replicas still
receive from it is UnreachablePrimary, never DeadPrimary. This checks it end to end:

- a MariaDB primary and two semi-sync GTID replicas (tests/harness/mariadb.py), each bound to its own
  address on the root side of a veth pair, reported and replicated through that address;
- a fleetmate process inside a network namespace (tests/harness/netns.py) at the other end of the veth,
  so every instance address it learns goes through the veth;
- the cut is made inside the namespace only, for the primary's address only: the replicas, in the
  root namespace, keep replicating from it and a writer in the root namespace keeps committing
  (semi-sync: each commit acknowledged by a replica).

Two cuts: `refused` (a prohibit route, connects fail at once) and `dropped` (every packet from the
primary discarded as it arrives, connects time out). During each cut fleetmate must report
UnreachablePrimary for the primary on every look and must not touch the topology: the registry's
primary key stays, no recovery is recorded, the failover hook never runs, the primary stays
writable and the replicas replicate from it. When the cut is lifted the finding clears.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import asyncmy  # type: ignore[import-untyped]
import pytest

from app.adaptors.types import Address
from tests.harness import Fleetmate, netns, running, wait_for
from tests.harness.mariadb import MariaDBReplicaSet
from tests.harness.netns import NetNamespace

WHY_NOT = netns.unavailable()
pytestmark = pytest.mark.skipif(bool(WHY_NOT), reason=f"needs a network namespace: {WHY_NOT}")

CLUSTER = "netcut"
VIEW = f"/api/v1/ha/clusters/{CLUSTER}"
PRIMARY_KEY = f"/api/v1/registry/nodes/fleet/clusters/{CLUSTER}/primary"
TOKEN = "netcut-Admin-7731"  # binding a non-loopback address needs API tokens


class Cut(NamedTuple):
    """A way to cut fleetmate off the primary, and what it does to a probe."""

    make: Callable[[NetNamespace, str], None]
    lift: Callable[[NetNamespace, str], None]
    probe_error: str  # in the finding's detail: shows the probe failed the way this cut makes it fail
    hold_s: float  # how long the cut is held while nothing may change: about 10 polls


# Polls are 0.5 s apart; a probe of a silently dropped primary waits for the 1 s connect timeout.
CUTS = {
    "refused": Cut(NetNamespace.refuse, NetNamespace.unrefuse, "Permission denied", 5.0),
    "dropped": Cut(NetNamespace.drop_from, NetNamespace.undrop_from, "no answer within 1s", 10.0),
}


@pytest.fixture(scope="module")
def ns() -> Iterator[NetNamespace]:
    try:
        space = NetNamespace().create()
    except RuntimeError as exc:
        pytest.skip(f"cannot make a network namespace here: {exc}")
    try:
        for n in (11, 12, 13):
            space.add_root_address(space.host(n))
        yield space
    finally:
        space.delete()


@pytest.fixture(scope="module")
def mariadb_set(ns: NetNamespace) -> Iterator[MariaDBReplicaSet]:
    replicas = MariaDBReplicaSet(3, semi_sync=True, hosts=[ns.host(11), ns.host(12), ns.host(13)])
    try:
        yield replicas.start()
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def fm(
    tmp_path_factory: pytest.TempPathFactory, ns: NetNamespace, mariadb_set: MariaDBReplicaSet
) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("ha-netns")
    admin, repl = MariaDBReplicaSet.admin, MariaDBReplicaSet.replication
    env = {
        "FLEETMATE_HTTP_HOST": ns.ns_ip,  # reachable from the root namespace over the veth
        "FLEETMATE_AUTH_TOKENS": f"admin:{TOKEN}",
        "FLEETMATE_HA_USER": admin.user,
        "FLEETMATE_HA_PASSWORD": admin.password,
        "FLEETMATE_HA_REPLICATION_USER": repl.user,
        "FLEETMATE_HA_REPLICATION_PASSWORD": repl.password,
        "FLEETMATE_HA_POLL_INTERVAL": "0.5",
        "FLEETMATE_HA_CONNECT_TIMEOUT": "1",
        "FLEETMATE_HA_RECOVERY_BLOCK_SECONDS": "0",  # a wrong DeadPrimary would fail over at once
        "FLEETMATE_HA_PRE_FAILOVER_HOOK": f"echo pre >> {tmp / 'hooks.log'}",
    }
    server = Fleetmate(tmp, env=env, prefix=ns.exec_prefix)
    with running(server):
        assert server.url.startswith(f"http://{ns.ns_ip}:"), server.url
        seed = mariadb_set.addresses[1]  # discovery from a replica, through the veth
        reply = server.post(
            "/api/v1/ha/clusters", json={"name": CLUSTER, "dsn": f"mysql://fleetmate@{seed}"}, token=TOKEN
        )
        assert reply.status_code == 201, reply.text
        assert reply.json()["primary"] == str(mariadb_set.addresses[0])
        yield server


@pytest.mark.parametrize("cut", sorted(CUTS))
def test_cut_from_fleetmate_to_primary_is_unreachable_primary_and_no_failover(
    cut: str, ns: NetNamespace, mariadb_set: MariaDBReplicaSet, fm: Fleetmate
) -> None:
    primary, replicas = mariadb_set.addresses[0], mariadb_set.addresses[1:]
    _wait_clean(fm, "a clean analysis before the cut")
    assert _primary_key(fm) == str(primary)
    table = f"cut_{cut}"
    mariadb_set.sql(0, f"CREATE TABLE app.{table} (id INT PRIMARY KEY)")
    writer = Writer(primary, table).start()
    try:
        wait_for(lambda: len(writer.acked) >= 20, 20, f"the writer's first commits ({writer.error})")
        _wait_rows_on_replicas(mariadb_set, table, writer.acked[-1])

        cut_started = time.time()
        how = CUTS[cut]
        how.make(ns, primary.host)
        try:
            finding = wait_for(
                lambda: _finding(fm, "UnreachablePrimary", primary), 30, f"UnreachablePrimary for {primary}"
            )
            assert "unreachable from fleetmate" in finding["detail"], finding
            assert how.probe_error in finding["detail"], finding
            assert any(str(r) in finding["detail"] for r in replicas), finding
            committed_at_cut = len(writer.acked)
            samples = _hold(fm, how.hold_s)
            committed = len(writer.acked)
            # Still cut off: what fleetmate saw and did (nothing) meanwhile.
            unreachable = [s for s in samples if ("UnreachablePrimary", str(primary)) in s["kinds"]]
            assert len(unreachable) == len(samples), samples
            assert not any(kind == "DeadPrimary" for s in samples for kind, _ in s["kinds"]), samples
            assert {s["primary"] for s in samples} == {str(primary)}, samples
            _assert_untouched(fm, mariadb_set, cut_started)
            assert committed > committed_at_cut, "the primary kept committing (semi-sync acknowledged) during the cut"
            _wait_rows_on_replicas(mariadb_set, table, writer.acked[-1])
        finally:
            how.lift(ns, primary.host)

        _wait_clean(fm, "the finding to clear once the cut is lifted")
        messages = [e["message"] for e in _history(fm, since=cut_started)]
        assert any(m.startswith("UnreachablePrimary: unreachable from fleetmate") for m in messages), messages
        assert "UnreachablePrimary cleared" in messages, messages
        _assert_untouched(fm, mariadb_set, cut_started)
    finally:
        writer.stop()
    assert writer.error == "", f"the primary refused a write: {writer.error}"
    _wait_rows_on_replicas(mariadb_set, table, writer.acked[-1])


# --- what fleetmate says -----------------------------------------------------------------------


def _address_text(value: Any) -> str:
    return f"{value['host']}:{value['port']}" if isinstance(value, dict) else str(value)


def _findings(fm: Fleetmate) -> list[tuple[str, str]]:
    """The leader's latest findings about the cluster as (kind, host:port)."""
    view = fm.get(VIEW, TOKEN).json()
    return [(a["kind"], _address_text(a["instance"])) for a in view["analyses"]]


def _wait_clean(fm: Fleetmate, what: str, timeout: float = 30) -> None:
    """Wait until the cluster has no finding at all; on timeout, say which ones are left."""
    try:
        wait_for(lambda: _findings(fm) == [], timeout, what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; findings now: {_findings(fm)}") from None


def _finding(fm: Fleetmate, kind: str, instance: Address) -> dict[str, Any] | None:
    for a in fm.get(VIEW, TOKEN).json()["analyses"]:
        if a["kind"] == kind and _address_text(a["instance"]) == str(instance):
            found: dict[str, Any] = a
            return found
    return None


def _primary_key(fm: Fleetmate) -> str:
    """The registry's /fleet/clusters/<name>/primary ('' when absent)."""
    reply = fm.get(PRIMARY_KEY, TOKEN)
    return str(reply.json()["data"]) if reply.status_code == 200 else ""


def _history(fm: Fleetmate, since: float) -> list[dict[str, Any]]:
    """The cluster's history entries recorded at or after `since` (unix seconds, same machine clock)."""
    entries: list[dict[str, Any]] = fm.get(f"{VIEW}/history", TOKEN).json()
    return [e for e in entries if e["at"] >= since]


def _hold(fm: Fleetmate, seconds: float) -> list[dict[str, Any]]:
    """Look at the cluster every 0.25 s for `seconds`: each look's findings and recorded primary."""
    samples: list[dict[str, Any]] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        view = fm.get(VIEW, TOKEN).json()
        kinds = [(a["kind"], _address_text(a["instance"])) for a in view["analyses"]]
        samples.append({"kinds": kinds, "primary": view["primary"]})
        time.sleep(0.25)
    return samples


def _assert_untouched(fm: Fleetmate, replicas: MariaDBReplicaSet, since: float) -> None:
    """No recovery was started or recorded since `since`, and the topology is the one set up."""
    primary = replicas.addresses[0]
    assert _primary_key(fm) == str(primary)
    entries = _history(fm, since)
    acted = [e for e in entries if e["kind"] in ("recovery", "blocked", "fenced", "failed")]
    assert acted == [], entries
    messages = [e["message"] for e in entries]
    assert not any(m.startswith(("DeadPrimary", "promoted", "primary is now")) for m in messages), messages
    assert not (fm.dir / "hooks.log").exists(), "the pre-failover hook ran"
    assert fm.logged("failover done") == []
    assert replicas.value(0, "SELECT @@read_only") == "0", "the primary is still writable"
    for i in (1, 2):
        link = _link(replicas, i)
        assert (link["host"], link["port"]) == (primary.host, str(primary.port)), link
        assert (link["io"], link["sql"]) == ("Yes", "Yes"), link
    assert replicas.status(0, "Rpl_semi_sync_master_status") == "ON"
    assert replicas.status(0, "Rpl_semi_sync_master_clients") == "2"


# --- what the databases say --------------------------------------------------------------------


def _link(replicas: MariaDBReplicaSet, i: int) -> dict[str, str]:
    """Instance i's SHOW SLAVE STATUS: source host and port, IO and SQL threads running."""
    row = replicas.sql(i, "SHOW SLAVE STATUS").rstrip("\n").split("\t")
    # MariaDB's column order: Slave_IO_State, Master_Host, Master_User, Master_Port, ...,
    # Slave_IO_Running (11th), Slave_SQL_Running (12th).
    return {"host": row[1], "port": row[3], "io": row[10], "sql": row[11]} if len(row) > 11 else {}


def _wait_rows_on_replicas(replicas: MariaDBReplicaSet, table: str, row_id: int) -> None:
    query = f"SELECT COUNT(*) FROM app.{table} WHERE id = {row_id}"
    for i in (1, 2):
        wait_for(lambda i=i: replicas.value(i, query) == "1", 30, f"row {row_id} of app.{table} on instance {i}")


class Writer:
    """Inserts rows into app.<table> on the primary over TCP from the root namespace, about 50 a second.

    `acked` holds the ids whose COMMIT returned (with semi-sync: a replica acknowledged them);
    `error` the first error (the writer stops there).
    """

    def __init__(self, address: Address, table: str) -> None:
        self.address = address
        self.table = table
        self.acked: list[int] = []
        self.error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=lambda: asyncio.run(self._run()), daemon=True)

    def start(self) -> Writer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)

    async def _run(self) -> None:
        app = MariaDBReplicaSet.app
        try:
            conn = await asyncmy.connect(
                host=self.address.host,
                port=self.address.port,
                user=app.user,
                password=app.password,
                db=app.database,
                autocommit=True,
            )
        except Exception as exc:
            self.error = f"connect: {exc!r}"
            return
        try:
            i = 0
            while not self._stop.is_set():
                i += 1
                async with conn.cursor() as cur:
                    await cur.execute(f"INSERT INTO {self.table} VALUES (%s)", (i,))
                self.acked.append(i)
                await asyncio.sleep(0.02)
        except Exception as exc:
            self.error = f"insert {i}: {exc!r}"
        finally:
            conn.close()
