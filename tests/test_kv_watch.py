"""KV watches: ordered and complete across splits, served by another replica and carried over when it dies."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import msgspec
import pytest
import websockets

from app.services.kv.messages import KeyEvent
from app.services.kv.watch_source import Watch
from app.services.kv.wire import WatchBatch, WatchOpen
from tests.harness.kvcluster import NAMES, Env, kv_cluster

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root: Path = tmp_path_factory.mktemp("kv-watch")
    with kv_cluster(root, FLEETMATE_KV_PARTITIONS="1", FLEETMATE_KV_SHARD_CAPACITY="4096") as e:
        yield e


def ws_url(env: Env, name: str, query: str) -> str:
    return env.url(name).replace("http://", "ws://") + "/api/v1/kv/watch?" + query


async def collect(ws: Any, quiet: float = 2.0) -> list[dict[str, Any]]:
    """Messages until none comes for `quiet` seconds."""
    out = []
    while True:
        try:
            out.append(json.loads(await asyncio.wait_for(ws.recv(), quiet)))
        except TimeoutError:
            return out


async def put(http: httpx.AsyncClient, env: Env, name: str, key: str, value: str) -> int:
    r = await http.post(env.url(name) + "/api/v1/kv/put", json={"key": key, "value": value}, timeout=30)
    assert r.status_code == 200, r.text
    rev: int = r.json()["revision"]
    return rev


def test_bad_watches_are_refused(env: Env) -> None:
    async def go() -> None:
        for query, code in (
            ("start=b&end=a", "bad_request"),
            ("prefix=x&start=a", "bad_request"),
            ("resume=banana", "bad_request"),
            ("prefix=p&resume=0:5", "compacted"),
        ):
            async with websockets.connect(ws_url(env, "r1", query)) as ws:
                m = json.loads(await asyncio.wait_for(ws.recv(), 10))
                assert m["type"] == "error", (query, m)
                assert m["error"] == code, (query, m)

    asyncio.run(go())


def test_a_watch_stays_complete_when_the_replica_serving_it_is_killed(env: Env) -> None:
    """The gateway holds no copy of the range, so another replica serves it; kill that one mid-stream."""

    table = env.table("r1")
    assert len(table) == 1, table  # one partition, one shard at first: three holders and one replica without it
    holders = sorted(h["node"] for h in table[0]["holders"])
    gateway = next(n for n in NAMES if n not in holders)
    victim = holders[0]  # the gateway opens the watch on the first holder by name

    async def go() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        written: list[tuple[str, int]] = []
        async with httpx.AsyncClient() as http, websockets.connect(ws_url(env, gateway, "prefix=job/")) as ws:
            ready = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert ready["type"] == "ready", ready
            for i in range(40):  # 8 KB past a 4 KiB capacity: the shard splits while watched
                written.append((f"job/{i:03d}", await put(http, env, NAMES[i % 4], f"job/{i:03d}", "x" * 200)))
            msgs = await collect(ws)
            env.replicas[victim].kill()
            live = [n for n in NAMES if n != victim]
            for i in range(40, 80):
                written.append((f"job/{i:03d}", await put(http, env, live[i % 3], f"job/{i:03d}", "y" * 200)))
            msgs += await collect(ws, 6.0)
        got = [(e["key"], e["revision"]) for m in msgs for e in m.get("events", [])]
        return written, got

    written, got = asyncio.run(go())
    assert len(got) == len(set(got)), "an event came twice"
    assert [r for _, r in got] == sorted(r for _, r in got), "events out of revision order"
    assert set(written) <= set(got), sorted(set(written) - set(got))[:5]
    assert len(env.table(gateway)) > 1, "the shard did not split while watched"
    assert env.replicas[gateway].logged("kv watch reopened"), "the watch was never carried to another holder"


async def test_a_backlog_in_several_batches_claims_its_upto_only_in_the_last() -> None:
    """A batch says "nothing more up to upto": before the last batch of a backlog that would skip the rest."""
    sent: list[WatchBatch] = []

    async def publish(subject: str, data: bytes) -> None:
        sent.append(msgspec.msgpack.decode(data, type=WatchBatch))

    bus = SimpleNamespace(nc=SimpleNamespace(publish=publish))
    watch = Watch(WatchOpen("w1", 0, "", "", 0, "inbox", [("", "")]), {1}, bus)  # type: ignore[arg-type]
    events = [KeyEvent(1, "put", f"k{i:04d}", (i + 1) << 16) for i in range(1200)]
    watch.enqueue(events, upto=5000 << 16)
    watch.close()
    await asyncio.sleep(0.05)
    assert [len(b.events) for b in sent] == [500, 500, 200]
    assert [b.seq for b in sent] == [1, 2, 3]
    assert [b.upto for b in sent] == [500 << 16, 1000 << 16, 5000 << 16]
