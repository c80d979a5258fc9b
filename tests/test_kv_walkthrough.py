"""MatrixKV's walk-through on 4 replicas: set/get/delete anywhere, 1 KiB splits, a stopped replica refuses."""

from __future__ import annotations

import base64
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.harness import run_cli, wait_for
from tests.harness.kvcluster import NAMES, Env, kv_cluster

pytestmark = pytest.mark.slow

CAPACITY = 1024
SLOW_S = 30.0  # a generous bound on what takes a second or two (timings are measured in bench/)


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root: Path = tmp_path_factory.mktemp("kv-walk")
    with kv_cluster(root, FLEETMATE_KV_SHARD_CAPACITY=str(CAPACITY), FLEETMATE_KV_PARTITIONS="2") as e:
        yield e


def test_set_get_delete_on_any_replica(env: Env) -> None:
    assert env.set("r1", "k1", "v1") == {"key": "k1", "error": ""}
    for name in NAMES:
        assert env.get(name, "k1") == {"key": "k1", "value": "v1", "error": ""}
    assert env.set("r2", "k2", "v2") == {"key": "k2", "error": ""}
    assert env.get("r4", "k2") == {"key": "k2", "value": "v2", "error": ""}
    assert env.delete("r3", "k1") == {"key": "k1", "error": ""}
    for name in NAMES:
        assert env.get(name, "k1") == {"key": "k1", "value": "", "error": ""}


def test_bad_input_is_an_error_and_changes_nothing(env: Env) -> None:
    env.set("r1", "kept", "yes")
    assert env.set("r1", "", "v")["error"] == "key is empty"
    assert env.set("r2", "kept", "")["error"] == "value is empty"
    assert "bytes; the most is" in env.set("r3", "k" * 5000, "v")["error"]
    assert env.get("r4", "kept")["value"] == "yes"
    resp = httpx.post(env.url("r1") + "/api/v1/kv/put", json={"key": "", "value": "v"}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"] == "bad_request", resp.text
    resp = httpx.get(env.url("r1") + "/api/v1/kv/scan", params={"start": "b", "end": "a"}, timeout=10)
    assert resp.status_code == 400, resp.text
    assert "not before" in resp.json()["message"], resp.text


def test_a_read_token_makes_a_serializable_read_on_any_replica_see_the_write(env: Env) -> None:
    for i in range(20):
        writer, reader = NAMES[i % 4], NAMES[(i + 1 + i // 4) % 4]
        put = httpx.post(env.url(writer) + "/api/v1/kv/put", json={"key": "tok", "value": f"v{i}"}, timeout=30)
        assert put.status_code == 200, put.text
        token = put.json()["token"]
        got = httpx.get(
            env.url(reader) + "/api/v1/kv/get",
            params={"key": "tok", "serializable": "true", "token": token},
            timeout=30,
        )
        assert got.status_code == 200, got.text
        assert (got.json()["value"], got.json()["revision"]) == (f"v{i}", put.json()["revision"])
    for bad in ("x", "1:", ":5", "1:2:3", "999:1"):
        got = httpx.get(env.url("r1") + "/api/v1/kv/get", params={"key": "tok", "token": bad}, timeout=10)
        assert got.status_code == 400, (bad, got.text)


def test_the_cli(env: Env, tmp_path: Path) -> None:
    cli = {"FLEETMATE_ADDR": env.url("r2")}

    def kv(*args: str) -> subprocess.CompletedProcess[str]:
        return run_cli(["kv", *args], cli, tmp_path)

    done = kv("put", "cli/a", "alpha")
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("revision="), done.stderr
    rev = int(done.stdout.split()[0].split("=")[1])
    assert kv("get", "cli/a").stdout == "alpha\n"
    refused = kv("put", "cli/a", "beta", "--if-revision", str(rev + 1))
    assert refused.returncode == 1, refused.stderr
    assert "revision_mismatch" in refused.stderr, refused.stderr
    assert kv("put", "cli/a", "beta", "--if-revision", str(rev)).returncode == 0
    assert kv("put", "cli/b", "bravo").returncode == 0
    assert kv("scan", "--prefix", "cli/").stdout == "cli/a\tbeta\ncli/b\tbravo\n"
    assert kv("del", "cli/b").stdout.endswith("deleted=1\n")
    missing = kv("get", "cli/b")
    assert missing.returncode == 1
    assert "key_not_found" in missing.stderr
    table = kv("shards")
    assert table.returncode == 0, table.stderr
    assert table.stdout.startswith(" SHARD PART"), table.stderr
    assert len(table.stdout.splitlines()) == len(env.table("r2")) + 1
    assert kv("put", "", "x").returncode == 1


def test_the_shell(env: Env, tmp_path: Path) -> None:
    script = "kvput sh/a one; kvput -r 0 sh/a two; kvput sh/b two words; kvget sh/b; kvscan sh/; kvdel sh/a; kvget sh/a"
    done = run_cli(["shell", "--addr", env.url("r3"), "-c", script], {}, tmp_path)
    assert done.stdout.splitlines() == ["two words", "sh/a = one", "sh/b = two words"], (done.stdout, done.stderr)
    assert "Error: revision_mismatch: key 'sh/a' is at revision" in done.stderr
    assert "Error: key_not_found: key 'sh/a' does not exist" in done.stderr
    assert "deleted = 1" in done.stderr
    shards = run_cli(["shell", "--addr", env.url("r1"), "-c", "kvshards"], {}, tmp_path)
    assert len(shards.stdout.splitlines()) == len(env.table("r1")), shards.stderr
    assert all(line.startswith("shard ") for line in shards.stdout.splitlines())


def test_a_few_writes_split_shards_and_every_replica_lists_them(env: Env) -> None:
    before = env.shards("r1")
    assert all(set(s) <= {"id", "start", "end", "epoch", "replicas", "group", "labels"} for s in before)
    values = {f"user{i:03d}": f"value-{i}-" + "x" * 40 for i in range(60)}
    for i, (key, value) in enumerate(values.items()):
        assert env.set(NAMES[i % 4], key, value) == {"key": key, "error": ""}

    def split() -> bool:
        return len(env.shards("r1")) >= len(before) + 2 and env.settled("r1", 3)

    wait_for(split, SLOW_S, "shards split past 1 KiB and settled on 3 replicas each", 0.2)
    after = env.shards("r2")
    assert len(after) >= len(before) + 2
    starts = sorted(base64.b64decode(s.get("start", "")).decode() for s in after)
    assert any(s.startswith("user") for s in starts), starts  # split inside the written range
    for name in NAMES:
        local = env.table(name, local=True)
        assert all(s["held_here"] and s["local_size"] <= 2 * CAPACITY for s in local)
        assert env.shards(name) == after or len(env.shards(name)) == len(after)
    for i, (key, value) in enumerate(values.items()):
        assert env.get(NAMES[(i + 1) % 4], key) == {"key": key, "value": value, "error": ""}
    resp = httpx.get(env.url("r3") + "/api/v1/kv/scan", params={"prefix": "user", "limit": 1000}, timeout=30)
    assert resp.status_code == 200, resp.text
    assert [i["key"] for i in resp.json()["items"]] == sorted(values)


def test_a_stopped_replica_refuses_while_the_others_serve(env: Env) -> None:
    env.replicas["r4"].stop()
    with pytest.raises(httpx.TransportError):
        httpx.get(env.url("r4") + "/get", params={"key": "user001"}, timeout=5)
    for i in range(30):
        key = f"after{i:02d}"
        assert env.set(NAMES[i % 3], key, f"v{i}") == {"key": key, "error": ""}
    for i in range(30):
        assert env.get(NAMES[(i + 1) % 3], f"after{i:02d}")["value"] == f"v{i}"
    for i in range(0, 60, 7):
        assert env.get("r1", f"user{i:03d}")["value"].startswith(f"value-{i}-")


def test_the_kv_figures_on_metrics(env: Env) -> None:
    figures: dict[str, float] = {}
    for name in NAMES[:3]:  # r4 is stopped by now
        for line in httpx.get(env.url(name) + "/metrics", timeout=10).text.splitlines():
            if line.startswith("fleetmate_kv_") and "{" not in line:
                key, value = line.split()
                figures[key] = figures.get(key, 0.0) + float(value)
    assert figures["fleetmate_kv_copies_in_total"] >= 1
    assert figures["fleetmate_kv_copies_out_total"] >= 1
    assert figures["fleetmate_kv_shards_held"] >= 3
    assert figures["fleetmate_kv_bytes_held"] > 0


def test_copies_were_made_and_nothing_logged_an_error(env: Env) -> None:
    copied = [line for name in NAMES for line in env.replicas[name].raw if '"shard copied"' in line]
    assert copied, "no replica copied a shard from another (every copy was placed at creation?)"
    errors = [
        (name, line)
        for name in NAMES
        for line in env.replicas[name].raw
        if '"level":"error"' in line or '"level":"critical"' in line or "Traceback" in line
    ]
    assert not errors, errors[:5]
