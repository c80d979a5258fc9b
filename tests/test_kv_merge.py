"""KV merges: small neighbours merge back once merge_after has passed since their split; no key is lost."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Fleetmate, wait_for

pytestmark = pytest.mark.slow

CAPACITY = 2048


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    root: Path = tmp_path_factory.mktemp("kv-merge")
    server = Fleetmate(
        root,
        env={
            "FLEETMATE_KV_SHARD_CAPACITY": str(CAPACITY),
            "FLEETMATE_KV_MERGE_AFTER": "2",
            "FLEETMATE_KV_PARTITIONS": "1",
            "FLEETMATE_KV_NODE_LEASE": "1",
        },
    )
    server.start()
    try:
        wait_for(lambda: len(shards(server)) == 1, 30, "the store placed")
        yield server
    finally:
        server.kill()


def shards(fm: Fleetmate) -> list[dict[str, object]]:
    resp = httpx.get(fm.url + "/api/v1/kv/shards", timeout=10)
    assert resp.status_code == 200, resp.text
    body: list[dict[str, object]] = resp.json()
    return body


def put(fm: Fleetmate, key: str, value: str) -> None:
    def done() -> bool:
        return httpx.post(fm.url + "/api/v1/kv/put", json={"key": key, "value": value}, timeout=30).status_code == 200

    wait_for(done, 30, f"put {key}")


def test_splits_then_merges_back_when_small(fm: Fleetmate) -> None:
    for i in range(80):
        put(fm, f"m{i:03d}", "v" * 60)
    wait_for(lambda: len(shards(fm)) >= 4, 30, "the store split past its capacity")
    split_to = len(shards(fm))
    for i in range(80):
        if i % 20:
            assert httpx.post(fm.url + "/api/v1/kv/delete", json={"key": f"m{i:03d}"}, timeout=30).status_code == 200
    wait_for(lambda: len(shards(fm)) <= 2, 60, f"the {split_to} shards merged back (4 keys left)")
    items = httpx.get(fm.url + "/api/v1/kv/scan", params={"prefix": "m"}, timeout=30).json()["items"]
    assert [i["key"] for i in items] == [f"m{i:03d}" for i in range(0, 80, 20)]
    assert fm.logged("merge proposed")
    assert not [line for line in fm.raw if '"level":"error"' in line or "Traceback" in line]
