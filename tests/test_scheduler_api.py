"""The scheduler's REST API and `fleetmate sched` on one real replica: placement, manual operators, drain,
restart from the state file, and every bad input refused with a clear 4xx and nothing changed."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.sync.client import connect as ws_connect

from tests.harness import Fleetmate, run_cli, wait_for

BASE = "/api/v1/scheduler"


class Beats:
    """Heartbeats and acks for data nodes over REST, from a thread: the nodes acknowledge whatever
    they are assigned (a real process does this over NATS in tests/test_scheduler_e2e.py)."""

    def __init__(self, fm: Fleetmate, cluster: str) -> None:
        self.fm, self.cluster = fm, cluster
        self.nodes: set[str] = set()
        self.load: dict[int, float] = {}  # writes a second each node reports for the shards it holds
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=self.fm.url, timeout=5) as http:
            while not self.stop.wait(0.2):
                for n in sorted(self.nodes):
                    base = f"{BASE}/clusters/{self.cluster}/nodes/{n}"
                    try:
                        got = http.get(f"{base}/assignment").json()
                        held = got.get("shards", [])
                        loads = [{"id": a["id"], "writes_per_s": self.load.get(a["id"], 0.0)} for a in held]
                        http.post(f"{base}/heartbeat", json={"shards": loads if self.load else []})
                        for s in got.get("shards", []):
                            http.post(f"{base}/acks", json={"shard": s["id"], "epoch": s["epoch"]})
                        for sid in got.get("drop", []):
                            http.post(f"{base}/acks", json={"shard": sid, "epoch": 0, "status": "closed"})
                    except httpx.HTTPError:
                        continue


@pytest.fixture(scope="module")
def fm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleetmate]:
    env = {"FLEETMATE_SCHEDULER_INTERVAL": "0.2", "FLEETMATE_SCHEDULER_LOAD_INTERVAL": "1"}
    replica = Fleetmate(tmp_path_factory.mktemp("sched"), env=env).start(timeout=30)
    yield replica
    replica.stop()


def _cluster(fm: Fleetmate, name: str, **spec: Any) -> Beats:
    body = {"name": name, "shard_count": 12, "max_replicas": 3, "lease_s": 2, "limits": {"cooldown_s": 0}, **spec}
    got = fm.post(f"{BASE}/clusters", body)
    assert got.status_code == 201, got.text
    beats = Beats(fm, name)
    beats.thread.start()
    return beats


def _register(fm: Fleetmate, beats: Beats, *nodes: str, zone: bool = False) -> None:
    for n in nodes:
        labels = {"zone": n} if zone else {}
        got = fm.post(f"{BASE}/clusters/{beats.cluster}/nodes", {"node": n, "labels": labels})
        assert got.status_code == 201, got.text
        beats.nodes.add(n)


def _shards(fm: Fleetmate, cluster: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = fm.get(f"{BASE}/clusters/{cluster}/shards").json()
    return got


def _settled(fm: Fleetmate, cluster: str) -> bool:
    view = fm.get(f"{BASE}/clusters/{cluster}").json()
    shards = _shards(fm, cluster)
    acked = all(r["acked"] == s["epoch"] for s in shards for r in s["replicas"])
    return bool(view["placed"] and view["procedures_running"] == 0 and acked)


def test_placement_operators_drain_and_a_restart(fm: Fleetmate) -> None:
    beats = _cluster(fm, "orders")
    try:
        _register(fm, beats, "a", "b", "c", "d")
        wait_for(lambda: _settled(fm, "orders") or None, 30, "placement acknowledged")
        shards = _shards(fm, "orders")
        assert all(len(s["replicas"]) == 3 and s["leader"] for s in shards)

        # A manual move, and its history.
        s0 = shards[0]
        holder = s0["replicas"][-1]["node"]
        target = next(n for n in "abcd" if n not in {r["node"] for r in s0["replicas"]})
        got = fm.post(
            f"{BASE}/clusters/orders/procedures",
            {"kind": "move", "shards": [s0["id"]], "node_from": holder, "node_to": target},
        )
        assert got.status_code == 201, got.text
        proc = got.json()["id"]
        wait_for(lambda: fm.get(f"{BASE}/procedures/{proc}").json()["status"] == "success" or None, 30, "the move")
        after = next(s for s in _shards(fm, "orders") if s["id"] == s0["id"])
        assert target in {r["node"] for r in after["replicas"]}
        assert holder not in {r["node"] for r in after["replicas"]}
        assert after["epoch"] == s0["epoch"] + 3  # learner, promote, remove
        history = [h[1] for h in fm.get(f"{BASE}/procedures/{proc}").json()["history"]]
        assert history[0] == "created by manual"
        assert history[-1] == "success"
        audit = fm.get("/api/v1/audit?source=scheduler&subject=orders&limit=1000").json()
        mine = [e for e in audit if e["message"].startswith(f"procedure {proc} move")]
        assert len(mine) == len(history)
        assert all(len(e["trace_id"]) == 32 for e in mine)

        # Drain: leaders, then replicas, leave the node.
        assert fm.post(f"{BASE}/clusters/orders/nodes/d/drain", {}).status_code == 200

        def drained() -> bool:
            view = fm.get(f"{BASE}/clusters/orders/nodes/d").json()
            return bool(view["replicas"] == 0 and _settled(fm, "orders"))

        wait_for(lambda: drained() or None, 60, "node d drained")
        assert all(len(s["replicas"]) == 3 for s in _shards(fm, "orders"))
        diag = {v["scheduler"]: v for v in fm.get(f"{BASE}/clusters/orders/diagnose").json()}
        assert not any(v["operators"] for v in diag.values()), diag

        # What-if: nothing changes.
        before = _shards(fm, "orders")
        got = fm.post(f"{BASE}/clusters/orders/what-if", {"down": ["a"]})
        assert got.status_code == 200, got.text
        assert got.json()["by_kind"], got.json()
        assert _shards(fm, "orders") == before

        # The state survives a restart (the SQLite file and the log).
        revision = fm.get(f"{BASE}/clusters/kv").json()["revision"]
        beats.stop.set()
        beats.thread.join(5)
        fm.stop()
        fm.restart(timeout=30)
        view = fm.get(f"{BASE}/clusters/kv").json()
        assert view["revision"] >= revision
        assert [s["replicas"] for s in _shards(fm, "orders")] == [s["replicas"] for s in before]
    finally:
        beats.stop.set()


def _state(fm: Fleetmate, cluster: str) -> tuple[Any, ...]:
    view = fm.get(f"{BASE}/clusters/{cluster}").json()
    view.pop("revision")
    return (view, _shards(fm, cluster), fm.get(f"{BASE}/clusters/{cluster}/procedures").json())


def _bad_inputs(sid: int, frm: str) -> list[tuple[str, str, Any, int, str]]:
    """Each bad request with the status and words its answer must carry; `sid` is a shard with a live
    replica on `frm` and none on down1 (a down node)."""
    move = {"kind": "move", "shards": [sid], "node_from": frm}
    return [
        (
            "POST",
            "/clusters",
            {"name": "x", "topology": "dynamic", "local_data": True},
            400,
            "dynamic topology is refused",
        ),
        ("POST", "/clusters", {"name": "x", "shard_count": 0}, 400, "shard_count"),
        ("POST", "/clusters", {"name": "x", "limits": {"leader": -1}}, 400, "limits.leader"),
        ("POST", "/clusters", {"name": "-bad"}, 400, "cluster"),
        ("POST", "/clusters", {"name": "x", "max_replicas": 9}, 400, "max_replicas"),
        ("POST", "/clusters", {"name": "bad", "shard_count": 4}, 409, "exists"),
        ("PATCH", "/clusters/bad", {"limits": {"node_adds_per_min": -3}}, 400, "node_adds_per_min"),
        ("PATCH", "/clusters/bad", {"affinity": {"99": {"zone": "a"}}}, 400, "shard 99"),
        ("PATCH", "/clusters/nope", {"paused": True}, 404, "no cluster named 'nope'"),
        ("POST", "/clusters/nope/nodes", {"node": "a"}, 404, "no cluster"),
        ("POST", "/clusters/bad/nodes", {"node": "a b"}, 400, "node"),
        ("POST", "/clusters/bad/nodes/ghost/drain", {}, 404, "no node 'ghost'"),
        ("POST", "/clusters/bad/procedures", {**move, "node_to": "z"}, 404, "no node 'z'"),
        ("POST", "/clusters/bad/procedures", {**move, "shards": [99], "node_to": "a"}, 404, "no shard 99"),
        ("POST", "/clusters/bad/procedures", {**move, "node_to": "down1"}, 409, "down1 is down"),
        ("POST", "/clusters/bad/procedures", {"kind": "split", "shards": [sid], "split_key": "zz"}, 400, "split_key"),
        ("POST", "/clusters/bad/procedures", {"kind": "merge", "shards": [0, 2]}, 409, "ends at"),
        ("POST", "/clusters/bad/procedures", {"kind": "warp", "shards": [0]}, 400, "kind"),
        ("POST", "/procedures/999999/cancel", {}, 404, "no procedure"),
        ("GET", "/clusters/bad/route", None, 400, "give a key or a table"),
        ("GET", "/clusters/bad/route?table=nope", None, 404, "no table"),
        ("POST", f"/clusters/bad/nodes/{frm}/acks", {"shard": sid, "epoch": 999}, 400, "epoch"),
        ("POST", "/clusters/static1/nodes", {"node": "extra"}, 409, "does not grow"),
        (
            "POST",
            "/clusters/static1/procedures",
            {"kind": "add_replica", "shards": [0], "node_to": "s1"},
            409,
            "static",
        ),
    ]


def test_bad_input_is_refused_and_nothing_changes(fm: Fleetmate) -> None:
    beats = _cluster(fm, "bad", shard_count=4, max_replicas=2, lease_s=1)
    try:
        _register(fm, beats, "a", "b", "down1")
        wait_for(lambda: _settled(fm, "bad") or None, 30, "placement")
        beats.nodes.discard("down1")

        def quiet() -> bool:
            view = fm.get(f"{BASE}/clusters/bad").json()
            leaders = {s["leader"] for s in _shards(fm, "bad")}
            return bool(view["nodes"].get("down") == 1 and view["procedures_running"] == 0 and "down1" not in leaders)

        wait_for(lambda: quiet() or None, 30, "down1 down and its leaders moved")
        static = fm.post(
            f"{BASE}/clusters", {"name": "static1", "topology": "static", "node_count": 1, "max_replicas": 1}
        )
        assert static.status_code == 201, static.text
        assert fm.post(f"{BASE}/clusters/static1/nodes", {"node": "s1"}).status_code == 201
        wait_for(lambda: fm.get(f"{BASE}/clusters/static1").json()["placed"] or None, 15, "static1 placed")
        # Paused, the balancing schedulers start nothing new: the state only changes if a bad input changes it.
        assert httpx.patch(fm.url + BASE + "/clusters/bad", json={"paused": True}, timeout=10).status_code == 200
        wait_for(lambda: quiet() or None, 30, "no procedure running in the paused cluster")
        shard = next(s for s in _shards(fm, "bad") if "down1" not in {r["node"] for r in s["replicas"]})
        before = _state(fm, "bad"), _state(fm, "static1")
        for method, path, body, status, words in _bad_inputs(shard["id"], shard["leader"]):
            got = httpx.request(method, fm.url + BASE + path, json=body, timeout=10)
            assert got.status_code == status, (method, path, got.text)
            assert words in got.text, (method, path, got.text)
        assert (_state(fm, "bad"), _state(fm, "static1")) == before
    finally:
        beats.stop.set()


def test_the_cli_drives_the_scheduler(fm: Fleetmate, tmp_path: Path) -> None:
    env = {"FLEETMATE_ADDR": fm.url}

    def cli(*args: str) -> str:
        done = run_cli(["sched", *args], env, tmp_path)
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert "cli1" in cli("create", "cli1", "--shards", "4", "--replicas", "1", "--nodes", "1")
    assert "cli1" in cli("list")
    beats = Beats(fm, "cli1")
    beats.thread.start()
    try:
        _register(fm, beats, "n1", "n2")
        wait_for(lambda: _settled(fm, "cli1") or None, 30, "placement")
        assert "n1" in cli("nodes", "cli1")
        assert "SHARD" in cli("shards", "cli1")
        assert "shard" in cli("route", "cli1", "00000001")
        assert json.loads(cli("show", "cli1", "--json"))["placed"] is True
        assert "balance-leader" in cli("diagnose", "cli1")
        cli("pause", "cli1")
        assert json.loads(cli("show", "cli1", "--json"))["paused"] is True
        cli("limits", "cli1", "leader=8", "cooldown_s=0")
        assert json.loads(cli("show", "cli1", "--json"))["limits"]["leader"] == 8
        cli("resume", "cli1")
        holder = _shards(fm, "cli1")[0]["leader"]
        other = "n2" if holder == "n1" else "n1"
        assert "move" in cli("operator", "cli1", "move", "0", "--from", holder, "--to", other)
        wait_for(lambda: _shards(fm, "cli1")[0]["leader"] == other or None, 30, "the move")
        assert "success" in cli("procedures", "cli1", "--status", "success")
        assert "ETA" in cli("what-if", "cli1", "--add", "n3@z1")
        bad = run_cli(["sched", "show", "nope"], env, tmp_path)
        assert bad.returncode == 1
        assert "no cluster named 'nope'" in bad.stderr
        assert "dropped" in cli("drop", "cli1")
    finally:
        beats.stop.set()


def test_websockets_push_changes_and_assignments(fm: Fleetmate) -> None:
    ws_url = fm.url.replace("http://", "ws://")
    beats = _cluster(fm, "ws1", shard_count=2, max_replicas=1)
    try:
        with (
            ws_connect(f"{ws_url}{BASE}/changes?cluster=ws1", open_timeout=10) as changes,
            ws_connect(f"{ws_url}{BASE}/clusters/ws1/nodes/x1/assignments", open_timeout=10) as bad,
        ):
            assert json.loads(changes.recv(timeout=10))["type"] == "ready"
            assert json.loads(bad.recv(timeout=10))["error"] == "no_such_node"
            _register(fm, beats, "x1", "x2", "x3")
            with ws_connect(f"{ws_url}{BASE}/clusters/ws1/nodes/x1/assignments", open_timeout=10) as mine:
                first = json.loads(mine.recv(timeout=10))
                assert first["node"] == "x1"
                wait_for(lambda: _settled(fm, "ws1") or None, 30, "placement")
                kinds = set()
                while "placed" not in kinds:
                    change = json.loads(changes.recv(timeout=10))
                    assert change["cluster"] == "ws1"
                    kinds.add(change["text"])
                held = {s["id"] for s in _shards(fm, "ws1") if s["leader"] == "x1"}
                pushed = {s["id"] for s in first["shards"]}  # placed before the socket opened: all in the first
                while pushed != held:
                    pushed = {s["id"] for s in json.loads(mine.recv(timeout=10))["shards"]}
                assert pushed == held
    finally:
        beats.stop.set()


def test_a_hot_shard_is_split_from_loads_kept_in_the_metrics_store(fm: Fleetmate) -> None:
    """One shard's leader reports 1,000 writes a second, the others 1: the leader keeps the loads as
    series in the metrics store, records their average, and the hot scheduler splits the shard
    (a single hot shard has no cooler node to go to) within 3 load records."""
    body = {"name": "hot", "shard_count": 4, "max_replicas": 1, "lease_s": 2, "limits": {"cooldown_s": 0}}
    assert fm.post(f"{BASE}/clusters", body).status_code == 201
    beats = Beats(fm, "hot")
    beats.thread.start()
    try:
        _register(fm, beats, "h1", "h2", "h3")
        wait_for(lambda: _settled(fm, "hot") or None, 30, "placement")
        beats.load = {0: 1000.0, 1: 1.0, 2: 1.0, 3: 1.0}

        def split() -> dict[str, Any] | None:
            procs = fm.get(f"{BASE}/clusters/hot/procedures").json()
            return next((p for p in procs if p["op"]["source"] == "hot" and p["status"] == "success"), None)

        proc = wait_for(split, 30, "the hot shard split")
        assert proc["op"]["kind"] == "split"
        assert proc["op"]["shards"] == [0]
        assert len(_shards(fm, "hot")) == 5
        got = fm.get("/api/v1/metrics/query?series=fleetmate_shard_load&labels=cluster=hot,shard=0&from=now-5m").json()
        assert got["results"]
        assert max(v for _, v in got["results"][0]["points"]) >= 999
    finally:
        beats.stop.set()
