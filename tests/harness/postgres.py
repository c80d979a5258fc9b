"""A real PostgreSQL 15 streaming-replication set for HA tests: one primary, n-1 standbys, free ports, temp dirs.

Each standby's application_name is its own address, `127.0.0.1:<port>` (the naming convention
app/adaptors/postgresql.py documents), so the primary's pg_stat_replication names every
standby's address and synchronous_standby_names quotes it: `FIRST 1 ("127.0.0.1:5433")`.
The servers run as the unprivileged `fleetmate-test` user (tests/harness/servers.py) with fsync on.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import psutil

from app.adaptors.conninfo import format_conninfo
from app.adaptors.types import Address, Credentials
from tests.harness.fleetmate import free_port
from tests.harness.servers import PG_BIN, PG_USER, _ensure_pg_user, _stop, _tail
from tests.harness.wait import wait_for

# Appended to the primary's postgresql.conf before the base backups copy it to the standbys.
_CONFIG = """
listen_addresses = '127.0.0.1'
wal_level = replica
max_wal_senders = 10
max_replication_slots = 10
wal_log_hints = on                # pg_rewind needs it (or data checksums)
wal_keep_size = '256MB'           # a standby that fell behind, or a rewound one, finds its WAL
hot_standby = on
shared_buffers = 16MB
max_connections = 40
wal_retrieve_retry_interval = 1s  # a standby whose source died retries (and sees a repoint) sooner
"""


class Node:
    """One postgres of the set: its port, directory and process."""

    def __init__(self, root: Path, index: int) -> None:
        self.index = index
        self.port = free_port()
        self.dir = root / f"pg{index}"
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    @property
    def name(self) -> str:
        """Its application_name as a standby: its address."""
        return str(self.address)


class PostgresReplicaSet:
    """A primary (index 0 at first) and n-1 streaming standbys made with pg_basebackup.

    synchronous: None (asynchronous), "first" (`FIRST 1 (<standby 1>)`) or "any"
    (`ANY 1 (<every standby>)`), set on the primary only, after the base backups, so a
    promoted standby does not wait for itself.
    """

    admin = Credentials("fleetmate_ha", "ha-admin-secret-7", "postgres")  # superuser, what HA logs in as
    replication = Credentials("replicator", "repl-secret-3")

    def __init__(self, n: int = 3, synchronous: Literal["first", "any"] | None = None) -> None:
        if n < 1:
            raise ValueError("a replica set needs at least one server")
        self.root = Path(tempfile.mkdtemp(prefix="fleetmate-pgha-"))
        self.nodes = [Node(self.root, i) for i in range(n)]
        self.synchronous = synchronous

    # --- what tests read --------------------------------------------------------------------

    @property
    def addresses(self) -> list[Address]:
        return [node.address for node in self.nodes]

    def data_dir(self, i: int) -> Path:
        return self.nodes[i].data

    @property
    def sync_names(self) -> str:
        """The synchronous_standby_names this set's primary gets ('' when asynchronous)."""
        standbys = self.nodes[1:]
        if not self.synchronous or not standbys:
            return ""
        if self.synchronous == "first":
            return f'FIRST 1 ("{standbys[0].name}")'
        return "ANY 1 (" + ", ".join(f'"{s.name}"' for s in standbys) + ")"

    # --- life cycle -------------------------------------------------------------------------

    def start(self) -> PostgresReplicaSet:
        _ensure_pg_user()
        account = pwd.getpwnam(PG_USER)
        os.chown(self.root, account.pw_uid, account.pw_gid)
        for node in self.nodes:
            node.dir.mkdir()
            os.chown(node.dir, account.pw_uid, account.pw_gid)
        try:
            self._init_primary(self.nodes[0])
            with ThreadPoolExecutor(len(self.nodes)) as pool:
                list(pool.map(self._base_backup, self.nodes[1:]))
                for node in self.nodes[1:]:
                    self._launch(node)
                list(pool.map(self._wait_ready, self.nodes[1:]))
            if self.sync_names:
                self.sql(0, f"ALTER SYSTEM SET synchronous_standby_names = '{self.sync_names}'")
                self.sql(0, "SELECT pg_reload_conf()")
            self.wait_streaming()
        except BaseException:
            self.stop()
            raise
        return self

    def _init_primary(self, node: Node) -> None:
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(node.data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",  # initdb's pg_hba also lets replication in over 127.0.0.1
                "--no-sync",  # the empty cluster only: the servers themselves run with fsync on
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            user=PG_USER,
            cwd=node.dir,
        )
        with open(node.data / "postgresql.conf", "a", encoding="utf-8") as conf:
            conf.write(_CONFIG)
        self._launch(node)
        self._wait_ready(node)
        self.sql(
            node.index,
            f"CREATE ROLE {self.admin.user} SUPERUSER LOGIN PASSWORD '{self.admin.password}';"
            f"CREATE ROLE {self.replication.user} REPLICATION LOGIN PASSWORD '{self.replication.password}'",
        )

    def _base_backup(self, node: Node) -> None:
        primary = self.nodes[0]
        subprocess.run(
            [
                str(PG_BIN / "pg_basebackup"),
                "-h",
                "127.0.0.1",
                "-p",
                str(primary.port),
                "-U",
                self.replication.user,
                "-D",
                str(node.data),
                "--checkpoint=fast",
                "--wal-method=stream",
                "--no-sync",  # a copy of a fresh cluster; what the tests commit later is fsynced
            ],
            check=True,
            capture_output=True,
            timeout=120,
            user=PG_USER,
            cwd=node.dir,
            env={**os.environ, "PGPASSWORD": self.replication.password},
        )
        # What `pg_basebackup -R` writes, with this standby's address as its application_name.
        self.follow(node.index, 0)

    def follow(self, i: int, source: int) -> None:
        """Configure a stopped node as a standby of node `source` (standby.signal + primary_conninfo)."""
        node, primary = self.nodes[i], self.nodes[source]
        conninfo = format_conninfo(
            {
                "host": "127.0.0.1",
                "port": str(primary.port),
                "user": self.replication.user,
                "password": self.replication.password,
                "application_name": node.name,
            }
        )
        with open(node.data / "postgresql.auto.conf", "a", encoding="utf-8") as auto:
            auto.write("primary_conninfo = '" + conninfo.replace("'", "''") + "'\n")
        (node.data / "standby.signal").touch()
        account = pwd.getpwnam(PG_USER)
        os.chown(node.data / "standby.signal", account.pw_uid, account.pw_gid)

    def _launch(self, node: Node) -> None:
        node.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(node.data),
                "-p",
                str(node.port),
                "-c",
                f"unix_socket_directories={node.dir}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(node.log, "ab"),  # noqa: SIM115
            user=PG_USER,
            cwd=node.dir,
        )

    def _wait_ready(self, node: Node) -> None:
        def up() -> bool:
            if node.proc is not None and node.proc.poll() is not None:
                raise AssertionError(f"postgres {node.name} exited: {_tail(node.log)}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", str(node.dir), "-p", str(node.port)], check=False
            )
            return ready.returncode == 0

        wait_for(up, 60, f"postgres on {node.port}", interval=0.05)

    def running(self, i: int) -> bool:
        proc = self.nodes[i].proc
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """kill -9 one instance as a machine crash would: the postmaster and every backend at once.

        A SIGKILL of the postmaster alone leaves its children running until they notice, and
        an orphaned walsender may keep streaming meanwhile; a crashed host has none of that.
        """
        node = self.nodes[i]
        if node.proc is None or node.proc.poll() is not None:
            return
        postmaster = psutil.Process(node.proc.pid)
        postmaster.suspend()  # no new backends forked while the children are listed
        children = postmaster.children(recursive=True)
        postmaster.kill()
        for child in children:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        node.proc.wait()

        def gone() -> bool:
            # Orphans are reaped by init; a zombie holds no shared memory, so it counts as gone.
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if child.status() != psutil.STATUS_ZOMBIE:
                        return False
            return True

        wait_for(gone, 10, f"the processes of {node.name} to exit")

    def stop_node(self, i: int) -> None:
        """A fast shutdown (SIGINT) of one instance."""
        _stop(self.nodes[i].proc, signal.SIGINT, grace=30)

    def start_node(self, i: int) -> None:
        """Start one instance again on its port with its data directory as it is."""
        self._launch(self.nodes[i])
        self._wait_ready(self.nodes[i])

    def restart(self, i: int) -> None:
        self.stop_node(i)
        self.start_node(i)

    def stop(self) -> None:
        for i in range(len(self.nodes)):
            self.stop_node(i)
        shutil.rmtree(self.root, ignore_errors=True)

    # --- SQL and waits ----------------------------------------------------------------------

    def sql(self, i: int, statement: str, database: str = "postgres") -> str:
        """Run statements as the superuser over node i's unix socket; the output (unaligned, tuples only)."""
        node = self.nodes[i]
        done = subprocess.run(
            [
                str(PG_BIN / "psql"),
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                str(node.dir),
                "-p",
                str(node.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                statement,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        if done.returncode != 0:
            raise AssertionError(f"psql on {node.name} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def wait_streaming(self, primary: int = 0, standbys: list[int] | None = None, timeout: float = 30) -> None:
        """Wait until the primary's pg_stat_replication shows each standby streaming (and the sync one in sync)."""
        names = {self.nodes[i].name for i in (standbys if standbys is not None else range(len(self.nodes)))}
        names.discard(self.nodes[primary].name)

        def streaming() -> bool:
            rows = self.sql(primary, "SELECT application_name, state, sync_state FROM pg_stat_replication")
            seen = {name: (state, sync) for name, state, sync in (r.split("|") for r in rows.splitlines() if r)}
            if not all(seen.get(name, ("", ""))[0] == "streaming" for name in names):
                return False
            return primary != 0 or not self.sync_names or any(s in ("sync", "quorum") for _, s in seen.values())

        wait_for(streaming, timeout, f"standbys {sorted(names)} streaming from {self.nodes[primary].name}")

    def wait_row(self, i: int, query: str, expected: str, timeout: float = 20) -> None:
        """Poll a query on node i until its output is `expected`."""

        outputs = [""]

        def matches() -> bool:
            outputs[0] = self.sql(i, query)
            return outputs[0] == expected

        try:
            wait_for(matches, timeout, f"{self.nodes[i].name}: {query!r} to give {expected!r}")
        except AssertionError as exc:
            raise AssertionError(f"{exc}; it last gave {outputs[0]!r}") from None
