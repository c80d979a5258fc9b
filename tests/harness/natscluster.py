"""A 3-server nats-server cluster with JetStream on free ports, for tests and benchmarks that kill servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import nats

from app.bus.embedded import find_binary
from tests.harness.fleetmate import free_port
from tests.harness.wait import wait_for

CLUSTER_NAME = "fmtest"
META_LEADER_TIMEOUT_S = 30.0


def render_cluster_config(
    *, name: str, port: int, route_port: int, monitor_port: int, store_dir: Path, routes: list[int]
) -> str:
    """One member's config: like the embedded server's (fsync before ack) plus a cluster block."""
    route_urls = ", ".join(json.dumps(f"nats://127.0.0.1:{p}") for p in routes)
    return (
        f"server_name: {json.dumps(name)}\n"
        f"listen: {json.dumps(f'127.0.0.1:{port}')}\n"
        f"http: {json.dumps(f'127.0.0.1:{monitor_port}')}\n"
        "max_payload: 8MB\n"
        "jetstream {\n"
        f"  store_dir: {json.dumps(str(store_dir))}\n"
        "  sync_interval: always\n"
        "}\n"
        "cluster {\n"
        f"  name: {CLUSTER_NAME}\n"
        f"  listen: {json.dumps(f'127.0.0.1:{route_port}')}\n"
        f"  routes: [{route_urls}]\n"
        "}\n"
    )


class ClusterMember:
    """One nats-server of the cluster: fixed ports, its own store and config, restartable."""

    def __init__(self, workdir: Path, name: str) -> None:
        self.name = name
        self.dir = workdir
        self.port = free_port()
        self.route_port = free_port()
        self.monitor_port = free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.conf = workdir / "nats-server.conf"

    def write_config(self, routes: list[int]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        self.conf.write_text(
            render_cluster_config(
                name=self.name,
                port=self.port,
                route_port=self.route_port,
                monitor_port=self.monitor_port,
                store_dir=self.dir / "jetstream",
                routes=routes,
            )
        )

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        """Spawn the server and wait until it accepts client connections."""
        with (self.dir / "nats.log").open("ab") as log:
            self.proc = subprocess.Popen(
                [find_binary(), "-c", str(self.conf)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
            )

        def listening() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.proc.returncode}; see {self.dir / 'nats.log'}")
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True

        wait_for(listening, 10, f"nats-server {self.name} on {self.port}")

    def signal(self, sig: int, timeout: float = 10) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def healthy(self) -> bool:
        """JetStream on this server is up and every stream and consumer it hosts is current."""
        try:
            resp = httpx.get(f"http://127.0.0.1:{self.monitor_port}/healthz", timeout=1, trust_env=False)
        except httpx.HTTPError:
            return False
        return resp.status_code == 200


class NatsCluster:
    """Three clustered nats-servers (n1, n2, n3) with JetStream and `sync_interval: always`."""

    def __init__(self, workdir: Path, size: int = 3) -> None:
        self.dir = workdir
        self.members = [ClusterMember(workdir / f"n{i + 1}", f"n{i + 1}") for i in range(size)]
        routes = [m.route_port for m in self.members]
        for m in self.members:
            m.write_config([p for p in routes if p != m.route_port])

    @property
    def urls(self) -> str:
        """Every client URL, comma-joined (the form FLEETMATE_NATS_URL takes)."""
        return ",".join(m.url for m in self.members)

    def live_urls(self) -> list[str]:
        return [m.url for m in self.members if m.alive]

    def index(self, server_name: str) -> int:
        """Index of the member whose server_name is server_name."""
        for i, m in enumerate(self.members):
            if m.name == server_name:
                return i
        raise KeyError(server_name)

    # ---- life cycle ------------------------------------------------------------------------------

    def start(self, timeout: float = META_LEADER_TIMEOUT_S) -> NatsCluster:
        """Start every member, then wait until JetStream has a meta leader (an R3 stream can be made)."""
        for m in self.members:
            m.start()
        self.wait_meta_leader(timeout)
        return self

    def wait_meta_leader(self, timeout: float = META_LEADER_TIMEOUT_S) -> float:
        """Retry creating (and deleting) a throwaway R3 stream until it works; seconds it took."""
        started = time.monotonic()
        name = f"PROBE_{uuid.uuid4().hex[:8]}"

        async def probe() -> bool:
            nc = await nats.connect(servers=self.live_urls(), connect_timeout=1, allow_reconnect=False)
            try:
                js = nc.jetstream(timeout=2)
                await js.add_stream(name=name, subjects=[f"probe.{name}"], num_replicas=len(self.members))
                await js.delete_stream(name)
                return True
            finally:
                await nc.close()

        wait_for(lambda: asyncio.run(probe()), timeout, "a JetStream meta leader (an R3 stream create)", 0.25)
        return time.monotonic() - started

    def kill(self, i: int) -> float:
        """SIGKILL member i and reap it; returns the time.monotonic() just after the signal was sent."""
        m = self.members[i]
        if m.proc is not None and m.proc.poll() is None:
            m.proc.send_signal(signal.SIGKILL)
        sent = time.monotonic()
        m.signal(signal.SIGKILL)
        return sent

    def stop(self, i: int) -> None:
        """SIGTERM member i (a clean shutdown) and wait for it."""
        self.members[i].signal(signal.SIGTERM)

    def restart(self, i: int, wait_healthy: bool = True, timeout: float = 30) -> None:
        """Start member i again on the same ports and store; by default wait until it is current."""
        m = self.members[i]
        if m.alive:
            m.signal(signal.SIGTERM)
        m.start()
        if wait_healthy:
            wait_for(m.healthy, timeout, f"{m.name} healthy (JetStream current)", 0.1)

    def wait_healthy(self, timeout: float = 30) -> None:
        """Wait until every live member reports JetStream current."""
        wait_for(lambda: all(m.healthy() for m in self.members if m.alive), timeout, "every live member healthy", 0.1)

    def close(self) -> None:
        for m in self.members:
            m.signal(signal.SIGKILL)

    def __enter__(self) -> NatsCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- JetStream API -----------------------------------------------------------------------------

    def request(self, subject: str, payload: bytes = b"", timeout: float = 2.0) -> dict[str, Any]:
        """A JetStream API request through any live member; the decoded JSON reply."""

        async def go() -> dict[str, Any]:
            nc = await nats.connect(servers=self.live_urls(), connect_timeout=1, allow_reconnect=False)
            try:
                reply = await nc.request(subject, payload, timeout=timeout)
                body: dict[str, Any] = json.loads(reply.data)
                return body
            finally:
                await nc.close()

        return asyncio.run(go())

    def stream_info(self, stream: str) -> dict[str, Any]:
        """`$JS.API.STREAM.INFO.<stream>`; raises AssertionError on an API error."""
        info = self.request(f"$JS.API.STREAM.INFO.{stream}")
        if "error" in info:
            raise AssertionError(f"stream info {stream}: {info['error']}")
        return info

    def stream_leader(self, stream: str, timeout: float = 0.5) -> str | None:
        """server_name of the member leading the stream, or None while it has none (no leader: no answer)."""
        with contextlib.suppress(Exception):
            info = self.request(f"$JS.API.STREAM.INFO.{stream}", timeout=timeout)
            leader = info.get("cluster", {}).get("leader")
            return str(leader) if leader else None
        return None

    def wait_stream_leader(self, stream: str, timeout: float = 30) -> int:
        """Index of the member leading the stream, waiting until it has a live one."""

        def live_leader() -> int | None:
            name = self.stream_leader(stream)
            if name is None:
                return None
            i = self.index(name)
            return i if self.members[i].alive else None

        found: int = wait_for(lambda: (x := live_leader()) is not None and (x,), timeout, f"a leader of {stream}")[0]
        return found


@contextlib.contextmanager
def nats_cluster(workdir: Path) -> Iterator[NatsCluster]:
    """A started 3-server cluster, killed on exit whatever happens."""
    cluster = NatsCluster(workdir)
    try:
        yield cluster.start()
    finally:
        cluster.close()


REGISTRY_STREAM = "FLEETMATE_REGISTRY"


def replica_env(**extra: str) -> dict[str, str]:
    """Environment of a fleetmate replica on the cluster: an R3 registry stream and a short lease."""
    return {
        "FLEETMATE_REGISTRY_STREAM_REPLICAS": "3",
        "FLEETMATE_LEASE_TTL": "2",
        "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
        "FLEETMATE_WORKERS": "1",
        **extra,
    }
