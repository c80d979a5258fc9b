"""RPO: how many acknowledged writes a lost data directory costs, per snapshot store and setting.

    python bench/rpo.py [--rounds N] [--scenarios a,b,...] [--stores file,s3,mysql,postgresql] [--quick]

Writers create nodes continuously and record every acknowledged write; at a random moment the replica
is killed (kill -9) and its data directory deleted (with the embedded nats-server the log goes with it,
as when a disk or a VM is lost); it is started again on the same settings, and every acknowledged write
is looked for. "lost" counts acknowledged writes that are not back; "lost_s" is how long before the
kill the oldest of them was acknowledged (0 when none was lost).

Scenarios:
  interval    embedded nats-server, snapshot.every_seconds = I (no count): loses the writes since the last snapshot
  entries     embedded, snapshot.every_entries = E (no timer): loses at most about E entries
  clean-stop  embedded, no schedule, SIGTERM before the directory goes: the snapshot at stop covers everything
  external    an external nats-server (its own disk survives): the log is not lost, nothing is
  nats-r3     a 3-server NATS cluster (R3 log): the replica and the NATS server on its host lose their
              disks together and come back empty; the two other servers still hold the log
--stores repeats `interval` with each store (s3: SeaweedFS, mysql: MariaDB, postgresql: PostgreSQL,
started as the tests start them). --quick: 1 round, shorter intervals; writes bench/results/rpo-quick.json.
Prints a table and writes bench/results/rpo.json.
"""

from __future__ import annotations

import argparse
import contextlib
import random
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.common import progress, write_result
from tests.harness import Fleetmate, NatsServer
from tests.harness.natscluster import NatsCluster, replica_env

WRITERS = 2


class Writers:
    """WRITERS threads creating /rpo/w<n>-<i>; every acknowledged path with the time it was acknowledged."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.acked: dict[str, float] = {}
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(n,), daemon=True) for n in range(WRITERS)]

    def _run(self, n: int) -> None:
        client = httpx.Client(base_url=self.url, timeout=5)
        i = 0
        while not self.stop.is_set():
            path = f"/rpo/w{n}-{i:08d}"
            i += 1
            with contextlib.suppress(httpx.HTTPError):
                resp = client.post(f"/api/v1/registry/nodes{path}", json={"data": "x", "parents": True})
                if resp.status_code == 201:
                    self.acked[path] = time.monotonic()

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(6)


def present(url: str) -> set[str]:
    resp = httpx.get(f"{url}/api/v1/registry/children/rpo", timeout=30)
    if resp.status_code == 404:
        return set()
    return {f"/rpo/{name}" for name in resp.json()["children"]}


@dataclass
class Scenario:
    """One setting: the replica's variables, how long to write before the loss, and what to lose."""

    name: str
    env: dict[str, str]
    write_s: tuple[float, float]  # the loss comes at a uniform random moment in this range
    claim: str
    clean_stop: bool = False
    needs: Callable[[Path], contextlib.AbstractContextManager[dict[str, Any]]] | None = None
    servers_per_scenario: bool = False  # a database or object store is started once; each round its own prefix


@dataclass
class Round:
    acked: int
    lost: int
    lost_s: float
    extra: int  # applied although their writer never heard back (in flight at the kill)
    write_s: float
    restart_s: float
    restored: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def _no_servers(_: Path) -> Iterator[dict[str, Any]]:
    yield {}


@contextlib.contextmanager
def _external(workdir: Path) -> Iterator[dict[str, Any]]:
    nats = NatsServer(workdir / "nats").start()
    try:
        yield {"env": {"FLEETMATE_NATS_URL": nats.url}}
    finally:
        nats.stop()


@contextlib.contextmanager
def _cluster(workdir: Path) -> Iterator[dict[str, Any]]:
    cluster = NatsCluster(workdir / "cluster")
    try:
        cluster.start()
        yield {"env": replica_env(FLEETMATE_NATS_URL=cluster.urls), "cluster": cluster}
    finally:
        cluster.close()


def _store_server(store: str) -> Callable[[Path], contextlib.AbstractContextManager[dict[str, Any]]]:
    @contextlib.contextmanager
    def run(_: Path) -> Iterator[dict[str, Any]]:
        from tests.harness.servers import MariaDB, Postgres, SeaweedS3

        tag = f"rpo{random.randrange(10**8)}"
        if store == "s3":
            s3 = SeaweedS3().start()
            try:
                yield {
                    "env": {
                        "FLEETMATE_S3_ENDPOINT": s3.endpoint,
                        "FLEETMATE_S3_ACCESS_KEY": s3.access_key,
                        "FLEETMATE_S3_SECRET_KEY": s3.secret_key,
                        "FLEETMATE_S3_BUCKET": s3.bucket,
                        "FLEETMATE_S3_PREFIX": f"{tag}/",
                    }
                }
            finally:
                s3.stop()
            return
        server = MariaDB() if store == "mysql" else Postgres()
        server.start()
        try:
            yield {"env": {"FLEETMATE_SQL_DSN": server.dsn, "FLEETMATE_SQL_TABLE_PREFIX": f"{tag}_"}}
        finally:
            server.stop()

    return run


def scenarios(quick: bool, stores: list[str]) -> list[Scenario]:
    every_s = 2.0 if quick else 5.0
    every_n = 500 if quick else 2000
    timer = {"FLEETMATE_SNAPSHOT_EVERY_SECONDS": str(every_s), "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "0"}
    spread = (every_s + 1.0, 3 * every_s)
    out = [
        Scenario("interval", timer, spread, f"writes of the last {every_s:g} s (snapshot.every_seconds)"),
        Scenario(
            "entries",
            {"FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0", "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": str(every_n)},
            (3.0, 8.0) if quick else (5.0, 15.0),
            f"about {every_n} log entries (snapshot.every_entries), plus up to 1 s",
        ),
        Scenario(
            "clean-stop",
            {"FLEETMATE_SNAPSHOT_EVERY_SECONDS": "0", "FLEETMATE_SNAPSHOT_EVERY_ENTRIES": "0"},
            (2.0, 4.0) if quick else (3.0, 8.0),
            "nothing (the snapshot at stop)",
            clean_stop=True,
        ),
        Scenario("external", timer, spread, "nothing (the log is on the NATS server's disk)", needs=_external),
        Scenario("nats-r3", timer, spread, "nothing (two of three NATS servers hold the log)", needs=_cluster),
    ]
    for store in stores:
        if store != "file":
            out.append(
                Scenario(
                    f"interval-{store}",
                    {**timer, "FLEETMATE_SNAPSHOT_STORE": store},
                    spread,
                    f"writes of the last {every_s:g} s",
                    needs=_store_server(store),
                    servers_per_scenario=True,
                )
            )
    return out


def _started(fm: Fleetmate, attempts: int = 3, timeout: float = 120) -> Fleetmate:
    """Start (again) and wait until ready; a start that fails is tried again: on a busy machine another
    process can take the free port the replica picked before it binds it, and a replica that starts
    while the NATS server on its host is still rejoining its cluster can time out (the system service's
    first read of the replicas bucket)."""
    for attempt in range(attempts):
        fm.restart(wait_ready=False)
        deadline = time.monotonic() + timeout
        while fm.alive and time.monotonic() < deadline:
            if url := fm._ready_url():
                fm.url = url
                return fm
            time.sleep(0.05)
        errors = [line.get("error") or line.get("exc", "")[-300:] for line in fm.logged("start-up failed")]
        if attempt == attempts - 1:
            raise RuntimeError(f"fleetmate did not start: {errors or fm.raw[-3:]}")
        progress(f"start failed; trying again: {errors or fm.raw[-3:]}")
    return fm


def one_round(sc: Scenario, workdir: Path, servers: dict[str, Any]) -> Round:
    env = {
        "FLEETMATE_NODE_ID": "r1",
        "FLEETMATE_SNAPSHOT_DIR": str(workdir / "snapshots"),  # the file store is not on the lost disk
        "FLEETMATE_LEASE_TTL": "2",
        "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
        "FLEETMATE_LOG_LEVEL": "warning",
        **sc.env,
        **servers.get("env", {}),
    }
    cluster: NatsCluster | None = servers.get("cluster")
    fm = _started(Fleetmate(workdir / "r1", env=env))
    try:
        writes_for = random.uniform(*sc.write_s)
        with Writers(fm.url) as writers:
            time.sleep(writes_for)
            if sc.clean_stop:
                writers.stop.set()
                for t in writers.threads:
                    t.join(6)
                fm.stop(signal.SIGTERM, timeout=30)
            else:
                fm.kill()
            lost_at = time.monotonic()
            if cluster is not None:  # the NATS server on the same host goes with it
                cluster.kill(0)
                shutil.rmtree(cluster.members[0].dir / "jetstream", ignore_errors=True)
        shutil.rmtree(workdir / "r1" / "data")
        if cluster is not None:
            cluster.restart(0, wait_healthy=False)
        started = time.monotonic()
        fm.env["FLEETMATE_LOG_LEVEL"] = "info"
        _started(fm)
        restart_s = time.monotonic() - started
        back = present(fm.url)
        acked = dict(writers.acked)
        missing = [at for path, at in acked.items() if path not in back]
        restored = next(
            (line for line in fm.lines if str(line.get("msg", "")).startswith(("restored from", "the log had lost"))),
            {},
        )
        return Round(
            acked=len(acked),
            lost=len(missing),
            lost_s=round(lost_at - min(missing), 3) if missing else 0.0,
            extra=len(back - set(acked)),
            write_s=round(writes_for, 2),
            restart_s=round(restart_s, 2),
            restored={k: restored.get(k) for k in ("msg", "store", "seq", "revision") if k in restored},
        )
    finally:
        fm.kill()


def _own_prefix(servers: dict[str, Any], n: int) -> dict[str, Any]:
    """The store's variables with a prefix of this round's own (a new replica would restore another round's)."""
    env = dict(servers.get("env", {}))
    for key in ("FLEETMATE_S3_PREFIX", "FLEETMATE_SQL_TABLE_PREFIX"):
        if key in env:
            env[key] = f"{env[key].rstrip('/_')}r{n}{'/' if key.endswith('S3_PREFIX') else '_'}"
    return {**servers, "env": env}


def run(sc: Scenario, rounds: int) -> dict[str, Any]:
    results: list[Round] = []
    with contextlib.ExitStack() as stack:
        shared = None
        if sc.servers_per_scenario and sc.needs is not None:
            shared = stack.enter_context(sc.needs(Path(stack.enter_context(tempfile.TemporaryDirectory()))))
        for n in range(rounds):
            with tempfile.TemporaryDirectory(prefix="fm-rpo-") as tmp:
                workdir = Path(tmp)
                if shared is not None:
                    r = one_round(sc, workdir, _own_prefix(shared, n))
                else:
                    with (sc.needs or _no_servers)(workdir) as servers:
                        r = one_round(sc, workdir, servers)
            results.append(r)
            progress(
                f"{sc.name} round {n + 1}/{rounds}: {r.acked} acked in {r.write_s} s, lost {r.lost} "
                f"({r.lost_s} s of writes), restart {r.restart_s} s"
            )
    return {
        "scenario": sc.name,
        "env": sc.env,
        "claim": sc.claim,
        "rounds": [r.__dict__ for r in results],
        "lost_max": max(r.lost for r in results),
        "lost_s_max": max(r.lost_s for r in results),
        "writes_per_s": round(sum(r.acked for r in results) / sum(r.write_s for r in results), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=0, help="rounds per scenario (default 5, --quick 1)")
    parser.add_argument("--scenarios", default="", help="comma-separated scenario names (default: all)")
    parser.add_argument("--stores", default="file", help="stores for the interval scenario: file,s3,mysql,postgresql")
    parser.add_argument("--quick", action="store_true", help="1 round, short intervals (a smoke run)")
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 5)
    chosen = scenarios(args.quick, [s.strip() for s in args.stores.split(",") if s.strip()])
    if args.scenarios:
        wanted = {s.strip() for s in args.scenarios.split(",")}
        chosen = [sc for sc in chosen if sc.name in wanted]
    out = [run(sc, rounds) for sc in chosen]
    print(f"{'scenario':<22} {'writes/s':>9} {'lost (max)':>11} {'lost s (max)':>13}  expected loss")
    for row in out:
        print(
            f"{row['scenario']:<22} {row['writes_per_s']:>9} {row['lost_max']:>11} {row['lost_s_max']:>13}  "
            f"{row['claim']}"
        )
    path = write_result("rpo-quick" if args.quick else "rpo", {"rounds": rounds, "writers": WRITERS, "results": out})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
