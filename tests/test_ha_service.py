"""HA end to end on real MariaDB: register by discovery, kill -9 the primary, automatic failover, fencing.

A fleetmate process and a MariaDB primary with two semi-sync GTID replicas (tests/harness/mariadb.py);
a writer records every commit the primary acknowledged; nothing acknowledged may be lost.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncmy  # type: ignore[import-untyped]
import httpx
import pytest

from tests.harness import ROOT, Fleetmate, running, wait_for
from tests.harness.mariadb import MariaDBReplicaSet

CLUSTERS = "/api/v1/ha/clusters"
CALLER_TRACE = "0af7651916cd43dd8448eb211c80319c"
HOOK_VARS = "$FLEETMATE_HA_CLUSTER $FLEETMATE_HA_OLD_PRIMARY $FLEETMATE_HA_NEW_PRIMARY"


@pytest.fixture(scope="module")
def mariadb_set() -> Iterator[MariaDBReplicaSet]:
    replicas = MariaDBReplicaSet(3, semi_sync=True).start()
    try:
        yield replicas
    finally:
        replicas.stop()


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory, mariadb_set: MariaDBReplicaSet) -> Iterator[Fleetmate]:
    tmp: Path = tmp_path_factory.mktemp("ha")
    admin, repl = MariaDBReplicaSet.admin, MariaDBReplicaSet.replication
    hooks = tmp / "hooks.log"
    env = {
        "FLEETMATE_HA_USER": admin.user,
        "FLEETMATE_HA_PASSWORD": admin.password,
        "FLEETMATE_HA_REPLICATION_USER": repl.user,
        "FLEETMATE_HA_REPLICATION_PASSWORD": repl.password,
        "FLEETMATE_HA_POLL_INTERVAL": "0.5",
        "FLEETMATE_HA_PRE_FAILOVER_HOOK": f'echo "pre {HOOK_VARS}" >> {hooks}',
        "FLEETMATE_HA_POST_FAILOVER_HOOK": f'echo "post {HOOK_VARS}" >> {hooks}',
    }
    with running(Fleetmate(tmp, env=env)) as server:
        server.hooks = hooks  # type: ignore[attr-defined]
        yield server


def _primary(fm: Fleetmate) -> str:
    reply = fm.get("/api/v1/registry/nodes/fleet/clusters/orders/primary")
    return str(reply.json()["data"]) if reply.status_code == 200 else ""


def test_bad_registrations_are_refused_and_change_nothing(fm: Fleetmate, mariadb_set: MariaDBReplicaSet) -> None:
    seed = mariadb_set.addresses[0]
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"name": "x", "dsn": f"mysql://fleetmate:pw-Zq81x@{seed}"}, 400, "password"),
        ({"name": "x", "dsn": f"redis://{seed}"}, 400, "must start with"),
        ({"name": "bad name!", "dsn": f"mysql://fleetmate@{seed}"}, 400, "name"),
        ({"name": "x", "dsn": "mysql://fleetmate@127.0.0.1:1"}, 502, "cannot reach"),
        # Wrong credentials: the configured password is not this user's.
        ({"name": "x", "dsn": f"mysql://nobody@{seed}"}, 502, "denied"),
        ({"name": "x", "dsn": f"mysql://fleetmate@{seed}", "extra": 1}, 400, "extra"),
    ]
    for body, status, words in cases:
        reply = fm.post(CLUSTERS, json=body)
        assert reply.status_code == status, (body, reply.text)
        assert words in reply.text, reply.text
        assert "pw-Zq81x" not in reply.text
        assert MariaDBReplicaSet.admin.password not in reply.text
    assert fm.get(CLUSTERS).json() == []
    assert fm.get(f"{CLUSTERS}/nope").status_code == 404


def test_register_by_discovery_from_a_replica(fm: Fleetmate, mariadb_set: MariaDBReplicaSet) -> None:
    seeds = mariadb_set.addresses
    reply = fm.post(CLUSTERS, json={"name": "orders", "dsn": f"mysql://fleetmate@{seeds[1]}"})
    assert reply.status_code == 201, reply.text
    view = reply.json()
    assert view["primary"] == str(seeds[0]), "discovery from a replica finds the primary"
    roles = {i["address"]: i["role"] for i in view["instances"]}
    assert roles == {str(seeds[0]): "primary", str(seeds[1]): "replica", str(seeds[2]): "replica"}
    assert fm.post(CLUSTERS, json={"name": "orders", "dsn": f"mysql://fleetmate@{seeds[0]}"}).status_code == 409
    topology = _cli(fm, "topology", "orders")
    assert topology[0] == f"cluster orders (mysql), primary {seeds[0]}"
    assert topology[1].startswith(f"{seeds[0]}  [primary, writable")
    assert sorted(line.split()[1] for line in topology[2:4]) == sorted([str(seeds[1]), str(seeds[2])])
    assert _cli(fm, "list")[1].split()[:3] == ["orders", "mysql", str(seeds[0])]


def test_switchover_loses_nothing_and_can_go_back(fm: Fleetmate, mariadb_set: MariaDBReplicaSet) -> None:
    seeds = mariadb_set.addresses
    mariadb_set.sql(0, "CREATE TABLE app.s (id INT PRIMARY KEY)")
    for target, index in ((seeds[1], 1), (seeds[0], 0)):
        source = 0 if index == 1 else 1
        acked: list[int] = []
        stop = threading.Event()
        writer = threading.Thread(target=_write, args=(seeds[source].port, acked, stop, "s"), daemon=True)
        writer.start()
        wait_for(lambda: len(acked) >= 20, 20, "the writer's first commits")  # noqa: B023
        # The first switchover continues a caller's trace: its history entries carry that trace id.
        headers = {"traceparent": f"00-{CALLER_TRACE}-00f067aa0ba902b7-01"} if index == 1 else {}
        reply = httpx.post(
            f"{fm.url}{CLUSTERS}/orders/switchover", json={"to": str(target)}, headers=headers, timeout=90
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["primary"] == str(target)
        stop.set()
        writer.join(10)
        assert _primary(fm) == str(target)
        assert mariadb_set.value(index, "SELECT @@read_only") == "0"
        assert mariadb_set.value(source, "SELECT @@read_only") == "1"
        have = {int(x) for x in mariadb_set.sql(index, "SELECT id FROM app.s").split()}
        assert set(acked) <= have, f"lost acknowledged rows: {sorted(set(acked) - have)[:10]}"
        for other in range(3):
            if other != index:
                wait_for(lambda: _source_port(mariadb_set, other) == str(target.port), 20, "replicas repointed")  # noqa: B023
        mariadb_set.sql(index, "DELETE FROM app.s")
    # Each switchover's steps are one trace: the caller's for the first, a trace of its own for the second.
    steps = [
        e
        for e in fm.get(f"{CLUSTERS}/orders/history").json()
        if "switchover" in e["message"] or "primary is now" in e["message"]
    ]
    by_trace: dict[str, list[str]] = {}
    for e in steps:
        by_trace.setdefault(e["trace_id"], []).append(e["message"])
    assert len(by_trace) == 2, by_trace
    assert f"primary is now {seeds[1]} (was {seeds[0]})" in by_trace[CALLER_TRACE]
    assert all(len(t) == 32 for t in by_trace), by_trace
    audited = fm.get(f"/api/v1/audit?trace_id={CALLER_TRACE}").json()
    assert {(e["source"], e["subject"]) for e in audited} == {("ha", "orders")}
    assert {e["message"] for e in audited} >= set(by_trace[CALLER_TRACE])
    assert any(f"primary is now {seeds[1]}" in line and CALLER_TRACE in line for line in _cli(fm, "history", "orders"))
    bad = fm.post(f"{CLUSTERS}/orders/switchover", json={"to": "127.0.0.1:1"})
    assert bad.status_code == 400
    assert "not a reachable replica" in bad.text
    assert fm.post(f"{CLUSTERS}/nope/switchover", json={}).status_code == 404
    assert _primary(fm) == str(seeds[0])


def test_rules_and_downtime_change_the_record_and_bad_ones_change_nothing(
    fm: Fleetmate, mariadb_set: MariaDBReplicaSet
) -> None:
    seeds = mariadb_set.addresses
    before = fm.get(f"{CLUSTERS}/orders").json()["cluster"]
    for path, body, status in [
        (f"instances/{seeds[1]}/rule", {"rule": "sometimes"}, 400),
        ("instances/127.0.0.1:1/rule", {"rule": "prefer"}, 400),
        ("instances/not-an-address/rule", {"rule": "prefer"}, 400),
        (f"instances/{seeds[1]}/downtime", {"seconds": -1}, 400),
    ]:
        reply = httpx.put(f"{fm.url}{CLUSTERS}/orders/{path}", json=body, timeout=10)
        assert reply.status_code == status, (path, reply.text)
    assert httpx.put(f"{fm.url}{CLUSTERS}/nope/instances/{seeds[1]}/rule", json={"rule": "prefer"}).status_code == 404
    assert fm.get(f"{CLUSTERS}/orders").json()["cluster"] == before
    _cli(fm, "downtime", "orders", str(seeds[2]), "3600", "--reason", "disk swap")
    assert str(seeds[2]) in fm.get(f"{CLUSTERS}/orders").json()["cluster"]["downtime"]
    _cli(fm, "downtime", "orders", str(seeds[2]), "0")
    assert fm.get(f"{CLUSTERS}/orders").json()["cluster"]["downtime"] == {}
    _cli(fm, "rule", "orders", str(seeds[1]), "must_not")
    assert fm.get(f"{CLUSTERS}/orders").json()["cluster"]["rules"] == {str(seeds[1]): "must_not"}
    # Back to neutral: under semi-sync either replica may be the one holding the last acknowledged
    # commit when the primary dies, and a must_not replica that alone holds it blocks the recovery
    # (the failover test sets must_not once every replica holds everything).
    _cli(fm, "rule", "orders", str(seeds[1]), "neutral")
    assert fm.get(f"{CLUSTERS}/orders").json()["cluster"]["rules"] == {}


def test_failover_after_kill_9_and_fencing(fm: Fleetmate, mariadb_set: MariaDBReplicaSet) -> None:
    seeds = mariadb_set.addresses
    assert _primary(fm) == str(seeds[0])

    mariadb_set.sql(0, "CREATE TABLE app.t (id INT PRIMARY KEY)")
    acked: list[int] = []
    stop = threading.Event()
    writer = threading.Thread(target=_write, args=(seeds[0].port, acked, stop), daemon=True)
    writer.start()
    wait_for(lambda: len(acked) >= 50, 20, "the writer's first commits")
    mariadb_set.kill(0)  # kill -9 the primary under load
    new = wait_for(lambda: (p := _primary(fm)) != str(seeds[0]) and p, 30, "the registry's primary key to change")
    stop.set()
    writer.join(10)
    assert new in (str(seeds[1]), str(seeds[2]))
    i_new = 1 if new == str(seeds[1]) else 2
    i_other = 3 - i_new
    assert mariadb_set.value(i_new, "SELECT @@read_only") == "0"
    have = {int(x) for x in mariadb_set.sql(i_new, "SELECT id FROM app.t").split()}
    assert set(acked) <= have, f"lost acknowledged rows: {sorted(set(acked) - have)[:10]}"
    wait_for(
        lambda: _source_port(mariadb_set, i_other) == str(seeds[i_new].port),
        20,
        "the other replica to replicate from the new primary",
    )
    # Semi-sync: a commit on the new primary waits for a replica's acknowledgement, so the
    # repointed replica must be connected as a semi-sync replica first.
    wait_for(
        lambda: mariadb_set.status(i_new, "Rpl_semi_sync_master_clients") == "1",
        30,
        f"the repointed replica to connect as semi-sync (history: {_history(fm)[-6:]})",
    )
    mariadb_set.sql(i_new, "INSERT INTO app.t VALUES (1000000)")
    counted = "SELECT COUNT(*) FROM app.t WHERE id = 1000000"
    wait_for(lambda: mariadb_set.value(i_other, counted) == "1", 20, "new writes on the repointed replica")
    hooks = fm.hooks.read_text().splitlines()  # type: ignore[attr-defined]
    assert hooks == [f"pre orders {seeds[0]} {new}", f"post orders {seeds[0]} {new}"]
    history = [e["message"] for e in fm.get(f"{CLUSTERS}/orders/history").json()]
    assert any(m.startswith("DeadPrimary") for m in history), history
    assert any(m.startswith(f"promoted {new}") for m in history), history
    assert any(f"promoted {new}" in line for line in _cli(fm, "history", "orders"))
    # The detection round that decided the recovery is one trace: every step of it carries its id.
    entries = fm.get(f"{CLUSTERS}/orders/history").json()
    decided = next(e for e in entries if e["kind"] == "recovery")
    assert len(decided["trace_id"]) == 32, decided
    same = [e["message"] for e in entries if e["trace_id"] == decided["trace_id"]]
    assert any(m.startswith(f"promoted {new}") for m in same), same
    assert f"primary is now {new} (was {seeds[0]})" in same
    audited = fm.get(f"/api/v1/audit?source=ha&subject=orders&trace_id={decided['trace_id']}").json()
    assert sorted(e["message"] for e in audited) == sorted(same)

    # The old primary comes back writable: it is made read-only and a replica of the new one.
    mariadb_set.restart(0, as_replica=True)
    wait_for(lambda: mariadb_set.value(0, "SELECT @@read_only") == "1", 30, "the old primary fenced read-only")
    wait_for(
        lambda: _source_port(mariadb_set, 0) == str(seeds[i_new].port),
        30,
        "the old primary to replicate from the new one",
    )
    # It must also have caught up before the next failover: with semi-sync the only complete
    # candidate would be the must_not replica otherwise (and the recovery rightly blocked).
    wait_for(lambda: mariadb_set.value(0, counted) == "1", 30, "the fenced old primary to catch up")
    wait_for(lambda: f"{seeds[0]} replicates from {new}" in _history(fm), 30, "the fence's last step in the history")

    # The other replica must never be promoted: the next recovery has to pick the old primary.
    _cli(fm, "rule", "orders", str(seeds[i_other]), "must_not")
    # Anti-flapping: the new primary dies too, within recovery_block_seconds: no second failover.
    mariadb_set.kill(i_new)

    def blocked() -> bool:
        entries = fm.get(f"{CLUSTERS}/orders/history").json()
        return any(e["kind"] == "blocked" and "anti-flapping" in e["message"] for e in entries)

    wait_for(blocked, 30, "the second recovery to be blocked")
    assert _primary(fm) == new
    # Downtime on the dead primary blocks its recovery too, once the anti-flapping block is lifted.
    _cli(fm, "downtime", "orders", new, "3600", "--reason", "hardware check")
    _cli(fm, "acknowledge", "orders", "--reason", "checked")

    def downtime_blocked() -> bool:
        return any(f"the primary {new} is in downtime" in m for m in _history(fm))

    wait_for(downtime_blocked, 30, "the recovery to be blocked by the primary's downtime")
    # Three more polls (0.5 s apart) with no failover: a non-event, so no marker to wait on.
    time.sleep(1.5)
    assert _primary(fm) == new
    # Ending the downtime lets the recovery run: the fenced old primary, which has every
    # transaction, takes over (the other replica is must_not).
    _cli(fm, "downtime", "orders", new, "0")
    try:
        wait_for(lambda: _primary(fm) == str(seeds[0]), 30, "the second recovery after the acknowledgement")
    except AssertionError as exc:
        raise AssertionError(f"{exc}; history: {_history(fm)[-8:]}") from None
    assert mariadb_set.value(0, "SELECT @@read_only") == "0"


def _cli(fm: Fleetmate, *args: str) -> list[str]:
    """`fleetmate ha ARGS` against fm; its output lines."""
    done = subprocess.run(
        [sys.executable, "-m", "app", "ha", *args, "--addr", fm.url],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


def _history(fm: Fleetmate) -> list[str]:
    return [e["message"] for e in fm.get(f"{CLUSTERS}/orders/history").json()]


def _source_port(replicas: MariaDBReplicaSet, i: int) -> str:
    """Master_Port of instance i's SHOW SLAVE STATUS (its 4th column), '' when it replicates from no one."""
    row = replicas.sql(i, "SHOW SLAVE STATUS").split("\t")
    return row[3] if len(row) > 3 else ""


def _write(port: int, acked: list[int], stop: threading.Event, table: str = "t") -> None:
    """Insert rows one by one; record each id once its COMMIT returned (semi-sync acknowledged)."""

    async def run() -> None:
        app = MariaDBReplicaSet.app
        conn = await asyncmy.connect(
            host="127.0.0.1", port=port, user=app.user, password=app.password, db=app.database, autocommit=True
        )
        i = 0
        try:
            while not stop.is_set():
                i += 1
                async with conn.cursor() as cur:
                    await cur.execute(f"INSERT INTO {table} VALUES (%s)", (i,))
                acked.append(i)
        except Exception:
            return  # the primary died: what was acknowledged is in `acked`

    asyncio.run(run())
