"""HA failover under kill -9 of the primary: fleetmate on MariaDB and PostgreSQL, and Patroni on PostgreSQL, in rounds.

    python bench/ha.py [--rounds N] [--quick] [--engines mariadb,postgresql,patroni] [--install] [--patroni-strict]

Three parts, each on its own servers (free ports, temp dirs), one after the other:

mariadb     One fleetmate (recovery_block_seconds 0, poll_interval 0.5 s) watches a MariaDB 10.11
            primary with two semi-sync GTID replicas. Writable = a survivor's @@read_only is 0; key =
            the registry's /fleet/clusters/<name>/primary changed. The old primary is restarted as a
            replica, fenced by fleetmate.
postgresql  The same fleetmate settings watching a PostgreSQL 15 primary with two streaming standbys
            (tests/harness/postgres.py), synchronous_commit on with one synchronous standby (`FIRST 1` at
            first; afterwards what fleetmate's promotion sets). Key = the registry's primary key, as
            above. The old primary is rewound (PostgresAdaptor.rejoin: pg_rewind, standby.signal,
            primary_conninfo) and started as a standby of the new primary between rounds.
patroni     Debian's Patroni (system python3) with a single-member Debian etcd as its DCS, three
            members bootstrapping their own cluster from the same PostgreSQL 15 binaries and
            settings; ttl 10, loop_wait 2, retry_timeout 5, synchronous_mode on (strict only with
            --patroni-strict), use_pg_rewind so that the old member can rejoin. The kill is the whole
            node: its patroni and its postgres, SIGKILL at once. Key = etcd's /service/<scope>/leader
            key names another member. Patroni is restarted on the old member's configuration
            between rounds and rejoins it as a standby by itself.

Each round: a writer inserts rows into the primary and records every acknowledged commit; the
primary is killed; the time from the kill until (a) a survivor accepts a write and (b) the key
changes is measured; every acknowledged row must be on the new primary (lost rows are counted per
round). For PostgreSQL (both systems) "accepts a write" means an INSERT on a survivor returned from
its commit, with the synchronous replication the server has at that moment (a promoted standby
that must wait for a synchronous standby is not writable until one streams from it). The next
round starts once all three members stream again, and kills whichever is primary.

Prints a table per part and the ratios fleetmate-PostgreSQL / Patroni, and writes
bench/results/ha.json: the MariaDB fields as before (rounds, mariadb, summary), plus postgresql and
patroni sections and the ratios. A run of some parts keeps the others' sections from the previous
file (each section says when it ran; `ratio_...same_run` says whether both sides ran together).
Patroni, etcd-server and python3-etcd are installed with apt-get only with --install; without them
the Patroni part is skipped with a message.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from app.adaptors.postgresql import PostgresAdaptor
from app.adaptors.types import Credentials
from bench import patroni_peer
from bench.common import RESULTS, percentile, progress, write_result
from bench.patroni_peer import PatroniPeer
from tests.harness import Fleetmate, wait_for
from tests.harness.mariadb import MariaDBReplicaSet
from tests.harness.postgres import PostgresReplicaSet
from tests.harness.servers import PG_BIN, PG_USER
from tests.test_ha_service import _write

CLUSTER = "bench"
ENGINES = ("mariadb", "postgresql", "patroni")
FAILOVER_TIMEOUT_S = 90.0  # a round whose failover takes longer records None
PROBE_TABLE = "failover_probe"
FLEETMATE_ENV = {"FLEETMATE_HA_POLL_INTERVAL": "0.5", "FLEETMATE_HA_RECOVERY_BLOCK_SECONDS": "0"}

KeyMoved = Callable[[httpx.AsyncClient], Awaitable[bool]]


def _primary(fm: Fleetmate) -> str:
    reply = fm.get(f"/api/v1/registry/nodes/fleet/clusters/{CLUSTER}/primary")
    return str(reply.json()["data"]) if reply.status_code == 200 else ""


def _stop_fleetmate(fm: Fleetmate | None) -> None:
    if fm is not None and fm.proc is not None:
        with contextlib.suppress(AssertionError):  # it was killed after the grace period
            fm.stop()


def _seconds(value: float | None) -> str:
    return "   never" if value is None else f"{value:.2f} s"


# ---- MariaDB ---------------------------------------------------------------------------------------


def _writable(replicas: MariaDBReplicaSet, i: int) -> bool:
    try:
        return replicas.value(i, "SELECT @@read_only") == "0"
    except AssertionError:
        return False


def one_round(fm: Fleetmate, replicas: MariaDBReplicaSet, n: int) -> dict[str, Any]:
    seeds = [str(a) for a in replicas.addresses]
    old = seeds.index(_primary(fm))
    acked: list[int] = []
    stop = threading.Event()
    table = f"r{n}"
    replicas.sql(old, f"CREATE TABLE app.{table} (id INT PRIMARY KEY)")
    writer = threading.Thread(target=_write, args=(replicas.addresses[old].port, acked, stop, table), daemon=True)
    writer.start()
    wait_for(lambda: len(acked) >= 50, 20, "the writer's first commits")
    survivors = [i for i in range(len(seeds)) if i != old]
    killed = time.monotonic()
    replicas.kill(old)
    writable_s = key_s = None
    while (writable_s is None or key_s is None) and time.monotonic() - killed < 60:
        now = time.monotonic() - killed
        if writable_s is None and any(_writable(replicas, i) for i in survivors):
            writable_s = now
        if key_s is None and _primary(fm) not in ("", seeds[old]):
            key_s = now
        time.sleep(0.01)
    stop.set()
    writer.join(10)
    new = seeds.index(_primary(fm))
    have = {int(x) for x in replicas.sql(new, f"SELECT id FROM app.{table}").split()}
    lost = len(set(acked) - have)
    replicas.restart(old, as_replica=True)
    wait_for(lambda: replicas.value(old, "SELECT @@read_only") == "1", 30, "the old primary fenced")
    replicas.wait_replicated(timeout=60)
    return {"killed": seeds[old], "new_primary": seeds[new], "writable_s": writable_s, "key_s": key_s,
            "acknowledged": len(acked), "lost": lost}  # fmt: skip


def _fleetmate_env(admin: Credentials, repl: Credentials) -> dict[str, str]:
    """The environment of the fleetmate under test: the cluster's logins and the bench's HA timings."""
    return {
        "FLEETMATE_HA_USER": admin.user,
        "FLEETMATE_HA_PASSWORD": admin.password,
        "FLEETMATE_HA_REPLICATION_USER": repl.user,
        "FLEETMATE_HA_REPLICATION_PASSWORD": repl.password,
        **FLEETMATE_ENV,
    }


def mariadb_rounds(rounds: int, results: list[dict[str, Any]]) -> None:
    """Run the MariaDB rounds, appending each round's figures to results."""
    progress("starting MariaDB: a primary and two semi-sync GTID replicas")
    replicas = MariaDBReplicaSet(3, semi_sync=True).start()
    tmp = Path(tempfile.mkdtemp(prefix="fleetmate-bench-ha-"))
    env = _fleetmate_env(MariaDBReplicaSet.admin, MariaDBReplicaSet.replication)
    fm: Fleetmate | None = None
    try:
        fm = Fleetmate(tmp, env=env).start()
        reply = httpx.post(
            f"{fm.url}/api/v1/ha/clusters", json={"name": CLUSTER, "dsn": f"mysql://fleetmate@{replicas.addresses[0]}"},
            timeout=60,
        )  # fmt: skip
        reply.raise_for_status()
        for n in range(1, rounds + 1):
            res = one_round(fm, replicas, n)
            results.append(res)
            progress(
                f"MariaDB round {n}/{rounds}: killed {res['killed']}, new primary {res['new_primary']}: writable after "
                f"{_seconds(res['writable_s'])}, registry key after {_seconds(res['key_s'])}; "
                f"{res['acknowledged']} acknowledged, {res['lost']} lost"
            )
    finally:
        _stop_fleetmate(fm)
        replicas.stop()
        shutil.rmtree(tmp, ignore_errors=True)


# ---- PostgreSQL, both systems --------------------------------------------------------------------------


def _pg_write(port: int, login: Credentials, table: str, acked: list[int], stop: threading.Event) -> None:
    """Insert rows one by one into the primary; record each id once its commit returned."""

    async def run() -> None:
        conn = await asyncpg.connect(
            host="127.0.0.1", port=port, user=login.user, password=login.password, database="postgres", timeout=10
        )
        i = 0
        try:
            while not stop.is_set():
                i += 1
                await conn.execute(f"INSERT INTO {table} VALUES ($1)", i)
                acked.append(i)
        except Exception:
            return  # the primary died: what was acknowledged is in `acked`
        finally:
            conn.terminate()

    asyncio.run(run())


async def _probe_writes(ports: list[int], login: Credentials, killed: float, timeout: float) -> float | None:
    """Seconds from `killed` until an INSERT on one of ports returned from its commit; None after timeout."""
    done = asyncio.Event()
    times: list[float] = []

    async def probe(port: int) -> None:
        conn: Any = None
        try:
            while not done.is_set() and time.monotonic() - killed < timeout:
                try:
                    if conn is None:
                        conn = await asyncpg.connect(
                            host="127.0.0.1", port=port, user=login.user, password=login.password,
                            database="postgres", timeout=1,
                        )  # fmt: skip
                    await conn.execute(f"INSERT INTO {PROBE_TABLE} DEFAULT VALUES", timeout=2)
                except asyncpg.PostgresError:  # a standby refuses writes; the session stays usable
                    await asyncio.sleep(0.01)
                    continue
                except Exception:  # not up, or the commit did not return in time: a new session
                    if conn is not None:
                        conn.terminate()
                        conn = None
                    await asyncio.sleep(0.01)
                    continue
                times.append(time.monotonic() - killed)
                done.set()
        finally:
            if conn is not None:
                conn.terminate()

    await asyncio.gather(*(probe(p) for p in ports))
    return min(times) if times else None


async def _watch_key(key_moved: KeyMoved, killed: float, timeout: float) -> float | None:
    async with httpx.AsyncClient(timeout=2, trust_env=False) as client:
        while time.monotonic() - killed < timeout:
            with contextlib.suppress(httpx.HTTPError, ValueError, KeyError):
                if await key_moved(client):
                    return time.monotonic() - killed
            await asyncio.sleep(0.01)
    return None


def _failover_times(
    ports: list[int], login: Credentials, killed: float, key_moved: KeyMoved
) -> tuple[float | None, float | None]:
    """(writable_s, key_s) after a kill at `killed`, both watched at once."""

    async def both() -> tuple[float | None, float | None]:
        writable, key = await asyncio.gather(
            _probe_writes(ports, login, killed, FAILOVER_TIMEOUT_S), _watch_key(key_moved, killed, FAILOVER_TIMEOUT_S)
        )
        return writable, key

    return asyncio.run(both())


def _sync_state(sql: Callable[[int, str], str], primary: int, timeout: float = 60) -> None:
    """When the primary has synchronous_standby_names, wait until a standby is synchronous (sync/quorum)."""
    if sql(primary, "SHOW synchronous_standby_names"):

        def synchronous() -> bool:
            states = sql(primary, "SELECT sync_state FROM pg_stat_replication").split()
            return any(s in ("sync", "quorum") for s in states)

        wait_for(synchronous, timeout, "a synchronous standby", interval=0.1)


def _start_writer(port: int, login: Credentials, table: str) -> tuple[threading.Thread, list[int], threading.Event]:
    acked: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(target=_pg_write, args=(port, login, table, acked, stop), daemon=True)
    writer.start()

    def started() -> bool:
        if not writer.is_alive() and len(acked) < 50:
            raise AssertionError("the writer stopped before its first commits")
        return len(acked) >= 50

    wait_for(started, 30, "the writer's first commits")
    return writer, acked, stop


def _lost(sql: Callable[[int, str], str], new: int, table: str, acked: list[int]) -> int:
    have = {int(x) for x in sql(new, f"SELECT id FROM {table}").split()}
    return len(set(acked) - have)


def pg_round(fm: Fleetmate, pgset: PostgresReplicaSet, n: int) -> dict[str, Any]:
    """One fleetmate PostgreSQL round; the old primary is rewound and streams again before it returns."""
    seeds = [str(a) for a in pgset.addresses]
    old = seeds.index(_primary(fm))
    _sync_state(pgset.sql, old)
    table = f"r{n}"
    pgset.sql(old, f"CREATE TABLE {table} (id bigint PRIMARY KEY)")
    login = PostgresReplicaSet.admin
    writer, acked, stop = _start_writer(pgset.nodes[old].port, login, table)
    survivors = [i for i in range(len(seeds)) if i != old]

    async def key_moved(client: httpx.AsyncClient) -> bool:
        reply = await client.get(f"{fm.url}/api/v1/registry/nodes/fleet/clusters/{CLUSTER}/primary")
        return reply.status_code == 200 and str(reply.json()["data"]) not in ("", seeds[old])

    sync_names = pgset.sql(old, "SHOW synchronous_standby_names")  # as the kill finds it
    killed = time.monotonic()
    pgset.kill(old)
    writable_s, key_s = _failover_times([pgset.nodes[i].port for i in survivors], login, killed, key_moved)
    stop.set()
    writer.join(10)
    new_primary = wait_for(lambda: (p := _primary(fm)) not in ("", seeds[old]) and p, 60, "a new primary")
    new = seeds.index(new_primary)
    lost = _lost(pgset.sql, new, table, acked)

    # Between rounds, not measured: the old primary rewound and started as a standby of the new one.
    adaptor = PostgresAdaptor(login, replication=PostgresReplicaSet.replication)
    rejoin = adaptor.rejoin(
        pgset.addresses[old], pgset.addresses[new], pgset.data_dir(old), run_as=PG_USER, bin_dir=PG_BIN
    )
    asyncio.run(rejoin)
    pgset.start_node(old)
    pgset.wait_streaming(new, list(range(len(seeds))), timeout=60)

    def fleetmate_sees_it() -> bool:
        view = fm.get(f"/api/v1/ha/clusters/{CLUSTER}").json()
        mine = {i["address"]: i for i in view["instances"]}.get(seeds[old], {})
        return bool(view["primary"] == new_primary and mine.get("role") == "replica" and mine.get("receiving"))

    wait_for(fleetmate_sees_it, 30, "fleetmate to record the old primary as a streaming standby", interval=0.2)
    return {"killed": seeds[old], "new_primary": new_primary, "writable_s": writable_s, "key_s": key_s,
            "acknowledged": len(acked), "lost": lost, "synchronous_standby_names": sync_names}  # fmt: skip


def postgresql_rounds(rounds: int, results: list[dict[str, Any]]) -> None:
    """Run the fleetmate PostgreSQL rounds, appending each round's figures to results."""
    progress("starting PostgreSQL 15: a primary and two streaming standbys, one synchronous")
    pgset = PostgresReplicaSet(3, synchronous="first").start()
    tmp = Path(tempfile.mkdtemp(prefix="fleetmate-bench-ha-pg-"))
    admin = PostgresReplicaSet.admin
    env = _fleetmate_env(admin, PostgresReplicaSet.replication)
    fm: Fleetmate | None = None
    try:
        pgset.sql(0, f"CREATE TABLE {PROBE_TABLE} (at timestamptz DEFAULT clock_timestamp())")
        fm = Fleetmate(tmp, env=env).start()
        reply = fm.post(
            "/api/v1/ha/clusters", json={"name": CLUSTER, "dsn": f"postgresql://{admin.user}@{pgset.addresses[0]}/postgres"},
            timeout=60,
        )  # fmt: skip
        reply.raise_for_status()
        for n in range(1, rounds + 1):
            res = pg_round(fm, pgset, n)
            results.append(res)
            progress(
                f"PostgreSQL round {n}/{rounds}: killed {res['killed']}, new primary {res['new_primary']}: writable "
                f"after {_seconds(res['writable_s'])}, registry key after {_seconds(res['key_s'])}; "
                f"{res['acknowledged']} acknowledged, {res['lost']} lost"
            )
    finally:
        _stop_fleetmate(fm)
        pgset.stop()
        shutil.rmtree(tmp, ignore_errors=True)


def patroni_round(peer: PatroniPeer, n: int) -> dict[str, Any]:
    """One Patroni round; the old member's patroni is restarted and everything streams again before it returns."""
    peer.wait_healthy(180)
    # Patroni reassigns its synchronous standby on its own loop after a member rejoins: let it
    # settle (two loops) so that a round does not kill the leader in the middle of that.
    time.sleep(2 * peer.settings["loop_wait"])
    old = peer.wait_healthy(180)
    names = [m.name for m in peer.members]
    _sync_state(peer.sql, old)
    table = f"r{n}"
    peer.sql(old, f"CREATE TABLE {table} (id bigint PRIMARY KEY)")
    login = PatroniPeer.superuser
    writer, acked, stop = _start_writer(peer.members[old].port, login, table)
    survivors = [i for i in range(len(names)) if i != old]
    range_url, key_body = f"{peer.etcd.url}/v3/kv/range", patroni_peer.range_body(peer.leader_key)

    async def key_moved(client: httpx.AsyncClient) -> bool:
        reply = await client.post(range_url, json=key_body)
        return reply.status_code == 200 and patroni_peer.range_value(reply.json()) not in ("", names[old])

    sync_names = peer.sql(old, "SHOW synchronous_standby_names")  # as the kill finds it
    killed = time.monotonic()
    peer.kill(old)
    writable_s, key_s = _failover_times([peer.members[i].port for i in survivors], login, killed, key_moved)
    stop.set()
    writer.join(10)

    def promoted() -> int | None:
        leader = peer.leader()
        if leader is None or leader == old or peer.sql(leader, "SELECT pg_is_in_recovery()") != "f":
            return None
        return leader + 1  # wait_for wants a truthy value

    stuck = ""
    if writable_s is None:
        # No survivor took over within FAILOVER_TIMEOUT_S (seen with synchronous_mode: each
        # survivor deferring to the other). Recorded as a round without failover; the old member's
        # patroni is started again so that the next round has a cluster.
        stuck = f"no failover within {FAILOVER_TIMEOUT_S:g} s; the old member was restarted to recover"
        progress(f"Patroni round {n}: {stuck}")
        peer.restart(old)
        new = peer.wait_healthy(180)
    else:
        new = wait_for(promoted, 60, "Patroni's new leader to be a primary", interval=0.1) - 1
        # Between rounds, not measured: patroni started again on the old member, which it rewinds.
        peer.restart(old)
        peer.wait_healthy(180)
    lost = _lost(peer.sql, new, table, acked)
    return {"killed": names[old], "new_primary": names[new], "writable_s": writable_s, "key_s": key_s,
            "acknowledged": len(acked), "lost": lost, "synchronous_standby_names": sync_names,
            "stuck": stuck}  # fmt: skip


def patroni_rounds(rounds: int, results: list[dict[str, Any]], peer: PatroniPeer) -> None:
    """Run the Patroni rounds on a started peer, appending each round's figures to results."""
    leader = peer.wait_healthy(60)
    peer.sql(leader, f"CREATE TABLE {PROBE_TABLE} (at timestamptz DEFAULT clock_timestamp())")
    for n in range(1, rounds + 1):
        res = patroni_round(peer, n)
        results.append(res)
        progress(
            f"Patroni round {n}/{rounds}: killed {res['killed']}, new leader {res['new_primary']}: writable after "
            f"{_seconds(res['writable_s'])}, etcd leader key after {_seconds(res['key_s'])}; "
            f"{res['acknowledged']} acknowledged, {res['lost']} lost"
        )


# ---- results -------------------------------------------------------------------------------------------


def _stat(values: list[float]) -> dict[str, float]:
    return {"median": percentile(values, 50), "max": max(values, default=float("nan"))}


def summarize(results: list[dict[str, Any]], key_name: str) -> dict[str, Any]:
    """Median and max of the rounds that saw a failover, and the acknowledged and lost writes."""
    writable = [r["writable_s"] for r in results if r["writable_s"] is not None]
    key = [r["key_s"] for r in results if r["key_s"] is not None]
    return {
        "writable_s": _stat(writable),
        key_name: _stat(key),
        "acknowledged": sum(r["acknowledged"] for r in results),
        "lost": sum(r["lost"] for r in results),
        "lost_per_round": [r["lost"] for r in results],
        "rounds_without_failover": sum(1 for r in results if r["writable_s"] is None or r["key_s"] is None),
    }


def print_table(
    title: str, results: list[dict[str, Any]], summary: dict[str, Any], rows: list[tuple[str, str]]
) -> None:
    print()
    print(f"{title:70} median s   max s")
    for label, key in rows:
        print(f"  {label:68} {summary[key]['median']:8.2f} {summary[key]['max']:7.2f}")
    per_round = ", ".join(str(r["lost"]) for r in results) or "-"
    print(f"  acknowledged writes {summary['acknowledged']}, lost {summary['lost']} (per round: {per_round})")
    if summary.get("rounds_without_failover"):
        print(f"  rounds with no failover within {FAILOVER_TIMEOUT_S:g} s: {summary['rounds_without_failover']}")
    if summary.get("error"):
        print(f"  stopped by an error: {summary['error']}")


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratios(pg: dict[str, Any], pat: dict[str, Any]) -> dict[str, Any]:
    """fleetmate-PostgreSQL / Patroni for median and max of writable and of the key change."""
    pairs = (("writable_s", "writable_s", "writable_s"), ("primary_key_s", "registry_key_s", "leader_key_s"))
    return {out: {stat: _ratio(pg[a][stat], pat[b][stat]) for stat in ("median", "max")} for out, a, b in pairs} | {
        "primary_key_s_compares": "fleetmate's registry primary key / Patroni's etcd leader key"
    }


def _previous() -> dict[str, Any]:
    with contextlib.suppress(OSError, ValueError):
        data: dict[str, Any] = json.loads((RESULTS / "ha.json").read_text())
        return data
    return {}


def _etcd_version() -> str:
    etcd = shutil.which("etcd")
    if not etcd:
        return ""
    out = subprocess.run([etcd, "--version"], capture_output=True, text=True, check=False).stdout
    return out.split()[2] if out.startswith("etcd Version:") else ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    parser.add_argument("--engines", default=",".join(ENGINES), help="comma-separated: " + ", ".join(ENGINES))
    parser.add_argument("--install", action="store_true", help="apt-get install Patroni and etcd when missing")
    parser.add_argument(
        "--patroni-strict", action="store_true", help="also synchronous_mode_strict (no write without a sync standby)"
    )
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    unknown = set(engines) - set(ENGINES)
    if unknown or not engines:
        parser.error(f"unknown engines {sorted(unknown)}; choose from {', '.join(ENGINES)}")
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    previous = _previous()
    data: dict[str, Any] = {}
    failed = False

    def run(name: str, part: Callable[[list[dict[str, Any]]], None]) -> tuple[list[dict[str, Any]], str]:
        results: list[dict[str, Any]] = []
        try:
            part(results)
        except Exception as exc:  # one part failing does not lose the others; KeyboardInterrupt stops all
            progress(f"{name} stopped after {len(results)} rounds: {exc!r}")
            return results, repr(exc)
        return results, ""

    if "mariadb" in engines:
        results, error = run("MariaDB", lambda out: mariadb_rounds(rounds, out))
        summary = summarize(results, "registry_key_s")
        summary["targets"] = "median <= 3 s, max <= 6 s, zero acknowledged transactions lost with semi-sync"
        if error:
            summary["error"] = error
        data |= {"rounds": rounds, "mariadb": results, "summary": summary, "mariadb_at": now}
        failed |= bool(error) or summary["lost"] > 0 or summary["rounds_without_failover"] > 0
    elif "mariadb" in previous:
        data |= {k: previous[k] for k in ("rounds", "mariadb", "summary") if k in previous}
        data["mariadb_at"] = previous.get("mariadb_at", previous.get("at"))

    if "postgresql" in engines:
        results, error = run("PostgreSQL", lambda out: postgresql_rounds(rounds, out))
        summary = summarize(results, "registry_key_s") | ({"error": error} if error else {})
        data["postgresql"] = {"at": now, "rounds": rounds, "results": results, "summary": summary}
        failed |= bool(error) or summary["lost"] > 0 or summary["rounds_without_failover"] > 0
    elif "postgresql" in previous:
        data["postgresql"] = previous["postgresql"]

    patroni_skipped = ""
    if "patroni" in engines:
        patroni_skipped = patroni_peer.ensure_installed(args.install) or ""
    if "patroni" in engines and not patroni_skipped:
        peer = PatroniPeer(3, ttl=10, loop_wait=2, retry_timeout=5, synchronous=True, strict=args.patroni_strict)
        progress("starting etcd and three Patroni members (initdb, base backups)")
        section: dict[str, Any] = {"at": now, "rounds": rounds, "version": patroni_peer.patroni_version(),
                                   "etcd_version": _etcd_version(), "settings": peer.settings}  # fmt: skip
        try:

            def part(out: list[dict[str, Any]]) -> None:
                peer.start()
                patroni_rounds(rounds, out, peer)

            results, error = run("Patroni", part)
        finally:
            peer.stop()
        summary = summarize(results, "leader_key_s") | ({"error": error} if error else {})
        data["patroni"] = section | {"results": results, "summary": summary}
        failed |= bool(error)
    else:
        if patroni_skipped:
            progress(f"skipping Patroni: {patroni_skipped}")
        if "patroni" in previous:
            data["patroni"] = previous["patroni"]

    if "mariadb" in data:
        print_table(
            f"MariaDB 10.11 via fleetmate, semi-sync, {data['rounds']} rounds of kill -9 of the primary",
            data["mariadb"],
            data["summary"],
            [("a new primary accepts writes", "writable_s"), ("the registry's primary key updated", "registry_key_s")],
        )
    if "postgresql" in data:
        print_table(
            f"PostgreSQL 15 via fleetmate, synchronous, {data['postgresql']['rounds']} rounds of kill -9",
            data["postgresql"]["results"],
            data["postgresql"]["summary"],
            [("a new primary accepts writes", "writable_s"), ("the registry's primary key updated", "registry_key_s")],
        )
    if "patroni" in data:
        p = data["patroni"]
        s = p["settings"]
        mode = "synchronous_mode_strict" if s.get("synchronous_mode_strict") else "synchronous_mode"
        print_table(
            f"PostgreSQL 15 via Patroni {p['version']} + etcd {p['etcd_version']}, {p['rounds']} rounds of kill -9",
            p["results"],
            p["summary"],
            [
                ("a new primary accepts writes", "writable_s"),
                ("etcd's leader key names another member", "leader_key_s"),
            ],
        )
        print(
            f"  (ttl {s['ttl']}, loop_wait {s['loop_wait']}, retry_timeout {s['retry_timeout']}, {mode}, use_pg_rewind)"
        )
    if "postgresql" in data and "patroni" in data:
        ratio = ratios(data["postgresql"]["summary"], data["patroni"]["summary"])
        ratio["same_run"] = data["postgresql"]["at"] == data["patroni"]["at"]
        data["ratio_fleetmate_postgresql_over_patroni"] = ratio
        print()
        print(f"{'fleetmate-PostgreSQL / Patroni':70}   median     max")
        for label, key in (
            ("a new primary accepts writes", "writable_s"),
            ("primary key / leader key", "primary_key_s"),
        ):
            print(f"  {label:68} {ratio[key]['median']:8.2f} {ratio[key]['max']:7.2f}")
        if not ratio["same_run"]:
            print(f"  (not from the same run: PostgreSQL {data['postgresql']['at']}, Patroni {data['patroni']['at']})")
    if patroni_skipped:
        print(f"\nPatroni skipped: {patroni_skipped}")
    path = write_result("ha", data)
    print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
