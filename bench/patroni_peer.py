"""Debian's Patroni with a single-member Debian etcd as its DCS: PostgreSQL 15 members on free ports in a temp dir."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.adaptors.types import Address, Credentials
from bench.common import progress
from tests.harness import free_port, wait_for
from tests.harness.servers import PG_BIN, PG_USER, _ensure_pg_user, _tail

PACKAGES = ("patroni", "etcd-server", "python3-etcd")  # python3-etcd: Patroni's etcd3 DCS imports `etcd`
SYSTEM_PYTHON = "/usr/bin/python3"  # Patroni runs on the system Python, not the benchmark's venv

# The PostgreSQL settings tests/harness/postgres.py gives the servers fleetmate watches, so both run
# the same servers; listen_addresses and the ports are Patroni's to set.
PG_PARAMETERS: dict[str, Any] = {
    "wal_level": "replica",
    "max_wal_senders": 10,
    "max_replication_slots": 10,
    "wal_log_hints": "on",
    "wal_keep_size": "256MB",
    "hot_standby": "on",
    "shared_buffers": "16MB",
    "max_connections": 40,
    "wal_retrieve_retry_interval": "1s",
}


def patroni_version() -> str:
    done = subprocess.run(["patroni", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip().removeprefix("patroni ").strip()


def missing() -> list[str]:
    """What of Patroni, etcd and python3-etcd is not installed (empty when all are)."""
    out = [name for name, binary in (("patroni", "patroni"), ("etcd-server", "etcd")) if not shutil.which(binary)]
    found = subprocess.run([SYSTEM_PYTHON, "-c", "import etcd"], capture_output=True, check=False)
    if found.returncode != 0:
        out.append("python3-etcd")
    return out


def ensure_installed(install: bool) -> str | None:
    """None when Patroni, etcd and python3-etcd are there (installing them with apt-get if asked), else why not."""
    lacking = missing()
    if not lacking:
        return None
    if not install:
        return f"{', '.join(lacking)} not installed: run with --install (apt-get install {' '.join(PACKAGES)})"
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{', '.join(lacking)} not installed and apt-get cannot run here (not root, or no apt-get)"
    progress(f"installing {' '.join(PACKAGES)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "install", "-y", "-qq", *PACKAGES]
    done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:  # a stale package list: refresh it once
        subprocess.run(["apt-get", "update", "-qq"], env=env, capture_output=True, check=False)
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    lacking = missing()
    if lacking:
        return (
            f"apt-get install {' '.join(PACKAGES)} failed ({', '.join(lacking)} missing): {done.stderr.strip()[-300:]}"
        )
    return None


def range_body(key: str) -> dict[str, str]:
    """The body of an etcd v3 JSON-gateway range request (POST /v3/kv/range) for one key."""
    return {"key": base64.b64encode(key.encode()).decode()}


def range_value(reply: dict[str, Any]) -> str:
    """The value in an etcd v3 range reply ('' when the key is absent)."""
    kvs = reply.get("kvs", [])
    return base64.b64decode(kvs[0].get("value", "")).decode() if kvs else ""


class Etcd:
    """A single-member etcd (Debian's /usr/bin/etcd) on free client and peer ports."""

    def __init__(self, root: Path) -> None:
        self.dir = root / "etcd"
        self.port = free_port()
        self.peer_port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = root / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Etcd:
        binary = shutil.which("etcd")
        if binary is None:
            raise RuntimeError("etcd not found (Debian package etcd-server)")
        client, peer = self.url, f"http://127.0.0.1:{self.peer_port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("ETCD")}
        self.proc = subprocess.Popen(
            [
                binary, "--name", "bench", "--data-dir", str(self.dir),
                "--listen-client-urls", client, "--advertise-client-urls", client,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", f"bench={peer}",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(self.log, "wb"),  # noqa: SIM115
            env=env,
        )  # fmt: skip

        def healthy() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"etcd exited: {_tail(self.log)}")
            health = httpx.get(f"{self.url}/health", timeout=1, trust_env=False).json()
            return bool(health.get("health") == "true")

        wait_for(healthy, 30, f"etcd on {self.port}", interval=0.1)
        return self

    def get(self, key: str, client: httpx.Client | None = None) -> str:
        """A key's value ('' when absent) through etcd's v3 JSON gateway."""
        if client is not None:
            reply = client.post(f"{self.url}/v3/kv/range", json=range_body(key))
        else:
            reply = httpx.post(f"{self.url}/v3/kv/range", json=range_body(key), timeout=2, trust_env=False)
        reply.raise_for_status()
        return range_value(reply.json())

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Member:
    """One Patroni member: its name, PostgreSQL and REST ports, directory and patroni process."""

    def __init__(self, root: Path, index: int) -> None:
        self.index = index
        self.name = f"pg{index}"
        self.port = free_port()
        self.api_port = free_port()
        self.dir = root / self.name
        self.data = self.dir / "data"
        self.config = self.dir / "patroni.yml"
        self.log = self.dir / "patroni.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def address(self) -> Address:
        return Address("127.0.0.1", self.port)

    def postmaster(self) -> psutil.Process | None:
        """The running postmaster of this member's data directory (from postmaster.pid), if any."""
        try:
            pid = int((self.data / "postmaster.pid").read_text().split()[0])
            proc = psutil.Process(pid)
            if str(self.data) in " ".join(proc.cmdline()) and proc.status() != psutil.STATUS_ZOMBIE:
                return proc
        except (OSError, ValueError, IndexError, psutil.Error):
            pass
        return None


class PatroniPeer:
    """etcd + n Patroni members bootstrapping their own PostgreSQL 15 cluster (initdb, base backups).

    The settings: ttl, loop_wait, retry_timeout, synchronous_mode (and synchronous_mode_strict
    only when `strict`); use_pg_rewind so that a killed former primary rejoins when its patroni
    is started again. The servers run as the unprivileged PG_USER (postgres refuses root), each
    with a unix socket in its own directory where the local superuser is trusted.
    """

    scope = "bench"
    superuser = Credentials("postgres", "patroni-super-5", "postgres")
    replication = Credentials("replicator", "patroni-repl-8")

    def __init__(
        self,
        n: int = 3,
        *,
        ttl: int = 10,
        loop_wait: int = 2,
        retry_timeout: int = 5,
        synchronous: bool = True,
        strict: bool = False,
        bin_dir: Path = PG_BIN,
    ) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="fleetmate-bench-patroni-"))
        self.members = [Member(self.root, i) for i in range(n)]
        self.etcd = Etcd(self.root)
        self.bin_dir = bin_dir
        self.synchronous = synchronous
        self.dcs: dict[str, Any] = {
            "ttl": ttl,
            "loop_wait": loop_wait,
            "retry_timeout": retry_timeout,
            "synchronous_mode": synchronous,
            **({"synchronous_mode_strict": True} if strict else {}),
        }
        self.leader_key = f"/service/{self.scope}/leader"

    @property
    def settings(self) -> dict[str, Any]:
        """What was given to Patroni, for the results."""
        return {**self.dcs, "use_pg_rewind": True, "dcs": "etcd3 (one member)", "parameters": PG_PARAMETERS}

    # --- life cycle -------------------------------------------------------------------------

    def start(self, timeout: float = 240) -> PatroniPeer:
        _ensure_pg_user()
        account = pwd.getpwnam(PG_USER)
        try:
            self.etcd.start()
            os.chown(self.root, account.pw_uid, account.pw_gid)
            for m in self.members:
                m.dir.mkdir()
                os.chown(m.dir, account.pw_uid, account.pw_gid)
                m.config.write_text(json.dumps(self._config(m), indent=2))  # JSON is YAML
            for m in self.members:
                self._launch(m)
            self.wait_healthy(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _config(self, m: Member) -> dict[str, Any]:
        api = f"127.0.0.1:{m.api_port}"
        pg = f"127.0.0.1:{m.port}"
        auth = {
            "superuser": {"username": self.superuser.user, "password": self.superuser.password},
            "replication": {"username": self.replication.user, "password": self.replication.password},
        }
        return {
            "scope": self.scope,
            "namespace": "/service/",
            "name": m.name,
            "restapi": {"listen": api, "connect_address": api},
            "etcd3": {"hosts": [f"127.0.0.1:{self.etcd.port}"]},
            "bootstrap": {
                "dcs": {**self.dcs, "postgresql": {"use_pg_rewind": True, "parameters": PG_PARAMETERS}},
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
            },
            "postgresql": {
                "listen": pg,
                "connect_address": pg,
                "data_dir": str(m.data),
                "bin_dir": str(self.bin_dir),
                "pgpass": str(m.dir / "pgpass"),
                "authentication": auth,
                "parameters": {"unix_socket_directories": str(m.dir)},
                "pg_hba": [
                    "local all all trust",
                    f"host replication {self.replication.user} 127.0.0.1/32 scram-sha-256",
                    "host all all 127.0.0.1/32 scram-sha-256",
                ],
            },
        }

    def _launch(self, m: Member) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("PATRONI", "PG", "PYTHON"))}
        env["HOME"] = str(m.dir)
        m.proc = subprocess.Popen(
            [SYSTEM_PYTHON, shutil.which("patroni") or "/usr/bin/patroni", str(m.config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=open(m.log, "ab"),  # noqa: SIM115
            user=PG_USER,
            cwd=m.dir,
            env=env,
        )

    def running(self, i: int) -> bool:
        proc = self.members[i].proc
        return proc is not None and proc.poll() is None

    def kill(self, i: int) -> None:
        """kill -9 the whole node: its patroni and its postgres (postmaster and every backend) at once."""
        m = self.members[i]
        roots: list[psutil.Process] = []
        if m.proc is not None and m.proc.poll() is None:
            roots.append(psutil.Process(m.proc.pid))
        postmaster = m.postmaster()
        if postmaster is not None:
            roots.append(postmaster)
        for proc in roots:  # nothing forks or reacts while the victims are listed
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.suspend()
        victims = list(roots)
        for proc in roots:
            with contextlib.suppress(psutil.NoSuchProcess):
                victims.extend(proc.children(recursive=True))
        for proc in victims:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        if m.proc is not None:
            m.proc.wait()

        def gone() -> bool:
            for proc in victims:
                with contextlib.suppress(psutil.NoSuchProcess):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        return False
            return True

        wait_for(gone, 10, f"the processes of {m.name} to exit")

    def restart(self, i: int) -> None:
        """Start a killed (or stopped) member's patroni again on its configuration; it rejoins by itself."""
        if self.running(i):
            raise RuntimeError(f"{self.members[i].name} still runs")
        self._launch(self.members[i])

    def stop(self) -> None:
        """Stop every patroni (which stops its postgres), kill what is left, stop etcd, remove the directory."""
        for m in self.members:
            if m.proc is not None and m.proc.poll() is None:
                m.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 40
        for m in self.members:
            if m.proc is not None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    m.proc.wait(max(0.1, deadline - time.monotonic()))
        try:
            for i, m in enumerate(self.members):
                if (m.proc is not None and m.proc.poll() is None) or m.postmaster() is not None:
                    with contextlib.suppress(AssertionError):  # SIGKILLed all the same; go on with the rest
                        self.kill(i)
        finally:
            self.etcd.stop()
            if os.environ.get("FLEETMATE_BENCH_KEEP"):
                print(f"kept {self.root} (FLEETMATE_BENCH_KEEP)", file=sys.stderr)
            else:
                shutil.rmtree(self.root, ignore_errors=True)

    # --- state --------------------------------------------------------------------------------

    def leader_name(self, client: httpx.Client | None = None) -> str:
        """The value of the leader key in etcd: the leader member's name ('' when there is none)."""
        return self.etcd.get(self.leader_key, client)

    def leader(self) -> int | None:
        """The index of the member the leader key names, if there is one."""
        name = self.leader_name()
        return next((m.index for m in self.members if m.name == name), None)

    def sql(self, i: int, statement: str, database: str = "postgres") -> str:
        """Run statements as the superuser over member i's unix socket; the output (unaligned, tuples only)."""
        m = self.members[i]
        done = subprocess.run(
            [
                str(self.bin_dir / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                "-h", str(m.dir), "-p", str(m.port), "-U", self.superuser.user, "-d", database, "-c", statement,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise AssertionError(f"psql on {m.name} failed: {done.stderr.strip()}")
        return done.stdout.strip()

    def healthy(self) -> int | None:
        """The leader's index once it is a primary and every other member streams from it (one of them
        synchronously, in synchronous mode); None before."""
        leader = self.leader()
        if leader is None or not self.running(leader) or self.sql(leader, "SELECT pg_is_in_recovery()") != "f":
            return None
        rows = self.sql(leader, "SELECT application_name, state, sync_state FROM pg_stat_replication")
        seen = {name: (state, sync) for name, state, sync in (r.split("|") for r in rows.splitlines() if r)}
        others = [m.name for m in self.members if m.index != leader]
        if not all(seen.get(name, ("", ""))[0] == "streaming" for name in others):
            return None
        if self.synchronous and not any(sync in ("sync", "quorum") for _, sync in seen.values()):
            return None
        return leader

    def wait_healthy(self, timeout: float = 180) -> int:
        """Wait for healthy(); the leader's index. Fails early when a patroni exits."""

        def check() -> int | None:
            for m in self.members:
                if m.proc is not None and m.proc.poll() is not None:
                    raise RuntimeError(f"patroni {m.name} exited ({m.proc.returncode}): {_tail(m.log)}")
            return self.healthy()

        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                found = check()
                if found is not None:
                    return found
            except RuntimeError:
                raise
            except Exception as exc:
                last = exc
            time.sleep(0.2)
        tails = "\n".join(f"--- {m.name}\n{_tail(m.log, 8)}" for m in self.members)
        raise AssertionError(f"Patroni not healthy within {timeout:g} s (last: {last!r})\n{tails}")
