"""Test harness: a real MariaDB GTID replication set (one primary, n-1 replicas), each on a free port in a temp dir.

Every instance gets its own datadir, port, socket and server_id, a binary log with
log_slave_updates, gtid_strict_mode, ROW format, and report_host/report_port so that the
primary's SHOW SLAVE HOSTS lists its replicas. With semi_sync on, every instance runs with the
slave side of MariaDB's built-in semi-sync enabled (AFTER_SYNC, and a master timeout long enough
that a primary never falls back to asynchronous replication silently during a test); the master
side is switched on at run time on the primary only, once its replicas are connected. With the
default rpl_semi_sync_master_wait_no_slave=ON a primary with no semi-sync replica connected waits
for the whole timeout on each commit, so it must not be on before the replicas are (nor on a
server that will only replicate).

Each instance listens on 127.0.0.1 unless the set is given one address per instance (`hosts`):
it then binds to, reports (report_host) and is replicated from (MASTER_HOST) that address only,
so every address an HA probe learns from SHOW SLAVE STATUS / SHOW SLAVE HOSTS is that one.

Users: root over each unix socket (the harness itself), `fleetmate` (the admin user the HA
adaptor logs in as), `repl` (replication only) and `app` (plain DML on the `app` database,
without READ ONLY ADMIN, so read_only refuses its writes).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import shutil
import signal
import socket
import subprocess
import tempfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from app.adaptors.types import Address, Credentials
from tests.harness.fleetmate import free_port
from tests.harness.servers import _binary, _listening, _tail
from tests.harness.wait import wait_for

T = TypeVar("T")


def _parallel(calls: Iterable[Callable[[], T]]) -> list[T]:
    """Run blocking calls (each mostly waiting on a process) in threads; their results in order."""
    calls = list(calls)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, len(calls))) as pool:
        return list(pool.map(lambda call: call(), calls))


class Instance:
    """One mariadbd of the set: its directory, port, socket and process."""

    def __init__(self, root: Path, index: int, host: str = "127.0.0.1") -> None:
        self.index = index
        self.host = host  # the one address it binds to, reports and is replicated from
        self.server_id = index + 1
        self.port = free_port()
        self.dir = root / f"node{index}"
        self.data = self.dir / "data"
        self.socket = self.dir / "mysqld.sock"
        self.log = self.dir / "error.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return Address(self.host, self.port)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class MariaDBReplicaSet:
    """n MariaDB instances: instance 0 the primary, the others GTID replicas of it (MASTER_USE_GTID=slave_pos)."""

    admin = Credentials("fleetmate", "fm-admin-Secret-71")
    replication = Credentials("repl", "fm-repl-Secret-39")
    app = Credentials("app", "fm-app-Secret-52", "app")

    def __init__(
        self,
        n: int = 3,
        semi_sync: bool = True,
        semi_sync_timeout_ms: int = 600_000,
        hosts: Sequence[str] | None = None,
    ) -> None:
        if n < 1:
            raise ValueError("a replica set needs at least one instance")
        if hosts is not None and len(hosts) != n:
            raise ValueError(f"hosts names {len(hosts)} addresses for {n} instances")
        self.semi_sync = semi_sync
        self.semi_sync_timeout_ms = semi_sync_timeout_ms
        self.dir = Path(tempfile.mkdtemp(prefix="fleetmate-ha-mariadb-"))
        addresses = list(hosts) if hosts is not None else ["127.0.0.1"] * n
        self.instances = [Instance(self.dir, i, host) for i, host in enumerate(addresses)]

    @property
    def addresses(self) -> list[Address]:
        return [i.address for i in self.instances]

    def __len__(self) -> int:
        return len(self.instances)

    # --- life cycle -----------------------------------------------------------------------

    def start(self) -> MariaDBReplicaSet:
        """Install once, copy the datadir to every instance, start all at once, then wire replication."""
        template = self.dir / "template"
        subprocess.run(
            [
                _binary("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={template}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        for node in self.instances:
            node.dir.mkdir(parents=True)
            shutil.copytree(template, node.data)
        shutil.rmtree(template, ignore_errors=True)
        for node in self.instances:
            self._spawn(node)
        _parallel(functools.partial(self._wait_up, node) for node in self.instances)

        # Users are created on the primary only: the replicas get them through replication
        # (creating them locally would leave errant GTIDs on the replicas).
        admin, repl, app = self.admin, self.replication, self.app
        self.sql(
            0,
            f"CREATE USER '{admin.user}'@'%' IDENTIFIED BY '{admin.password}';"
            f"GRANT ALL PRIVILEGES ON *.* TO '{admin.user}'@'%' WITH GRANT OPTION;"
            f"CREATE USER '{repl.user}'@'%' IDENTIFIED BY '{repl.password}';"
            f"GRANT REPLICATION SLAVE ON *.* TO '{repl.user}'@'%';"
            f"CREATE DATABASE {app.database};"
            f"CREATE USER '{app.user}'@'%' IDENTIFIED BY '{app.password}';"
            f"GRANT SELECT, INSERT, UPDATE, DELETE, CREATE, DROP ON {app.database}.* TO '{app.user}'@'%';",
        )
        primary = self.instances[0]
        for node in self.instances[1:]:
            self.sql(
                node.index,
                "SET GLOBAL read_only = ON;"
                f"CHANGE MASTER TO MASTER_HOST='{primary.host}', MASTER_PORT={primary.port}, "
                f"MASTER_USER='{repl.user}', MASTER_PASSWORD='{repl.password}', "
                "MASTER_USE_GTID=slave_pos, MASTER_CONNECT_RETRY=1;"
                "START SLAVE;",
            )
        self.wait_replicated()
        if self.semi_sync and len(self) > 1:
            self.sql(0, "SET GLOBAL rpl_semi_sync_master_enabled = ON")
            # A replica registers as semi-sync when its IO thread connects: reconnect them.
            for node in self.instances[1:]:
                self.sql(node.index, "STOP SLAVE IO_THREAD; START SLAVE IO_THREAD")
            wait_for(
                lambda: self.status(0, "Rpl_semi_sync_master_clients") == str(len(self) - 1),
                30,
                "every replica to connect as a semi-sync replica",
            )
        return self

    def _spawn(self, node: Instance, options: Iterable[str] = ()) -> None:
        semi_sync = (
            [
                "--rpl-semi-sync-slave-enabled=ON",
                f"--rpl-semi-sync-master-timeout={self.semi_sync_timeout_ms}",
                "--rpl-semi-sync-master-wait-point=AFTER_SYNC",
            ]
            if self.semi_sync
            else []
        )
        node.proc = subprocess.Popen(
            [
                _binary("mariadbd"),
                "--no-defaults",
                f"--datadir={node.data}",
                f"--socket={node.socket}",
                f"--port={node.port}",
                f"--bind-address={node.host}",
                "--user=root",
                f"--pid-file={node.dir / 'mariadbd.pid'}",
                f"--log-error={node.log}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=32M",
                # Test servers: kill -9 keeps what reached the OS, which is all these tests need.
                "--innodb-flush-log-at-trx-commit=2",
                f"--server-id={node.server_id}",
                f"--log-bin={node.dir / 'binlog'}",
                f"--relay-log={node.dir / 'relay'}",
                "--log-slave-updates=ON",
                "--gtid-strict-mode=ON",
                "--binlog-format=ROW",
                f"--report-host={node.host}",
                f"--report-port={node.port}",
                *semi_sync,
                *options,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def _wait_up(self, node: Instance, timeout: float = 60) -> None:
        def up() -> bool:
            if node.proc is not None and node.proc.poll() is not None:
                raise AssertionError(f"mariadbd {node.index} exited: {_tail(node.log)}")
            if not node.socket.exists():
                return False
            if node.host == "127.0.0.1":
                return _listening(node.port)
            with socket.create_connection((node.host, node.port), timeout=0.2):
                return True

        try:
            wait_for(up, timeout, f"mariadbd {node.index} on {node.port}", interval=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{_tail(node.log)}") from None

    def stop(self) -> None:
        """Kill every instance and remove the directory (nothing here is kept, so no clean shutdown)."""
        for node in self.instances:
            if node.running and node.proc is not None:
                node.proc.kill()
        for node in self.instances:
            if node.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    node.proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)

    def kill(self, i: int) -> None:
        """SIGKILL instance i, as a crash would, and reap it."""
        node = self.instances[i]
        if node.proc is not None and node.running:
            node.proc.send_signal(signal.SIGKILL)
            node.proc.wait(10)

    def restart(self, i: int, as_replica: bool = False) -> None:
        """Stop instance i (if running, clean shutdown) and start it again with the same options.

        as_replica: start with --init-rpl-role=SLAVE, so that with semi-sync on, crash recovery
        rolls back and cuts from the binlog the transactions no replica acknowledged (MariaDB's
        way of bringing a crashed semi-sync primary back as a replica without errant GTIDs).
        """
        node = self.instances[i]
        if node.proc is not None and node.running:
            node.proc.terminate()
            try:
                node.proc.wait(30)
            except subprocess.TimeoutExpired:
                node.proc.kill()
                node.proc.wait(10)
        node.socket.unlink(missing_ok=True)
        self._spawn(node, ["--init-rpl-role=SLAVE"] if as_replica else [])
        self._wait_up(node)

    # --- statements ----------------------------------------------------------------------

    def sql(self, i: int, statement: str) -> str:
        """Run statements as root over instance i's unix socket; their output (tab-separated, no headers)."""
        node = self.instances[i]
        done = subprocess.run(
            [_binary("mariadb"), "--no-defaults", f"--socket={node.socket}", "-uroot", "-N", "-B", "-e", statement],
            check=False,
            capture_output=True,
            text=True,
            timeout=30,
        )
        if done.returncode != 0:
            raise AssertionError(f"instance {i} ({node.address}): {done.stderr.strip()}")
        return done.stdout

    def value(self, i: int, query: str) -> str:
        """The first column of the first row of a query on instance i ('' when no row)."""
        lines = self.sql(i, query).splitlines()
        return lines[0].split("\t")[0] if lines else ""

    def status(self, i: int, name: str) -> str:
        """A global status counter of instance i ('' when the server has none by that name)."""
        line = self.sql(i, f"SHOW GLOBAL STATUS LIKE '{name}'").split("\t")
        return line[1].strip() if len(line) > 1 else ""

    def gtid_current_pos(self, i: int) -> frozenset[str]:
        """Instance i's @@gtid_current_pos as a set of domain-server-seq GTIDs (order-free)."""
        text = self.value(i, "SELECT @@GLOBAL.gtid_current_pos")
        return frozenset(g.strip() for g in text.split(",") if g.strip())

    def wait_replicated(self, among: Iterable[int] | None = None, timeout: float = 30) -> frozenset[str]:
        """Wait until the given instances (default: every running one) have the same gtid_current_pos."""
        indexes = [i for i in (among if among is not None else range(len(self))) if self.instances[i].running]

        def same() -> tuple[frozenset[str]] | None:
            positions = {self.gtid_current_pos(i) for i in indexes}
            return (positions.pop(),) if len(positions) == 1 else None

        found: tuple[frozenset[str]] = wait_for(same, timeout, f"instances {indexes} to reach one GTID position")
        return found[0]
