"""KV keys that end: with a TTL, or with the registry session they are bound to (the shard's leader deletes them)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import Fleetmate, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    root: Path = tmp_path_factory.mktemp("kv-ttl")
    server = Fleetmate(root, env={"FLEETMATE_KV_PARTITIONS": "1"})
    server.start()
    try:
        wait_for(lambda: put(server, "warm", "up").status_code == 200, 30, "the store placed")
        yield server
    finally:
        server.kill()


def put(fm: Fleetmate, key: str, value: str, **extra: object) -> httpx.Response:
    return httpx.post(fm.url + "/api/v1/kv/put", json={"key": key, "value": value, **extra}, timeout=30)


def get(fm: Fleetmate, key: str) -> httpx.Response:
    return httpx.get(fm.url + "/api/v1/kv/get", params={"key": key}, timeout=30)


def test_a_key_with_a_ttl_ends_and_a_put_without_one_keeps_it(fm: Fleetmate) -> None:
    assert put(fm, "t/short", "v", ttl=1).status_code == 200
    assert put(fm, "t/kept", "v", ttl=1).status_code == 200
    assert put(fm, "t/kept", "v2").status_code == 200  # written again without a TTL: lasting
    body = get(fm, "t/short").json()
    assert body["expires_ms"] > time.time() * 1000
    wait_for(lambda: get(fm, "t/short").status_code == 404, 10, "t/short expired", 0.1)
    assert get(fm, "t/kept").json()["value"] == "v2"
    assert get(fm, "t/kept").json()["expires_ms"] == 0


def test_a_key_bound_to_a_session_ends_with_it(fm: Fleetmate) -> None:
    opened = httpx.post(fm.url + "/api/v1/sessions", json={"timeout_ms": 10000}, timeout=10)
    assert opened.status_code == 201, opened.text
    sid = opened.json()["session_id"]
    assert put(fm, "s/lock", "me", session=sid).status_code == 200
    assert get(fm, "s/lock").json()["session"] == sid
    time.sleep(1.0)
    assert get(fm, "s/lock").status_code == 200  # the session lives: so does the key
    assert httpx.delete(fm.url + f"/api/v1/sessions/{sid}", timeout=10).status_code == 200
    wait_for(lambda: get(fm, "s/lock").status_code == 404, 10, "s/lock gone with its session", 0.1)


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        ({"ttl": -1}, "ttl"),
        ({"ttl": 1e12}, "ttl"),
        ({"session": 123456789}, "does not exist"),
        ({"session": -5}, "session"),
    ],
)
def test_bad_ttls_and_sessions_are_refused_and_change_nothing(
    fm: Fleetmate, extra: dict[str, object], words: str
) -> None:
    assert put(fm, "t/bad", "before").status_code == 200
    refused = put(fm, "t/bad", "after", **extra)
    assert refused.status_code == 400, refused.text
    assert words in refused.json()["message"]
    assert get(fm, "t/bad").json()["value"] == "before"
