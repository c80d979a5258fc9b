"""Real nats-server and fleetmate processes on free ports in temporary directories."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx
import psutil

from app.bus.embedded import find_binary
from tests.harness.wait import wait_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """A nats-server with JetStream on a free port, in its own directory."""

    def __init__(self, workdir: Path, token: str | None = None) -> None:
        self.port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.dir = workdir
        self.token = token  # when set, clients must present it
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> NatsServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        auth = ["--auth", self.token] if self.token else []
        self.proc = subprocess.Popen(
            [find_binary(), "-js", "-sd", str(self.dir), "-a", "127.0.0.1", "-p", str(self.port), *auth],
            stdout=subprocess.DEVNULL,
            stderr=open(self.dir / "nats.log", "wb"),  # noqa: SIM115
        )

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True

        wait_for(listening, 10, f"nats-server on {self.port}")
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Fleetmate:
    """`fleetmate serve` as a subprocess; its stderr (JSON log lines) is collected in `lines`.

    prefix: a command that runs the process, e.g. `ip netns exec NAME` (it must exec, not fork,
    so that `proc` is fleetmate itself).
    """

    def __init__(
        self,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        args: list[str] | None = None,
        prefix: Sequence[str] = (),
    ) -> None:
        self.dir = workdir
        self.prefix = list(prefix)
        self.env = {
            "FLEETMATE_DATA_DIR": str(workdir / "data"),
            "FLEETMATE_HTTP_PORT": "0",
            "FLEETMATE_NATS_PORT": "0",
            "FLEETMATE_LOG_FORMAT": "json",
            "FLEETMATE_NODE_ID": "t1",
            "FLEETMATE_WORKERS": "1",  # one process per replica unless a test asks for workers
            "FLEETMATE_ZK_PORT": "0",  # never ZooKeeper's standard port
            **(env or {}),
        }
        self.args = args or []
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[dict[str, Any]] = []
        self.raw: list[str] = []
        self.url = ""
        self.zk = ""  # host:port of its ZooKeeper listener, from the ready line
        self._reader: threading.Thread | None = None

    def start(self, wait_ready: bool = True, timeout: float = 20) -> Fleetmate:
        env = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
        env.update(self.env)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [*self.prefix, sys.executable, "-m", "app", "serve", *self.args],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        if wait_ready:
            self.url = wait_for(self._ready_url, timeout, "fleetmate ready line")
        return self

    def _read(self) -> None:
        assert self.proc
        assert self.proc.stderr
        for raw in self.proc.stderr:
            text = raw.decode("utf-8", "replace").rstrip()
            self.raw.append(text)
            with contextlib.suppress(ValueError):
                self.lines.append(json.loads(text))

    def _ready_url(self) -> str | None:
        if self.proc and self.proc.poll() is not None:
            raise AssertionError(f"fleetmate exited with {self.proc.returncode}: {self.raw[-10:]}")
        for line in self.lines:
            if line.get("msg") == "fleetmate ready":
                url: str = line["http"]
                self.zk = line.get("zk", "")
                return url
        return None

    def logged(self, msg: str, **match: Any) -> list[dict[str, Any]]:
        """Log records whose message is msg (and whose fields have the values in match, e.g. service="registry")."""
        return [
            line for line in self.lines if line.get("msg") == msg and all(line.get(k) == v for k, v in match.items())
        ]

    def get(self, path: str, token: str | None = None, timeout: float = 5) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.get(self.url + path, headers=headers, timeout=timeout)

    def post(self, path: str, json: Any, token: str | None = None, timeout: float = 30) -> httpx.Response:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.post(self.url + path, json=json, headers=headers, timeout=timeout)

    def children(self) -> list[psutil.Process]:
        assert self.proc
        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10) -> int:
        """Signal the process and wait; returns its exit code."""
        assert self.proc
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(f"fleetmate did not stop within {timeout}s") from None
        if self._reader:
            self._reader.join(2)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def restart(self, wait_ready: bool = True, timeout: float = 20) -> Fleetmate:
        """Start again with the same directory and environment (kill first if it still runs); a fresh log."""
        self.kill()
        if self._reader:
            self._reader.join(2)
        self.lines, self.raw, self.url = [], [], ""
        return self.start(wait_ready=wait_ready, timeout=timeout)


def run_cli(
    args: list[str], env: Mapping[str, str], cwd: Path, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run the fleetmate command to completion with exactly these FLEETMATE_* variables."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("FLEETMATE_")}
    full.update(env)
    return subprocess.run(
        [sys.executable, "-m", "app", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def running(fm: Fleetmate, wait_ready: bool = True) -> Iterator[Fleetmate]:
    """Start fleetmate, and make sure it is gone afterwards whatever happens."""
    fm.start(wait_ready=wait_ready)
    try:
        yield fm
    finally:
        if fm.proc and fm.proc.poll() is None:
            kids = fm.children()
            fm.kill()
            for kid in kids:
                with contextlib.suppress(psutil.NoSuchProcess):
                    kid.kill()


class ReplicaSet:
    """fleetmate replicas on shared NATS URL(s), each on a fixed HTTP port so that a restart keeps its address."""

    def __init__(
        self,
        workdir: Path,
        nats_url: str,
        names: tuple[str, ...] = ("r1", "r2", "r3"),
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.replicas: dict[str, Fleetmate] = {}
        for name in names:
            port = free_port()
            self.replicas[name] = Fleetmate(
                workdir / name,
                env={
                    "FLEETMATE_NATS_URL": nats_url,
                    "FLEETMATE_NODE_ID": name,
                    "FLEETMATE_HTTP_PORT": str(port),
                    "FLEETMATE_WORKERS": "1",
                    **(env or {}),
                },
            )
        self.urls = {name: f"http://127.0.0.1:{fm.env['FLEETMATE_HTTP_PORT']}" for name, fm in self.replicas.items()}
        self.startup_failures: list[tuple[str, list[str]]] = []

    def __getitem__(self, name: str) -> Fleetmate:
        return self.replicas[name]

    def start(self, timeout: float = 60, retry_failed_start: bool = False) -> ReplicaSet:
        """Start every replica at once, then wait until each is ready; a replica that exits fails.

        retry_failed_start (benchmarks only) starts it once more and keeps its error lines in
        `startup_failures`, so a long run reports a failed start instead of ending there.
        """
        for fm in self.replicas.values():
            fm.start(wait_ready=False)
        for name, fm in self.replicas.items():

            def ready_or_exited(fm: Fleetmate = fm) -> str | None:
                if not fm.alive:
                    return "exited"
                return fm._ready_url()

            found = wait_for(ready_or_exited, timeout, f"{name} ready line")
            if found != "exited":
                fm.url = found
                continue
            if fm._reader:
                fm._reader.join(2)  # it ends at the exited process's EOF, having read the last lines
            errors = [line for line in fm.raw if '"level":"error"' in line or '"level":"critical"' in line]
            self.startup_failures.append((name, errors or fm.raw[-6:]))
            if not retry_failed_start:
                raise AssertionError(f"{name} exited during start-up: {fm.raw[-6:]}")
            fm.restart(timeout=timeout)
        return self

    def live(self) -> list[str]:
        return [name for name, fm in self.replicas.items() if fm.alive]

    def view(self, name: str, timeout: float = 2) -> dict[str, Any]:
        """/api/v1/cluster as replica name sees it."""
        body: dict[str, Any] = httpx.get(self.urls[name] + "/api/v1/cluster", timeout=timeout).json()
        return body

    def leader(self, timeout: float = 30) -> str:
        """The lease holder, once every live replica names the same one and it says it leads."""

        def settled() -> str | None:
            names = self.live()
            views = {name: self.view(name) for name in names}
            leaders = [name for name, v in views.items() if v.get("role") == "leader"]
            if len(leaders) != 1 or any(v["leader"]["node_id"] != leaders[0] for v in views.values()):
                return None
            return leaders[0]

        found: str = wait_for(settled, timeout, "one lease holder named by every live replica", 0.1)
        return found

    def close(self) -> None:
        for fm in self.replicas.values():
            fm.kill()
