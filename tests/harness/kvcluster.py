"""Four fleetmate replicas on one nats-server with the KV store settled, and the calls a MatrixKV user makes."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from tests.harness.fleetmate import NatsServer, ReplicaSet
from tests.harness.wait import wait_for

NAMES = ("r1", "r2", "r3", "r4")
SETTLE_S = 40.0


class Env:
    """Four replicas on one nats-server, and the calls a MatrixKV user makes."""

    def __init__(self, replicas: ReplicaSet) -> None:
        self.replicas = replicas

    def url(self, name: str) -> str:
        return self.replicas.urls[name]

    def set(self, name: str, key: str, value: str) -> dict[str, Any]:
        resp = httpx.post(self.url(name) + "/set", json={"key": key, "value": value}, timeout=30)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def get(self, name: str, key: str) -> dict[str, Any]:
        resp = httpx.get(self.url(name) + "/get", params={"key": key}, timeout=30)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def delete(self, name: str, key: str) -> dict[str, Any]:
        resp = httpx.post(self.url(name) + "/delete", json={"key": key}, timeout=30)
        assert resp.status_code == 200, resp.text
        body: dict[str, Any] = resp.json()
        return body

    def shards(self, name: str, local: bool = False) -> list[dict[str, Any]]:
        resp = httpx.get(self.url(name) + "/shards", params={"local": "1"} if local else {}, timeout=10)
        assert resp.status_code == 200, resp.text
        body: list[dict[str, Any]] = resp.json()
        return body

    def table(self, name: str, local: bool = False) -> list[dict[str, Any]]:
        resp = httpx.get(self.url(name) + "/api/v1/kv/shards", params={"local": str(local).lower()}, timeout=10)
        assert resp.status_code == 200, resp.text
        body: list[dict[str, Any]] = resp.json()
        return body

    def settled(self, name: str, copies: int) -> bool:
        """Every shard has `copies` holders, each acknowledged at the shard's epoch."""
        table = self.table(name)
        return bool(table) and all(
            len(s["holders"]) == copies and all(h["acked"] == s["epoch"] for h in s["holders"]) for s in table
        )


@contextlib.contextmanager
def kv_cluster(root: Path, **env: str) -> Iterator[Env]:
    """r1-r4 with these FLEETMATE_* settings (1 s KV leases and a 2 s registry lease unless given), every shard
    on 3 replicas and acknowledged before it yields; everything killed after."""
    nats = NatsServer(root / "nats").start()
    settings = {
        "FLEETMATE_KV_NODE_LEASE": "1",
        "FLEETMATE_LEASE_TTL": "2",
        "FLEETMATE_LEASE_RENEW_INTERVAL": "0.5",
        **env,
    }
    replicas = ReplicaSet(root, nats.url, names=NAMES, env=settings)
    try:
        replicas.start()
        replicas.leader()
        e = Env(replicas)
        wait_for(lambda: e.settled("r1", 3), SETTLE_S, "every shard on 3 replicas, acknowledged", 0.2)
        yield e
    finally:
        replicas.close()
        nats.stop()
